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
import os
import queue
import threading
from dataclasses import dataclass, field

import torch

from .merge_layout import Item, Segment
from .plan import ARANGE, COPY, MergePlan
from .safetensors_io import DTYPES

_ACC = {"F32": torch.float32, "F64": torch.float64}
# CPU workers by default: the work is memory-bound well before this, and each worker in flight
# holds a read and an output buffer.
MAX_WORKERS = 8
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


# --------------------------------------------------------------------------- CPU


class _Job:
    def __init__(self, item: Item, read_buf, out_buf, excluded):
        self.item, self.read_buf, self.out_buf, self.excluded = item, read_buf, out_buf, excluded
        self.done = threading.Event()
        self.bads: list[Bad] = []
        self.error: BaseException | None = None


class CpuBackend:
    """Items computed by worker threads, one item per worker at a time, each worker with one
    torch thread. Parallel items instead of torch's intra-op threads: OpenMP's barriers stall
    when another thread (our reader or writer, or another program) holds a core, which made
    each op ~30x slower on a busy 2-core machine."""

    name = "cpu"

    def __init__(self, plan: MergePlan, sub_elems: int = 1 << 20, workers: int = 0):
        self.plan = plan
        self.sub = max(1, sub_elems)
        self.device = torch.device("cpu")
        self.depth = workers or min(cpu_count(), MAX_WORKERS)
        self._jobs: queue.Queue = queue.Queue()
        self._threads = [threading.Thread(target=self._work, name=f"merge-cpu-{i}", daemon=True)
                         for i in range(self.depth)]
        for th in self._threads:
            th.start()

    def alloc(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def submit(self, item: Item, read_buf: torch.Tensor, out_buf: torch.Tensor, excluded: dict[int, set]) -> _Job:
        job = _Job(item, read_buf, out_buf, excluded)
        self._jobs.put(job)
        return job

    def finish(self, job: _Job) -> list[Bad]:
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.bads

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        for th in self._threads:
            th.join()

    def _work(self) -> None:
        torch.set_num_threads(1)  # this thread only (an OpenMP per-thread setting)
        kernel = Kernel(self.device, self.sub)
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                for seg in job.item.segments:
                    for ns in seg.nodes:
                        bad = self._node(kernel, seg, ns, job)
                        if bad is not None:
                            job.bads.append(bad)
            except BaseException as e:  # handed to the merge thread by finish()
                job.error = e
            finally:
                job.done.set()

    def _node(self, k: Kernel, seg: Segment, ns, job: _Job) -> Bad | None:
        node, kept, factors = _node_parts(self.plan, seg, ns, job.excluded)
        n = seg.numel
        outs = {d: _view(job.out_buf, off, n * DTYPES[d].itemsize, d) for d, off in ns.outs.items()}
        if node.kind == ARANGE:
            for out in outs.values():
                out.copy_(arange_values(node.dtype, n))
            return None
        if not kept:
            return Bad(seg, ns.node, [])
        views = [_view(job.read_buf, s.buf_offset, s.nbytes, s.dtype) for s in kept]
        for a in range(0, n, self.sub):
            b = min(n, a + self.sub)
            parts = [o[a:b] for o in outs.values()]
            if node.kind == COPY:
                finite = k.copy(views[0][a:b], parts, node.check_finite)
            else:
                finite = k.mean([v[a:b] for v in views], factors, node.acc, parts)
            if finite is not None and not bool(finite):
                culprits = [(s.file, s.key) for s, v in zip(kept, views) if not k.finite(v[a:b])]
                return Bad(seg, ns.node, culprits)
        return None


def cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


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
    depth = 2

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
        node, kept, factors = _node_parts(self.plan, seg, ns, excluded)
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
        return self.kernel.mean(views, factors, node.acc, outs)

    def finish(self, pending: _Pending) -> list[Bad]:
        pending.done.synchronize()
        if not pending.flags:
            return []
        values = torch.stack([f for _, _, f in pending.flags]).cpu().tolist()
        bads = []
        for (seg, ns, _), ok in zip(pending.flags, values):
            if ok:
                continue
            node, kept, _ = _node_parts(self.plan, seg, ns, pending.excluded)
            culprits = []
            with torch.cuda.stream(self.compute_stream):
                for s in kept:
                    if not self.kernel.finite(_view(pending.dev_in, s.buf_offset, s.nbytes, s.dtype)):
                        culprits.append((s.file, s.key))
            bads.append(Bad(seg, ns.node, culprits))
        return bads

    def close(self) -> None:
        torch.cuda.synchronize(self.device)
