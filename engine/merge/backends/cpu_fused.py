"""The CPU backend's fused path: a node's slice of an item computed by ``engine.kernels.mean``
(one pass over memory, no GIL) instead of a dozen torch ops, with the same bytes.

``FusedNodes.compute`` maps the node's sources and outputs onto element offsets into dtype views
of the item's read and output buffers and returns the index of the first non-finite element
(or -1), or None for what it leaves to the torch ``Kernel``: position_ids, unchecked copies
(byte copies of buffers, which torch does at memcpy speed), integer or fp8 tensors, and means
with an accumulator other than fp64.

``wanted()``: numba is installed and ``ASTOLFO_CPU_KERNELS`` is not ``torch`` (the escape hatch,
and how the benchmark and tests run the torch path side by side). Without numba, or where it
fails to import, the backend stays on torch.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os

import numpy as np
import torch

from engine.checkpoint.format import DTYPES
from engine.plan.model import COPY, MEAN

FLOATS = ("F16", "BF16", "F32", "F64")


ENV = "ASTOLFO_CPU_KERNELS"  # "torch": the torch kernel only


def wanted() -> bool:
    """Use the fused kernels: numba is installed and ``ASTOLFO_CPU_KERNELS`` is not ``torch``.
    (Looked up, not imported: importing numba takes a few tenths of a second, done in the
    background by ``engine.kernels.warm``.)"""
    if os.environ.get(ENV, "").strip().lower() == "torch":
        return False
    return importlib.util.find_spec("numba") is not None


class FusedNodes:
    def __init__(self):
        from engine.kernels import warm

        warm.start()  # numba imported and the kernel loaded or compiled, off this thread; once
        self._mean = None
        self._broken = False
        self._views: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def _kernels(self):
        if self._mean is None and not self._broken:
            try:
                mean = importlib.import_module("engine.kernels.mean")
            except ImportError:  # a broken numba install: the torch kernel does the work
                self._broken = True
                return None
            self._mean = mean
        return self._mean

    def views(self, buf: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """uint16, float32 and float64 views of a byte buffer (the buffers live as long as the
        backend, so each is wrapped once)."""
        key = buf.data_ptr()
        v = self._views.get(key)
        if v is None:
            b = buf.numpy()
            v = tuple(b[: len(b) // size * size].view(dt) for size, dt in ((2, np.uint16), (4, np.float32),
                                                                         (8, np.float64)))
            self._views[key] = v
        return v

    def compute(self, node, kept, factors, outs: dict[str, int], n: int, read_buf: torch.Tensor,
                out_buf: torch.Tensor) -> int | None:
        """The node's ``n`` elements into ``outs`` (dtype -> byte offset in ``out_buf``): the first
        non-finite element's index or -1, or None when the torch kernel must do it."""
        if node.kind == MEAN:
            check = True  # a mean is always checked, as in Kernel.mean
        elif node.kind == COPY and node.check_finite:
            factors, check = [1.0], True
        else:
            return None
        if any(s.dtype not in FLOATS for s in kept) or any(d not in FLOATS for d in outs):
            return None
        m = self._kernels()
        if m is None:
            return None
        in16, in32, in64 = self.views(read_buf)
        out16, out32, out64 = self.views(out_buf)
        kinds = np.array([m.KIND[s.dtype] for s in kept], np.int64)
        offsets = np.array([s.buf_offset // DTYPES[s.dtype].itemsize for s in kept], np.int64)
        weights = np.array(factors, np.float64)
        out_kinds = np.array([m.KIND[d] for d in outs], np.int64)
        out_offsets = np.array([off // DTYPES[d].itemsize for d, off in outs.items()], np.int64)
        return m.weighted_mean(in16, in32, in64, kinds, offsets, weights, math.fsum(factors), n,
                               out16, out32, out64, out_kinds, out_offsets, check)
