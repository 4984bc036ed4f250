"""The CUDA backend: an item's read buffer goes to the GPU on an upload stream, is computed on
a compute stream, and its results (and one "finite" flag per checked node) come back on a
download stream, so the transfers of neighbouring items overlap each other's compute.

Why it is built this way:

- Device buffers come in ``SLOTS`` sets (input, output, flag vector). The reuse of a set is
  protected by events on the GPU, not by how many items the host keeps in flight: an upload
  into a set waits for the compute that last read it, a compute waits for the download that last
  read its results. The host keeps ``DEPTH`` items in flight, more than ``SLOTS``, so the GPU
  can run ahead without the host loop having to be right about it.
- Flags are written into a preallocated device vector and read by the host through pinned
  memory once the item's event has completed: no ``.cpu()`` or ``torch.stack`` per item (each
  an extra synchronisation), and events are blocking, so a waiting host thread sleeps instead
  of spinning on a core the readers need.
- Which source holds NaN/Inf is found on the host, in the pinned read buffer, which the caller
  keeps until ``finish`` returns; that path is rare and needs no device work.
- ``position_ids`` (arange) are built on the device, once per dtype and length.
- Scratch buffers are sized by what each is used for in this pass (``scratch_sizes``) and the
  whole device footprint is checked against the card's free memory before any allocation; an
  out-of-memory error becomes a MergeError that says what was free, what was needed and what
  to do, and a failed construction frees what it had allocated.

Every stream, event and allocation goes through a *runtime*: ``CudaRuntime`` on a GPU. The
tests run this same class over a CPU test double (``tests/cuda_double.py``) that defers
each stream's work and records the order of operations, so the host logic above is checked
where no GPU exists.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from engine.checkpoint.direct_io import BLOCK
from engine.checkpoint.format import DTYPES
from engine.merge.arithmetic import Kernel, _node_parts, _view, all_finite
from engine.merge.backends.base import Bad, page_aligned
from engine.merge.errors import MergeError
from engine.merge.layout import Item
from engine.methods import streamed
from engine.plan.model import ARANGE, COPY, MEAN, METHOD, MergePlan

SLOTS = 2  # device buffer sets: one item uploads or downloads while the other computes
DEPTH = 3  # items the host keeps in flight (each holds one pinned read and output buffer)
# Device bytes per element of a slice that the kernel may need besides the buffers: fp64 sum
# and addend, fp32 staging, two int64 words for round-to-odd, and torch's bool temporary of
# isfinite. Used to fit the buffer size to the card (tuning) before a pass starts.
SCRATCH_BYTES_PER_ELEM = 8 + 8 + 4 + 16 + 1
_NARROW = ("F16", "BF16")


class CudaRuntime:
    """Streams, events and memory of one CUDA device, through torch."""

    def __init__(self, device: torch.device):
        if device.index is None:  # torch.cuda.set_device refuses a bare "cuda"
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        self.device = device

    def stream(self):
        return torch.cuda.Stream(self.device)

    def event(self):
        return torch.cuda.Event(blocking=True)  # a host wait sleeps rather than spins

    def run(self, stream, fn) -> None:
        """Enqueue the work ``fn`` issues on ``stream`` (on a GPU it is issued now)."""
        with torch.cuda.stream(stream):
            fn()

    def record(self, event, stream) -> None:
        event.record(stream)

    def wait(self, stream, event) -> None:
        stream.wait_event(event)

    def host_wait(self, event) -> None:
        event.synchronize()

    def pinned(self, nbytes: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        return torch.empty(nbytes, dtype=dtype, pin_memory=True)

    def empty(self, n: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        return torch.empty(n, dtype=dtype, device=self.device)

    def mem_get_info(self) -> tuple[int, int]:
        return torch.cuda.mem_get_info(self.device)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def release(self) -> None:
        torch.cuda.empty_cache()

    def bind(self) -> None:
        """The merge's device becomes the calling thread's current one (a thread of its own,
        such as the statistics', launches kernels and loads modules into the current context)."""
        torch.cuda.set_device(self.device)

    def compile(self, source: str, names: list[str]) -> dict:
        """The kernels ``names`` of the CUDA C++ ``source`` (no headers), compiled once a process
        and device by NVRTC for this card (``nvrtc_compile``), each called as ``kernel(grid=,
        block=, args=)`` on the current stream. Raises where torch or the driver cannot (the
        caller then stays on the CPU)."""
        key = (self.device.index, hash(source), tuple(names))
        with _COMPILE_LOCK:
            if key not in _COMPILED:
                _COMPILED[key] = nvrtc_compile(source, names, self.device)
            return _COMPILED[key]


_COMPILED: dict = {}  # (device index, source hash, names) -> the loaded kernels
_COMPILE_LOCK = threading.Lock()


def nvrtc_compile(source: str, names: list[str], device: torch.device) -> dict:
    """NVRTC through ctypes, the library and the loader torch uses for its own run-time kernels
    (``torch.cuda._utils``), without torch's wrapper, which asks for the CUDA toolkit's headers
    (CUDA_HOME) that a pip install of torch does not have and this source does not need.
    ``--fmad=false``: no multiply-add is fused but those the source names (``__fma_rn``)."""
    import ctypes

    from torch.cuda import _utils

    nvrtc = _utils._get_gpu_rtc_library()
    prog = ctypes.c_void_p()

    def check(result: int, what: str) -> None:
        if result != 0:
            text = ctypes.c_char_p()
            nvrtc.nvrtcGetErrorString(result, ctypes.byref(text))
            raise RuntimeError(f"NVRTC {what}: {(text.value or b'?').decode()}")

    check(nvrtc.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"astolfo.cu", 0, None, None), "create")
    try:
        for name in names:
            check(nvrtc.nvrtcAddNameExpression(prog, name.encode()), "name")
        major, minor = torch.cuda.get_device_capability(device)
        options = [f"--gpu-architecture=sm_{major}{minor}".encode(), b"--fmad=false"]
        result = nvrtc.nvrtcCompileProgram(prog, len(options), (ctypes.c_char_p * len(options))(*options))
        if result != 0:
            size = ctypes.c_size_t()
            nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            nvrtc.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(f"NVRTC could not compile the kernels: {log.value.decode(errors='replace')}")
        size = ctypes.c_size_t()
        check(nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "cubin size")
        cubin = ctypes.create_string_buffer(size.value)
        check(nvrtc.nvrtcGetCUBIN(prog, cubin), "cubin")
        lowered = {}
        for name in names:
            out = ctypes.c_char_p()
            check(nvrtc.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(out)), "lowered name")
            lowered[name] = (out.value or name.encode()).decode()
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    with torch.cuda.device(device):
        loaded = _utils._cuda_load_module(cubin.raw, list(lowered.values()))
    return {name: loaded[low] for name, low in lowered.items()}


def scratch_sizes(plan: MergePlan, items: list[Item]) -> dict[str, int]:
    """Elements each kernel scratch buffer needs at most over ``items``: each by its own use
    (a copy needs no fp64 sum; only 16-bit outputs of fp64 values need round-to-odd words)."""
    sizes = {"acc": 0, "tmp": 0, "via32": 0, "odd": 0}
    for item in items:
        for seg in item.segments:
            n = seg.numel
            for ns in seg.nodes:
                node = plan.nodes[ns.node]
                srcs = [seg.sources[i].dtype for i in ns.sources]
                narrow = any(d in _NARROW for d in ns.outs)
                if node.kind == METHOD:
                    for name in streamed.SCRATCH:
                        sizes[name] = max(sizes.get(name, 0), n)
                    if any(d not in ("F32", "F64") for d in srcs):
                        sizes["via32"] = max(sizes["via32"], n)
                    if narrow:
                        sizes["odd"] = max(sizes["odd"], n)
                elif node.kind == MEAN:
                    sizes["acc"] = max(sizes["acc"], n)
                    if len(srcs) > 1:
                        sizes["tmp"] = max(sizes["tmp"], n)
                    if any(d not in ("F32", "F64") for d in srcs):
                        sizes["via32"] = max(sizes["via32"], n)
                    if narrow:
                        sizes["odd"] = max(sizes["odd"], n)
                elif node.kind == COPY and srcs and srcs[0] == "F64" and narrow:
                    sizes["odd"] = max(sizes["odd"], n)
    return {"acc": sizes["acc"], "tmp": sizes["tmp"], "via32": sizes["via32"],
            "odd_low": sizes["odd"], "odd_kept": sizes["odd"], **{m: sizes.get(m, 0) for m in streamed.SCRATCH}}


def scratch_bytes(sizes: dict[str, int]) -> int:
    return (8 * (sizes["acc"] + sizes["tmp"] + sizes["odd_low"] + sizes["odd_kept"]) + 4 * sizes["via32"]
            + 8 * sum(sizes.get(m, 0) for m in streamed.SCRATCH))


def out_of_memory(free: int, total: int, needed: int, what: str) -> MergeError:
    gb = 1e9
    return MergeError(
        f"the GPU has not enough free memory for this merge ({what}): {free / gb:.2f} GB free of "
        f"{total / gb:.2f} GB, about {needed / gb:.2f} GB needed. Close other programs that use the GPU, "
        'or set device = "cpu" in the recipe.')


@dataclass
class _Handle:
    item: Item
    slot: int
    ring: int
    read_buf: torch.Tensor
    marks: list = field(default_factory=list)  # (seg, ns, kept, flag index or None: no source left)
    flags: int = 0
    bads: list = field(default_factory=list)  # known before the work: a median's sources with NaN/Inf


class CudaBackend:
    """Items computed on one CUDA device (see the module docstring for the buffer protocol)."""

    name = "cuda"
    depth = DEPTH

    def __init__(self, plan: MergePlan, device: torch.device, buffer_bytes: int, items: list[Item],
                 runtime=None):
        self.plan = plan
        self.rt = runtime if runtime is not None else CudaRuntime(device)
        self.device = self.rt.device
        self.buffer_bytes = buffer_bytes
        self._count = 0
        self._closed = False
        self._arange: dict[tuple[str, int], torch.Tensor] = {}
        self.dev_in: list = []
        self.dev_out: list = []
        self.dev_flags: list = []
        self.host_flags: list = []
        sizes = scratch_sizes(plan, items)
        largest = max((seg.numel for it in items for seg in it.segments), default=1)
        n_flags = max((sum(len(seg.nodes) for seg in it.segments) for it in items), default=1)
        self.needed = SLOTS * (2 * buffer_bytes + n_flags) + scratch_bytes(sizes) + largest  # + isfinite's temporary
        free, total = self.rt.mem_get_info()
        if self.needed > free:
            raise out_of_memory(free, total, self.needed, "checked before the merge started")
        try:
            self.kernel = Kernel(self.device, 1, sizes)
            self.up, self.compute, self.down = self.rt.stream(), self.rt.stream(), self.rt.stream()
            self.uploaded = [self.rt.event() for _ in range(SLOTS)]
            self.computed = [self.rt.event() for _ in range(SLOTS)]
            self.downloaded = [self.rt.event() for _ in range(SLOTS)]
            self.done = [self.rt.event() for _ in range(DEPTH)]
            for _ in range(SLOTS):
                self.dev_in.append(self.rt.empty(buffer_bytes))
                self.dev_out.append(self.rt.empty(buffer_bytes))
                self.dev_flags.append(self.rt.empty(n_flags, torch.bool))
            self.host_flags = [self.rt.pinned(n_flags, torch.bool) for _ in range(DEPTH)]
            for name, n in sizes.items():  # now, so that a lack of memory shows before any write
                if n:
                    dtype = torch.float64 if name in ("acc", "tmp") or name in streamed.SCRATCH else (
                        torch.float32 if name == "via32" else torch.int64)
                    self.kernel.buf(name, dtype, n)
        except BaseException as e:
            self._free()
            raise self._translate(e, "allocating its buffers") from None

    # ------------------------------------------------------------------ the Backend protocol

    def alloc(self, nbytes: int) -> torch.Tensor:
        try:
            return page_aligned(self.rt.pinned(nbytes + BLOCK), nbytes)
        except RuntimeError as e:  # cudaHostAlloc fails with a plain "CUDA error: out of memory"
            if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e):
                raise MergeError(
                    f"cannot pin {nbytes / 1e6:.0f} MB more of host memory for the merge's buffers ({e}). Close "
                    'other programs that use much memory, or set device = "cpu" in the recipe.') from None
            raise

    def submit(self, item: Item, read_buf: torch.Tensor, out_buf: torch.Tensor, excluded: dict[int, set]) -> _Handle:
        try:
            return self._submit(item, read_buf, out_buf, excluded)
        except BaseException as e:
            raise self._translate(e, "computing") from None

    def finish(self, handle: _Handle) -> list[Bad]:
        try:
            self.rt.host_wait(self.done[handle.ring])
        except BaseException as e:
            raise self._translate(e, "computing") from None
        if not handle.marks:
            return list(handle.bads)
        ok = self.host_flags[handle.ring][: handle.flags].tolist() if handle.flags else []
        bads = list(handle.bads)
        for seg, ns, kept, fi in handle.marks:
            if fi is not None and ok[fi]:
                continue
            culprits = [(s.file, s.key) for s in kept
                        if not bool(all_finite(_view(handle.read_buf, s.buf_offset, s.nbytes, s.dtype)))]
            bads.append(Bad(seg, ns.node, culprits))
        return bads

    def median_device(self):
        """Where this pass's geometric medians hold their points and iterate
        (``engine.methods.median_device``): this device, within the recipe's ``memory`` when
        it sets one."""
        from engine.methods.median_device import DeviceMedian
        from engine.recipe.sizes import memory_budget

        memory = self.plan.recipe.memory
        return DeviceMedian(self.rt, memory_budget(memory) if memory else None)

    def close(self) -> None:
        """Wait for the device, then free its memory; an error of the device (a sticky CUDA
        error) is raised after the memory is released, and the pipeline raises it only when
        the pass itself succeeded, so it never hides the error that ended a pass."""
        if self._closed:
            return
        self._closed = True
        try:
            self.rt.synchronize()
        finally:
            self._free()

    # ------------------------------------------------------------------ the work

    def _submit(self, item: Item, read_buf: torch.Tensor, out_buf: torch.Tensor, excluded: dict[int, set]) -> _Handle:
        rt = self.rt
        k, r = self._count % SLOTS, self._count % DEPTH
        self._count += 1
        handle = _Handle(item, k, r, read_buf)
        work = []  # decided now: ``excluded`` may change before the work runs
        for seg in item.segments:
            for ns in seg.nodes:
                if self.plan.nodes[ns.node].kind == METHOD:
                    node, base, base_out, models, factors, shas = streamed.method_parts(self.plan, seg, ns, excluded)
                    if base_out or not models:
                        handle.marks.append((seg, ns, [], None))
                        continue
                    stats = item.stats.get(ns.node)
                    models, factors, shas, blamed = streamed.element_models(node, models, factors, shas, stats)
                    if blamed:
                        handle.bads.append(Bad(seg, ns.node, blamed))
                        continue
                    fi = handle.flags
                    handle.flags += 1
                    srcs = [base, *models] if base is not None else models
                    handle.marks.append((seg, ns, srcs, fi))
                    extra = (factors, shas, stats, [(s.file, s.key) for s in models])
                    work.append((seg, ns, node, srcs, extra, fi))
                    continue
                node, kept, factors = _node_parts(self.plan, seg, ns, excluded)
                fi = None
                if node.kind != ARANGE:
                    if not kept:
                        handle.marks.append((seg, ns, kept, None))
                        continue
                    if node.kind != COPY or node.check_finite:
                        fi = handle.flags
                        handle.flags += 1
                        handle.marks.append((seg, ns, kept, fi))
                work.append((seg, ns, node, kept, factors, fi))
        din, dout, dflags, hflags = self.dev_in[k], self.dev_out[k], self.dev_flags[k], self.host_flags[r]
        nread, nout, nflags = item.read_bytes, item.out_bytes, handle.flags

        # upload: din[k] is free once the compute of the item that used it last has ended
        rt.wait(self.up, self.computed[k])
        rt.run(self.up, lambda: din[:nread].copy_(read_buf[:nread], non_blocking=True))
        rt.record(self.uploaded[k], self.up)
        # compute: needs its input, and dout[k]/dflags[k] read back from their last user
        rt.wait(self.compute, self.uploaded[k])
        rt.wait(self.compute, self.downloaded[k])
        rt.run(self.compute, lambda: self._compute(work, din, dout, dflags))
        rt.record(self.computed[k], self.compute)
        # download, on its own stream: the next compute need not wait for it

        def download():
            out_buf[:nout].copy_(dout[:nout], non_blocking=True)
            if nflags:
                hflags[:nflags].copy_(dflags[:nflags], non_blocking=True)

        rt.wait(self.down, self.computed[k])
        rt.run(self.down, download)
        rt.record(self.downloaded[k], self.down)
        rt.record(self.done[r], self.down)
        return handle

    def _compute(self, work, din, dout, dflags) -> None:
        k = self.kernel
        for seg, ns, node, kept, factors, fi in work:
            n = seg.numel
            outs = [_view(dout, off, n * DTYPES[d].itemsize, d) for d, off in ns.outs.items()]
            if node.kind == ARANGE:
                values = self._arange_on_device(node.dtype, n)
                for out in outs:
                    out.copy_(values)
                continue
            views = [_view(din, s.buf_offset, s.nbytes, s.dtype) for s in kept]
            if node.kind == METHOD:
                factors, shas, stats, idents = factors
                base_view, model_views = (views[0], views[1:]) if node.method.base is not None else (None, views)
                finite = streamed.compute(k, node.method, node.key, seg.start, base_view, model_views, factors, shas,
                                          node.scale, outs, stats, idents)
            elif node.kind == COPY:
                finite = k.copy(views[0], outs, node.check_finite)
            else:
                finite = k.mean(views, factors, outs)
            if fi is not None:
                dflags[fi].copy_(finite)

    def _arange_on_device(self, dtype: str, n: int) -> torch.Tensor:
        """0..n-1 as ``dtype``: exact integers in fp64, then one IEEE conversion, the same
        values as the CPU's ``arange_values``; built on the device, once."""
        t = self._arange.get((dtype, n))
        if t is None:
            t = torch.arange(n, dtype=torch.float64, device=self.device).to(DTYPES[dtype].torch_dtype)
            self._arange[(dtype, n)] = t
        return t

    # ------------------------------------------------------------------ memory

    def _translate(self, e: BaseException, what: str) -> BaseException:
        """An out-of-memory error as a MergeError saying what to do; anything else as it is."""
        if not isinstance(e, torch.OutOfMemoryError):
            return e
        try:
            free, total = self.rt.mem_get_info()
        except Exception:
            free = total = 0
        return out_of_memory(free, total, self.needed, what)

    def _free(self) -> None:
        self.dev_in, self.dev_out, self.dev_flags, self.host_flags = [], [], [], []
        self._arange.clear()
        kernel = getattr(self, "kernel", None)
        if kernel is not None:
            kernel.release()
        try:
            self.rt.release()
        except Exception:
            pass
