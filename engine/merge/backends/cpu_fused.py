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
import math

import numpy as np
import torch

from engine.checkpoint.format import DTYPES
from engine.kernels.warm import ENV, wanted  # noqa: F401  (beside the warm-up, which must not import torch)
from engine.plan.model import COPY, MEAN

FLOATS = ("F16", "BF16", "F32", "F64")


class FusedNodes:
    def __init__(self, methods: bool = True):
        from engine.kernels import warm

        # numba imported and the kernels loaded or compiled, off this thread; once (``methods``:
        # the merge methods' kernels too)
        warm.start(methods)
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

    def takes_mean(self, node, kept, outs) -> bool:
        """Whether ``compute`` does this mean or copy (else it returns None for the torch kernel)."""
        if node.kind != MEAN and not (node.kind == COPY and node.check_finite):
            return False
        if any(s.dtype not in FLOATS for s in kept) or any(d not in FLOATS for d in outs):
            return False
        return self._kernels() is not None

    def takes_method(self, node, base, kept, outs, stats) -> bool:
        """Whether ``method`` does this method node's slice (else it returns None)."""
        srcs = kept if base is None else [base, *kept]
        if any(s.dtype not in FLOATS for s in srcs) or any(d not in FLOATS for d in outs):
            return False
        if node.method.combine == "median" and getattr(stats.median, "dtype", np.float64) != np.float64:
            return False
        return self._kernels() is not None

    def compute(self, node, kept, factors, outs: dict[str, int], n: int, read_buf: torch.Tensor,
                out_buf: torch.Tensor) -> int | None:
        """The node's ``n`` elements into ``outs`` (dtype -> byte offset in ``out_buf``): the first
        non-finite element's index or -1, or None when the torch kernel must do it."""
        if not self.takes_mean(node, kept, outs):
            return None
        if node.kind == COPY:
            factors = [1.0]
        check = True  # a mean is always checked, as in Kernel.mean; a copy here is a checked one
        m = self._mean
        in16, in32, in64 = self.views(read_buf)
        out16, out32, out64 = self.views(out_buf)
        kinds = np.array([m.KIND[s.dtype] for s in kept], np.int64)
        offsets = np.array([s.buf_offset // DTYPES[s.dtype].itemsize for s in kept], np.int64)
        weights = np.array(factors, np.float64)
        out_kinds = np.array([m.KIND[d] for d in outs], np.int64)
        out_offsets = np.array([off // DTYPES[d].itemsize for d, off in outs.items()], np.int64)
        return m.weighted_mean(in16, in32, in64, kinds, offsets, weights, math.fsum(factors), n,
                               out16, out32, out64, out_kinds, out_offsets, check)

    def method(self, node, base, kept, factors, shas, stats, outs: dict[str, int], start: int, n: int,
               read_buf: torch.Tensor, out_buf: torch.Tensor) -> int | None:
        """A method node's ``n`` elements from element ``start`` of its key (``engine.kernels.methods``,
        the twin of ``engine.methods.streamed.compute``): the first element whose inputs are not
        all finite, or -1; None when the torch kernel must do it (a kind of tensor the kernels
        do not read or write, or numba missing)."""
        if not self.takes_method(node, base, kept, outs, stats):
            return None
        m = self._mean
        from engine.kernels import methods as mk
        from engine.kernels.hashing import _signed
        from engine.methods.streamed import mask_key

        p = node.method
        in16, in32, in64 = self.views(read_buf)
        out16, out32, out64 = self.views(out_buf)
        size = {s: DTYPES[s].itemsize for s in FLOATS}
        base_kind = -1 if base is None else m.KIND[base.dtype]
        base_off = 0 if base is None else base.buf_offset // size[base.dtype]
        kinds = np.array([m.KIND[s.dtype] for s in kept], np.int64)
        offsets = np.array([s.buf_offset // size[s.dtype] for s in kept], np.int64)
        idents = [(s.file, s.key) for s in kept]
        median = p.combine == "median"
        della = p.drop_eps != 0 and not median
        drop = p.drop > 0 and not della and not median
        trim = p.trim < 1 and not median
        keys = np.array([_signed(mask_key(p.seed, sha, node.key)) if drop else 0 for sha in shas], np.int64)
        thresholds = np.array([stats.thresholds[i] if trim else 0.0 for i in idents], np.float64)
        bit0 = 0
        if della:  # each model's packed keep bits of this slice, one row each
            a, b = start // 8, (start + n + 7) // 8
            keep = np.stack([stats.keep_bits[i][a:b] for i in idents])
            bit0 = start - 8 * a
        else:
            keep = np.zeros((len(kept), 1), np.uint8)
        vote = mk.VOTE_NONE if p.vote == "none" or median else mk.VOTE_SUM if p.vote == "sum" else mk.VOTE_COUNT
        combine = {"sum": mk.COMBINE_SUM, "mean": mk.COMBINE_MEAN, "stock": mk.COMBINE_STOCK,
                   "median": mk.COMBINE_MEDIAN}[p.combine]
        med = stats.median if median else np.zeros(1, np.float64)
        out_kinds = np.array([m.KIND[d] for d in outs], np.int64)
        out_offsets = np.array([off // size[d] for d, off in outs.items()], np.int64)
        return mk.method_elements(
            in16, in32, in64, base_kind, base_off, kinds, offsets, np.array(factors, np.float64), keys, thresholds,
            keep, bit0, n, start, float(p.drop), drop, della, trim, vote, combine, math.fsum(factors),
            float(node.scale), float(stats.stock_t) if combine == mk.COMBINE_STOCK else 1.0,
            float(p.rescale_divisor or 0.0), float(p.alpha), med[start:start + n] if median else med,
            out16, out32, out64, out_kinds, out_offsets)
