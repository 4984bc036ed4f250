"""The arithmetic of a merge item, on the CPU or on a CUDA GPU.

``Kernel`` holds the exact-mean recipe used on every device:

- weights scaled to exact integers and sums kept in fp64, where they are exact (see
  ``engine.plan_build.exact_factors`` for why fp32 is not enough for a correctly rounded mean);
- convert each source into a preallocated buffer and add it (on the CPU a mixed-dtype ``add_``
  is ~10x slower than copy-then-add, and fp16 -> fp64 is fastest through fp32);
- divide once by the total weight (a true division: on CUDA by a device tensor, because torch
  turns division by a host scalar into multiplication by its reciprocal, which rounds twice);
- narrow fp64 results to fp16/bf16 by rounding to odd at fp32 precision first, so the value is
  rounded once, correctly, instead of twice.

A NaN or Inf in any source makes the sum non-finite; the kernel returns that flag (a 0-dim
tensor, so the GPU need not synchronise) and the backend then finds which source it was.

``CpuBackend`` computes items on worker threads (one per core, one torch thread each), walking
each slice in sub-chunks that stay in cache. ``CudaBackend`` copies an item's read buffer (pinned host memory) to the GPU on a
copy stream, computes on a compute stream, copies the results back to a pinned output buffer
and lets the caller collect them one item later, so transfers, compute and file I/O overlap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.checkpoint.format import DTYPES
from engine.merge.layout import Segment
from engine.plan.model import MergePlan

_ACC = {"F32": torch.float32, "F64": torch.float64}
_NARROW = (torch.float16, torch.bfloat16)


@dataclass
class Bad:
    """A non-finite result: ``sources`` are the plan Sources (file, key) holding NaN/Inf."""

    segment: Segment
    node: int
    sources: list[tuple[int, str]]


class Kernel:
    def __init__(self, device: torch.device, max_elems: int):
        self.device = device
        self.max_elems = max(1, max_elems)
        self._bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def buf(self, name: str, dtype: torch.dtype, n: int) -> torch.Tensor:
        t = self._bufs.get((name, dtype))
        if t is None:
            t = torch.empty(self.max_elems, dtype=dtype, device=self.device)
            self._bufs[(name, dtype)] = t
        return t[:n]

    def load(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """``dst`` (fp32/fp64) = ``src`` converted exactly."""
        if dst.dtype == torch.float64 and src.dtype not in (torch.float32, torch.float64):
            via = self.buf("via32", torch.float32, src.numel())
            via.copy_(src)
            dst.copy_(via)
        else:
            dst.copy_(src)

    def divisor(self, total: float, dtype: torch.dtype):
        if self.device.type == "cpu":
            return total  # CPU division by a scalar is a true division
        return torch.full((), total, dtype=dtype, device=self.device)

    def mean(self, views: list[torch.Tensor], weights: list[float], acc_dtype: str,
             outs: list[torch.Tensor]) -> torch.Tensor:
        """Weighted mean of ``views`` written into each of ``outs``; returns "all finite"."""
        n = views[0].numel()
        dt = _ACC[acc_dtype]
        acc = self.buf("acc", dt, n)
        self.load(acc, views[0])
        if weights[0] != 1.0:
            acc.mul_(weights[0])
        if len(views) > 1:
            tmp = self.buf("tmp", dt, n)
            for v, w in zip(views[1:], weights[1:]):
                self.load(tmp, v)
                if w == 1.0:
                    acc.add_(tmp)
                else:
                    acc.add_(tmp, alpha=w)
        finite = torch.isfinite(acc).all()  # element by element, as the fused CPU kernels check
        total = math.fsum(weights)
        if total != 1.0:
            acc.div_(self.divisor(total, dt))
        for out in outs:
            self.narrow(acc, out)
        return finite

    def copy(self, view: torch.Tensor, outs: list[torch.Tensor], check: bool) -> torch.Tensor | None:
        """One source into ``outs`` (bit-exact where the dtype matches); "all finite" if checked."""
        finite = None
        if check:
            dt = torch.float64 if view.dtype == torch.float64 else torch.float32
            t = self.buf("check", dt, view.numel())
            t.copy_(view)
            # element by element: an fp32 sum of finite values near 3e38 would overflow
            finite = torch.isfinite(t).all()
        for out in outs:
            self.narrow(view, out)
        return finite

    def finite(self, view: torch.Tensor) -> bool:
        dt = torch.float64 if view.dtype == torch.float64 else torch.float32
        t = self.buf("check", dt, view.numel())
        t.copy_(view)
        return bool(torch.isfinite(t).all())

    def narrow(self, src: torch.Tensor, out: torch.Tensor) -> None:
        if src.dtype == torch.float64 and out.dtype in _NARROW:
            out.copy_(self.round_to_odd(src))  # exact in fp32, then one rounding to 16 bits
        else:
            out.copy_(src)

    def round_to_odd(self, src: torch.Tensor) -> torch.Tensor:
        """fp64 values cut to fp32's 24 significant bits, rounded to odd: the kept part, with its
        last bit set when anything was cut. A later rounding to <= 22 bits is then the correct
        rounding of ``src`` (torch rounds fp64 to fp16 through fp32: twice, and wrongly at
        near-ties). Integer ops on the fp64 bits, in place, no allocation."""
        n = src.numel()
        bits = src.view(torch.int64)
        low = self.buf("odd_low", torch.int64, n)
        kept = self.buf("odd_kept", torch.int64, n)
        torch.bitwise_and(bits, _CUT_MASK, out=low)
        low.add_(_CUT_MASK).bitwise_and_(_KEEP_LSB)  # the kept lsb, set iff something was cut
        torch.bitwise_and(bits, ~_CUT_MASK, out=kept)
        kept.bitwise_or_(low)
        return kept.view(torch.float64)


# fp64 has 52 fraction bits, fp32 23: round-to-odd works on the 29 bits below fp32's precision.
_CUT_MASK = (1 << 29) - 1
_KEEP_LSB = 1 << 29


def arange_values(dtype: str, numel: int) -> torch.Tensor:
    return torch.arange(numel, dtype=torch.float64).to(DTYPES[dtype].torch_dtype)


def _view(buf: torch.Tensor, offset: int, nbytes: int, dtype: str) -> torch.Tensor:
    return buf[offset: offset + nbytes].view(DTYPES[dtype].torch_dtype)


def _node_parts(plan: MergePlan, seg: Segment, ns, excluded: dict[int, set]):
    """The node, its sources' slices not excluded (skip_nan) and their multipliers."""
    node = plan.nodes[ns.node]
    skip = excluded.get(ns.node, ())
    kept, factors = [], []
    for i, f in zip(ns.sources, node.factors):
        s = seg.sources[i]
        if (s.file, s.key) not in skip:
            kept.append(s)
            factors.append(f)
    return node, kept, factors
