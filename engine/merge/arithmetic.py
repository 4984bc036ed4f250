"""The arithmetic of a merge item, on the CPU or on a CUDA GPU.

``Kernel`` holds the exact-mean recipe used on every device:

- weights scaled to exact integers and sums kept in fp64, where they are exact (see
  ``engine.plan.build.exact_factors`` for why fp32 is not enough for a correctly rounded mean);
- convert each source into a preallocated buffer and add it (on the CPU a mixed-dtype ``add_``
  is ~10x slower than copy-then-add, and fp16 -> fp64 is fastest through fp32);
- multiply, then add, as two operations (never ``add_(x, alpha=w)``: torch fuses that into an
  FMA on the CPU's vector units and on CUDA, but not in the CPU's scalar tail, so where weights
  fall back to inexact binary values the bytes would depend on the device and on alignment;
  with exact integer factors both forms give the same, exact, products);
- divide once by the total weight (a true division: on CUDA by a device tensor, because torch
  turns division by a host scalar into multiplication by its reciprocal, which rounds twice);
- narrow fp64 results to fp16/bf16 by rounding to odd at fp32 precision first, so the value is
  rounded once, correctly, instead of twice.

A NaN or Inf in any source makes the sum non-finite; the kernel returns that flag (a 0-dim
tensor, so the GPU need not synchronise) and the backend then finds which source it was. The
flag is ``isfinite(x).all()``, never ``isfinite(x.sum())``: a sum of large finite values
(3e38 in an fp32 tensor) overflows and would blame a healthy model.

The backends (``backends/``) cut items into slices and call this kernel; each scratch buffer is
sized by its own use (``sizes``, by name) where the backend knows it, else by ``max_elems``.
"""

from __future__ import annotations

import math

import torch

from engine.checkpoint.format import DTYPES
from engine.merge.layout import Segment
from engine.plan.model import MergePlan

_NARROW = (torch.float16, torch.bfloat16)
_FINITE_DIRECT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Kernel:
    def __init__(self, device: torch.device, max_elems: int, sizes: dict[str, int] | None = None):
        self.device = device
        self.max_elems = max(1, max_elems)
        self.sizes = sizes or {}  # scratch name -> elements it needs at most (else max_elems)
        self._bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self._divisors: dict[tuple[float, torch.dtype], torch.Tensor] = {}

    def buf(self, name: str, dtype: torch.dtype, n: int) -> torch.Tensor:
        t = self._bufs.get((name, dtype))
        if t is None or t.numel() < n:  # never a short view: grow (a backend sized it too small)
            t = torch.empty(max(n, self.sizes.get(name, self.max_elems)), dtype=dtype, device=self.device)
            self._bufs[(name, dtype)] = t
        return t[:n]

    def release(self) -> None:
        """Drop every scratch buffer (the device memory goes back to the allocator)."""
        self._bufs.clear()
        self._divisors.clear()

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
        t = self._divisors.get((total, dtype))  # made once: no allocation per node
        if t is None:
            t = self._divisors[(total, dtype)] = torch.full((), total, dtype=dtype, device=self.device)
        return t

    def mean(self, views: list[torch.Tensor], weights: list[float], outs: list[torch.Tensor]) -> torch.Tensor:
        """Weighted mean of ``views`` written into each of ``outs``; returns "all finite"."""
        n = views[0].numel()
        dt = torch.float64
        acc = self.buf("acc", dt, n)
        self.load(acc, views[0])
        if weights[0] != 1.0:
            acc.mul_(weights[0])
        if len(views) > 1:
            tmp = self.buf("tmp", dt, n)
            for v, w in zip(views[1:], weights[1:]):
                self.load(tmp, v)
                if w != 1.0:
                    tmp.mul_(w)  # then add: never fused into an FMA (see the module docstring)
                acc.add_(tmp)
        finite = all_finite(acc)
        total = math.fsum(weights)
        if total != 1.0:
            acc.div_(self.divisor(total, dt))
        for out in outs:
            self.narrow(acc, out)
        return finite

    def copy(self, view: torch.Tensor, outs: list[torch.Tensor], check: bool) -> torch.Tensor | None:
        """One source into ``outs`` (bit-exact where the dtype matches); "all finite" if checked."""
        finite = all_finite(view) if check else None
        for out in outs:
            self.narrow(view, out)
        return finite

    def finite(self, view: torch.Tensor) -> bool:
        return bool(all_finite(view))

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


def all_finite(t: torch.Tensor) -> torch.Tensor:
    """0-dim bool: no NaN/Inf in ``t`` (element-wise, so no overflow whatever the values)."""
    if t.dtype not in _FINITE_DIRECT:  # fp8: isfinite is not implemented; fp32 holds it exactly
        t = t.to(torch.float32)
    return torch.isfinite(t).all()


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
