"""numba for the kernels: where its on-disk cache goes, the decorator every kernel uses, and
the few LLVM operations numba does not expose (bit casts between floats and integers, fused
multiply-add).

The cache: numba writes compiled kernels beside the source (``__pycache__``) when that folder is
writable (a clone, as CI has; an editable or user install). For an install whose package folder
is read-only (a system site-packages), this module points ``NUMBA_CACHE_DIR`` at astolfo's user
cache folder (``ASTOLFO_CACHE_DIR`` or platformdirs', as the catalog uses), so the kernels are
kept, and cleared, with astolfo's other caches; unless the user set ``NUMBA_CACHE_DIR``. It must
do so before numba is imported (numba reads it once); if something imported numba first, numba
uses its own user-wide folder. Where no folder is writable at all the kernels compile in memory
on every run (``kernel`` falls back to no disk cache).

``kernel`` is ``njit(nogil=True, cache=True, error_model="numpy")``: no GIL (the merge's worker
threads run kernels in parallel with the reader and writer), IEEE division (no zero check), and
no fastmath anywhere, so LLVM keeps every rounding where the source puts it.
"""

from __future__ import annotations

import os
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def _cache_dir_for_read_only_install() -> None:
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    cache = _HERE / "__pycache__"
    try:
        cache.mkdir(exist_ok=True)
        writable = os.access(cache, os.W_OK)
    except OSError:
        writable = False
    if writable:
        return
    import platformdirs

    base = os.environ.get("ASTOLFO_CACHE_DIR") or platformdirs.user_cache_dir("astolfo")
    os.environ["NUMBA_CACHE_DIR"] = str(Path(base) / "numba")


_cache_dir_for_read_only_install()

import numba  # noqa: E402  (after the cache folder is chosen)
from llvmlite import ir  # noqa: E402
from numba.core import cgutils, types  # noqa: E402
from numba.extending import intrinsic  # noqa: E402


def _drop_stale_cache() -> None:
    """numba keys a cached kernel on its own file's timestamp only: a kernel that inlines a
    helper from another module would load stale code after that module changed. So the cache
    folder holds a hash of every source file of this package; when it differs, the cached
    kernels of this package are deleted before any is loaded."""
    import hashlib

    probe = numba.njit(cache=True)(_probe)
    try:
        folder = Path(probe._cache._cache_path)
    except Exception:  # no cache (no writable folder): nothing stale
        return
    digest = hashlib.sha256(numba.__version__.encode())
    for src in sorted(_HERE.glob("*.py")):
        digest.update(src.name.encode() + b"\0" + src.read_bytes())
    stamp = folder / "astolfo-kernels.stamp"
    try:
        if stamp.exists() and stamp.read_text() == digest.hexdigest():
            return
        modules = {src.stem for src in _HERE.glob("*.py")}
        for f in folder.iterdir():
            if f.suffix in (".nbi", ".nbc") and f.name.split(".", 1)[0] in modules:
                f.unlink(missing_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        stamp.write_text(digest.hexdigest())
    except OSError:
        pass


def _probe():
    return 0


_drop_stale_cache()


def kernel(fn):
    """A compiled kernel: nogil, cached on disk, IEEE arithmetic. Falls back to no disk cache
    where numba finds no writable cache folder (it raises at decoration then)."""
    try:
        return numba.njit(nogil=True, cache=True, error_model="numpy")(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return numba.njit(nogil=True, error_model="numpy")(fn)


def inline(fn):
    """A helper inlined into the kernels that call it (numba-level inlining, so LLVM sees one
    loop body and vectorises it)."""
    return numba.njit(inline="always", error_model="numpy")(fn)


@intrinsic
def f64_bits(typingctx, x):
    """The bits of a float64 as an int64."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(64))
    return types.int64(types.float64), codegen


@intrinsic
def f64_from_bits(typingctx, b):
    """The float64 whose bits are the int64 ``b``."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.DoubleType())
    return types.float64(types.int64), codegen


@intrinsic
def f32_bits(typingctx, x):
    """The bits of a float32 as a non-negative int64 (0 .. 2**32 - 1)."""
    def codegen(context, builder, sig, args):
        return builder.zext(builder.bitcast(args[0], ir.IntType(32)), ir.IntType(64))
    return types.int64(types.float32), codegen


@intrinsic
def f32_from_bits(typingctx, b):
    """The float32 whose bits are the low 32 bits of the int64 ``b``."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.trunc(args[0], ir.IntType(32)), ir.FloatType())
    return types.float32(types.int64), codegen


@intrinsic
def stack_f64(typingctx, size):
    """A pointer to ``size`` (a literal) float64s on the kernel's stack, allocated once at the
    function's entry; ``numba.carray(stack_f64(n), shape)`` views it. Accumulators kept there
    stay private to the loop, so LLVM vectorises a loop that updates them; in a heap array
    (``np.empty``) it must assume they may alias the inputs and keeps the loop scalar."""
    if not isinstance(size, types.IntegerLiteral):
        return None
    count = size.literal_value

    def codegen(context, builder, sig, args):
        return cgutils.alloca_once(builder, ir.DoubleType(), size=count)
    return types.CPointer(types.float64)(size), codegen


@intrinsic
def fma(typingctx, a, b, c):
    """``a * b + c`` rounded once (llvm.fma: one instruction where the CPU has FMA), for sums
    that have no torch twin to agree with bit for bit (the Gram matrix, vote sums). The merge's
    mean does not use it: there the torch kernel multiplies, then adds, on every device."""
    def codegen(context, builder, sig, args):
        return builder.fma(*args)
    return types.float64(types.float64, types.float64, types.float64), codegen


def _host_has_f16c() -> bool:
    """x86 CPUs since 2012 convert fp16 in hardware (F16C); ARM64 always does. Elsewhere LLVM
    would call a runtime helper numba does not link, so the kernels decode fp16 in software."""
    import platform

    from llvmlite import binding

    if platform.machine().lower() in ("arm64", "aarch64"):
        return True
    try:
        return bool(binding.get_host_cpu_features().get("f16c"))
    except Exception:
        return False


HAS_F16C = _host_has_f16c()


@intrinsic
def f16_bits_to_f64_hw(typingctx, b):
    """fp16 bits (low 16 bits of an int64) to float64 by the CPU's conversion (exact)."""
    def codegen(context, builder, sig, args):
        h = builder.bitcast(builder.trunc(args[0], ir.IntType(16)), ir.HalfType())
        return builder.fpext(h, ir.DoubleType())
    return types.float64(types.int64), codegen


@intrinsic
def f32_to_f16_bits_hw(typingctx, f):
    """fp32 to fp16 bits by the CPU's conversion (vcvtps2ph: round to nearest even), as an int64."""
    def codegen(context, builder, sig, args):
        h = builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
        return builder.zext(h, ir.IntType(64))
    return types.int64(types.float32), codegen
