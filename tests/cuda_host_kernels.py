"""CUDA C++ kernel source compiled for the host CPU (g++), for the CUDA runtime's test double:
the same source the engine hands to NVRTC on a GPU, each launch run as a loop over every block
and thread of its 1-D grid.

This checks what can be checked without a GPU: the kernels' index arithmetic, bounds and
layouts, and their floating-point results, which are the GPU's when every operation is an IEEE
one rounded to nearest and named (``__dadd_rn``, ``__fma_rn``, ...) and no thread depends on
another (no shared memory, no atomics, no reduction across threads): here each named operation
is the same IEEE operation (``-ffp-contract=off``: no fused multiply-add but ``std::fma``, SSE2
doubles, no excess precision). It proves nothing about launch limits, occupancy or speed.

Arguments are marshalled as torch's ``torch.cuda._compile_kernel`` does on a GPU: tensors as
pointers to their data, Python ints as C ``int``, floats as C ``double``.
"""

from __future__ import annotations

import ctypes
import hashlib
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

PRELUDE = r"""
#include <cmath>
struct astolfo_dim3 { unsigned x, y, z; };
static thread_local astolfo_dim3 blockIdx, threadIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dsub_rn(double a, double b) { return a - b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline double __ddiv_rn(double a, double b) { return a / b; }
static inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
using std::ldexp;
"""

_ENTRY = re.compile(r'extern "C" __global__ void (\w+)\(([^)]*)\)')
_LOCK = threading.Lock()
_LIBS: dict[str, ctypes.CDLL] = {}


def available() -> bool:
    return shutil.which("g++") is not None


def compile_kernels(source: str, names: list[str]) -> dict:
    """``names`` from ``source``, each a callable ``kernel(grid=, block=, args=)`` that runs the
    whole launch on this thread before it returns."""
    entries = {m.group(1): m.group(2) for m in _ENTRY.finditer(source)}
    missing = [n for n in names if n not in entries]
    if missing:
        raise RuntimeError(f"kernels not in the source: {missing}")
    launchers = []
    for name, params in entries.items():
        args = ", ".join(p.strip().split()[-1].lstrip("*") for p in params.split(","))
        launchers.append(
            f'extern "C" void astolfo_launch_{name}(unsigned gx, unsigned bx, {params}) {{\n'
            f"    gridDim.x = gx; blockDim.x = bx;\n"
            f"    for (unsigned b = 0; b < gx; b++) {{ blockIdx.x = b;\n"
            f"        for (unsigned t = 0; t < bx; t++) {{ threadIdx.x = t; {name}({args}); }} }}\n}}\n")
    full = PRELUDE + source + "\n" + "".join(launchers)
    lib = _library(full)
    return {name: _Kernel(getattr(lib, f"astolfo_launch_{name}"), entries[name]) for name in names}


def _library(full: str) -> ctypes.CDLL:
    digest = hashlib.sha256(full.encode()).hexdigest()[:16]
    with _LOCK:
        if digest not in _LIBS:
            folder = Path(tempfile.gettempdir()) / "astolfo-host-kernels"
            folder.mkdir(exist_ok=True)
            so = folder / f"{digest}.so"
            if not so.exists():
                src = folder / f"{digest}.cpp"
                src.write_text(full)
                part = folder / f"{digest}.{threading.get_ident()}.so"
                subprocess.run(["g++", "-O2", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off", "-o", str(part),
                                str(src)], check=True, capture_output=True, text=True)
                part.replace(so)
            _LIBS[digest] = ctypes.CDLL(str(so))
        return _LIBS[digest]


class _Kernel:
    def __init__(self, fn, params: str):
        self.fn = fn
        self.kinds = ["pointer" if "*" in p else p.split()[0] for p in params.split(",")]

    def __call__(self, grid=(1, 1, 1), block=(1, 1, 1), args=None, shared_mem: int = 0, stream=None) -> None:
        assert grid[1:] == (1, 1) and block[1:] == (1, 1), "1-D launches only"
        args = list(args or [])
        assert len(args) == len(self.kinds), (len(args), self.kinds)
        c_args = []
        for a, kind in zip(args, self.kinds):
            if isinstance(a, torch.Tensor):
                assert kind == "pointer" and a.device.type == "cpu" and a.is_contiguous(), (kind, a.shape)
                c_args.append(ctypes.c_void_p(a.data_ptr()))
            elif isinstance(a, bool) or not isinstance(a, (int, float)):
                raise TypeError(f"unsupported kernel argument {a!r}")
            elif isinstance(a, int):
                assert kind == "int" and -(1 << 31) <= a < (1 << 31), (kind, a)
                c_args.append(ctypes.c_int(a))
            else:
                assert kind == "double", kind
                c_args.append(ctypes.c_double(a))
        self.fn(ctypes.c_uint(grid[0]), ctypes.c_uint(block[0]), *c_args)
