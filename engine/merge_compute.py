"""The arithmetic of a merge item, on the CPU or on a CUDA GPU.

``Kernel`` holds the exact-mean recipe used on every device:

- accumulate in fp32 when every product and sum is exact there (fp16/fp8 sources, weights with
  few significant bits: see ``engine.plan._accumulator``), else in fp64;
- convert each source into a preallocated accumulator-dtype buffer and add it (on the CPU a
  mixed-dtype ``add_`` is ~10x slower than copy-then-add);
- divide once by the total weight (a true division: on CUDA by a device tensor, because torch
  turns division by a host scalar into multiplication by its reciprocal, which rounds twice);
- narrow fp64 results to fp16/bf16 through fp32 with round-to-odd, so the value is rounded
  once, correctly, instead of twice.

A NaN or Inf in any source makes the sum non-finite; the kernel returns that flag (a 0-dim
tensor, so the GPU need not synchronise) and the backend then finds which source it was.

``CpuBackend`` walks each slice in sub-chunks that stay in cache, with torch's intra-op threads
on all cores. ``CudaBackend`` copies an item's read buffer (pinned host memory) to the GPU on a
copy stream, computes on a compute stream, copies the results back to a pinned output buffer
and lets the caller collect them one item later, so transfers, compute and file I/O overlap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .merge_layout import Item, Segment
from .plan import ARANGE, COPY, MergePlan
from .safetensors_io import DTYPES

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
        finite = torch.isfinite(acc.sum())
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
            finite = torch.isfinite(t.sum())
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
            out.copy_(self.round_to_odd_f32(src))
        else:
            out.copy_(src)

    def round_to_odd_f32(self, src: torch.Tensor) -> torch.Tensor:
        """fp64 -> fp32 rounded to odd: exact values stay, inexact ones take the odd one of the
        two neighbouring floats, so a later rounding to <= 22 bits is the correct rounding."""
        n = src.numel()
        f = self.buf("odd32", torch.float32, n)
        f.copy_(src)
        back = self.buf("odd64", torch.float64, n)
        back.copy_(f)
        fix = (back != src) & ((f.view(torch.int32) & 1) == 0)
        if bool(fix.any()):
            toward = torch.where(back < src, float("inf"), float("-inf")).to(torch.float32)
            f.copy_(torch.where(fix, torch.nextafter(f, toward), f))
        return f


def arange_values(dtype: str, numel: int) -> torch.Tensor:
    return torch.arange(numel, dtype=torch.float64).to(DTYPES[dtype].torch_dtype)


def _view(buf: torch.Tensor, offset: int, nbytes: int, dtype: str) -> torch.Tensor:
    return buf[offset: offset + nbytes].view(DTYPES[dtype].torch_dtype)


def _node_parts(plan: MergePlan, seg: Segment, ns, excluded: dict[int, set]):
    node = plan.nodes[ns.node]
    slices = [seg.sources[i] for i in ns.sources]
    skip = excluded.get(ns.node, ())
    kept = [s for s in slices if (s.file, s.key) not in skip]
    return node, kept


# --------------------------------------------------------------------------- CPU


class CpuBackend:
    """Computes each item at once on the calling thread (torch uses every core inside ops)."""

    name = "cpu"

    def __init__(self, plan: MergePlan, sub_elems: int = 1 << 20):
        self.plan = plan
        self.sub = max(1, sub_elems)
        self.kernel = Kernel(torch.device("cpu"), self.sub)
        self.device = torch.device("cpu")

    def alloc(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def submit(self, item: Item, read_buf: torch.Tensor, out_buf: torch.Tensor, excluded: dict[int, set]):
        bads: list[Bad] = []
        for seg in item.segments:
            for ns in seg.nodes:
                bad = self._node(seg, ns, read_buf, out_buf, excluded)
                if bad is not None:
                    bads.append(bad)
        return bads

    def finish(self, handle) -> list[Bad]:
        return handle

    def _node(self, seg: Segment, ns, read_buf, out_buf, excluded) -> Bad | None:
        node, kept = _node_parts(self.plan, seg, ns, excluded)
        n = seg.numel
        outs = {d: _view(out_buf, off, n * DTYPES[d].itemsize, d) for d, off in ns.outs.items()}
        if node.kind == ARANGE:
            for out in outs.values():
                out.copy_(arange_values(node.dtype, n))
            return None
        if not kept:
            return Bad(seg, ns.node, [])
        views = [_view(read_buf, s.buf_offset, s.nbytes, s.dtype) for s in kept]
        weights = [s.weight for s in kept]
        k = self.kernel
        for a in range(0, n, self.sub):
            b = min(n, a + self.sub)
            parts = [o[a:b] for o in outs.values()]
            if node.kind == COPY:
                finite = k.copy(views[0][a:b], parts, node.check_finite)
            else:
                finite = k.mean([v[a:b] for v in views], weights, node.acc, parts)
            if finite is not None and not bool(finite):
                culprits = [(s.file, s.key) for s, v in zip(kept, views) if not k.finite(v[a:b])]
                return Bad(seg, ns.node, culprits)
        return None


# --------------------------------------------------------------------------- CUDA


@dataclass
class _Pending:
    item: Item
    flags: list[tuple[Segment, object, torch.Tensor]] = field(default_factory=list)
    done: object = None
    dev_in: torch.Tensor | None = None
    excluded: dict = field(default_factory=dict)


class CudaBackend:
    """Two items in flight: item i computes while item i-1's results travel back; the caller
    reuses an item's host buffers only after ``finish`` (which waits for its copies)."""

    name = "cuda"

    def __init__(self, plan: MergePlan, device: torch.device, buffer_bytes: int, max_elems: int):
        self.plan = plan
        self.device = device
        torch.cuda.set_device(device)
        self.copy_stream = torch.cuda.Stream(device)
        self.compute_stream = torch.cuda.Stream(device)
        self.dev_in = [torch.empty(buffer_bytes, dtype=torch.uint8, device=device) for _ in range(2)]
        self.dev_out = [torch.empty(buffer_bytes, dtype=torch.uint8, device=device) for _ in range(2)]
        self.kernel = Kernel(device, max_elems)
        self._turn = 0

    def alloc(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def submit(self, item: Item, read_buf: torch.Tensor, out_buf: torch.Tensor, excluded: dict[int, set]) -> _Pending:
        k = self._turn
        self._turn ^= 1
        din, dout = self.dev_in[k], self.dev_out[k]
        pending = _Pending(item, dev_in=din, excluded=excluded)
        with torch.cuda.stream(self.copy_stream):
            din[: item.read_bytes].copy_(read_buf[: item.read_bytes], non_blocking=True)
            arrived = torch.cuda.Event()
            arrived.record(self.copy_stream)
        with torch.cuda.stream(self.compute_stream):
            self.compute_stream.wait_event(arrived)
            for seg in item.segments:
                for ns in seg.nodes:
                    flag = self._node(seg, ns, din, dout, excluded)
                    if flag is not None:
                        pending.flags.append((seg, ns, flag))
            out_buf[: item.out_bytes].copy_(dout[: item.out_bytes], non_blocking=True)
            pending.done = torch.cuda.Event()
            pending.done.record(self.compute_stream)
        return pending

    def _node(self, seg: Segment, ns, din, dout, excluded):
        node, kept = _node_parts(self.plan, seg, ns, excluded)
        n = seg.numel
        outs = [_view(dout, off, n * DTYPES[d].itemsize, d) for d, off in ns.outs.items()]
        if node.kind == ARANGE:
            for out in outs:
                out.copy_(arange_values(node.dtype, n).to(self.device, non_blocking=False))
            return None
        if not kept:
            return torch.zeros((), dtype=torch.bool, device=self.device)
        views = [_view(din, s.buf_offset, s.nbytes, s.dtype) for s in kept]
        if node.kind == COPY:
            return self.kernel.copy(views[0], outs, node.check_finite)
        return self.kernel.mean(views, [s.weight for s in kept], node.acc, outs)

    def finish(self, pending: _Pending) -> list[Bad]:
        pending.done.synchronize()
        if not pending.flags:
            return []
        values = torch.stack([f for _, _, f in pending.flags]).cpu().tolist()
        bads = []
        for (seg, ns, _), ok in zip(pending.flags, values):
            if ok:
                continue
            node, kept = _node_parts(self.plan, seg, ns, pending.excluded)
            culprits = []
            with torch.cuda.stream(self.compute_stream):
                for s in kept:
                    if not self.kernel.finite(_view(pending.dev_in, s.buf_offset, s.nbytes, s.dtype)):
                        culprits.append((s.file, s.key))
            bads.append(Bad(seg, ns.node, culprits))
        return bads
