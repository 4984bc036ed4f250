"""The CPU backend: items computed by worker threads, one item per worker at a time."""

from __future__ import annotations

import os
import queue
import threading

import torch

from engine.checkpoint.direct_io import BLOCK
from engine.checkpoint.format import DTYPES
from engine.merge.arithmetic import Kernel, _node_parts, _view, arange_values
from engine.merge.backends import cpu_fused
from engine.merge.backends.base import Bad, page_aligned
from engine.merge.layout import Item, Segment
from engine.methods import streamed
from engine.plan.model import ARANGE, COPY, METHOD, MergePlan

# CPU workers by default: the work is memory-bound well before this, and each worker in flight
# holds a read and an output buffer.
MAX_WORKERS = 8


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
        # numba's fused kernels where numba is installed (same bytes, a few times faster)
        self.fused = cpu_fused.FusedNodes(plan.uses_methods) if cpu_fused.wanted() else None
        self.sub = max(1, sub_elems)
        self.device = torch.device("cpu")
        self.depth = workers or min(cpu_count(), MAX_WORKERS)
        self.stretches = None  # set by read_sources: this backend reads the sources itself
        self._jobs: queue.Queue = queue.Queue()
        self._threads = [threading.Thread(target=self._work, name=f"merge-cpu-{i}", daemon=True)
                         for i in range(self.depth)]
        for th in self._threads:
            th.start()

    def read_sources(self, reads, stretch_bytes: int) -> bool:
        """Read the sources itself, ``stretch_bytes`` at a time, just before merging them
        (``cpu_stretches``; ``reads``: an ``engine.merge.slice_reads.SliceReads``), instead of
        taking them from read buffers: only with the fused kernels. Returns whether it will; the
        pipeline's readers then read nothing for it."""
        if self.fused is None or self.fused._kernels() is None:
            return False
        from engine.merge.backends.cpu_stretches import Stretches

        self.stretches = Stretches(self.plan, self.fused, reads, stretch_bytes)
        return True

    def alloc(self, nbytes: int) -> torch.Tensor:
        return page_aligned(torch.empty(nbytes + BLOCK, dtype=torch.uint8), nbytes)

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
        scratch = None  # this worker's stretch buffer, when the backend reads its sources
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                for seg in job.item.segments:
                    if self.stretches is not None:
                        if scratch is None:
                            scratch = torch.empty(self.stretches.scratch_bytes, dtype=torch.uint8)
                        job.bads.extend(self._stretched(kernel, seg, job, scratch))
                        continue
                    for ns in seg.nodes:
                        bad = self._node(kernel, seg, ns, job)
                        if bad is not None:
                            job.bads.append(bad)
            except BaseException as e:  # handed to the merge thread by finish()
                job.error = e
            finally:
                job.done.set()

    def _stretched(self, k: Kernel, seg: Segment, job: _Job, scratch: torch.Tensor) -> list[Bad]:
        """A segment whose sources this backend reads: the fused nodes a stretch at a time; the
        rest, and a node whose result was not finite (to blame the sources the whole-item path
        blames), from the segment read whole into the read buffer."""
        done = self.stretches.merge(seg, job.excluded, job.item.stats, scratch, job.out_buf)
        bads = list(done.bads)
        if done.needs_read_buffer:
            self.stretches.reads.read_segment(seg, memoryview(job.read_buf.numpy()))
        for r in done.rest:
            bad = self._node(k, seg, r.ns, job)
            if bad is not None:
                bads.append(bad)
        for ns, srcs, bad_at in done.failed:
            views = [_view(job.read_buf, s.buf_offset, s.nbytes, s.dtype) for s in srcs]
            bads.append(self._fused_bad(k, seg, ns, srcs, views, bad_at))
        order = {ns.node: i for i, ns in enumerate(seg.nodes)}
        return sorted(bads, key=lambda b: order[b.node])  # as the whole-item path finds them

    def _node(self, k: Kernel, seg: Segment, ns, job: _Job) -> Bad | None:
        if self.plan.nodes[ns.node].kind == METHOD:
            return self._method(k, seg, ns, job)
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
        bad_at = None if self.fused is None else self.fused.compute(node, kept, factors, ns.outs, n, job.read_buf,
                                                                    job.out_buf)
        if bad_at is not None:
            return None if bad_at < 0 else self._fused_bad(k, seg, ns, kept, views, bad_at)
        for a in range(0, n, self.sub):
            b = min(n, a + self.sub)
            parts = [o[a:b] for o in outs.values()]
            if node.kind == COPY:
                finite = k.copy(views[0][a:b], parts, node.check_finite)
            else:
                finite = k.mean([v[a:b] for v in views], factors, parts)
            if finite is not None and not bool(finite):
                culprits = [(s.file, s.key) for s, v in zip(kept, views) if not k.finite(v[a:b])]
                return Bad(seg, ns.node, culprits)
        return None

    def _method(self, k: Kernel, seg: Segment, ns, job: _Job) -> Bad | None:
        """A merge method's slice (``engine.methods.streamed``), in sub-chunks of ``sub``."""
        node, base, base_out, kept, factors, shas = streamed.method_parts(self.plan, seg, ns, job.excluded)
        if base_out or not kept:
            return Bad(seg, ns.node, [])
        stats = job.item.stats.get(ns.node)
        kept, factors, shas, blamed = streamed.element_models(node, kept, factors, shas, stats)
        if blamed:
            return Bad(seg, ns.node, blamed)
        n = seg.numel
        outs = [_view(job.out_buf, off, n * DTYPES[d].itemsize, d) for d, off in ns.outs.items()]
        srcs = [base, *kept] if base is not None else kept
        views = [_view(job.read_buf, s.buf_offset, s.nbytes, s.dtype) for s in srcs]
        base_view, model_views = (views[0], views[1:]) if base is not None else (None, views)
        idents = [(s.file, s.key) for s in kept]
        bad_at = None if self.fused is None else self.fused.method(node, base, kept, factors, shas, stats, ns.outs,
                                                                   seg.start, n, job.read_buf, job.out_buf)
        if bad_at is not None:
            return None if bad_at < 0 else self._fused_bad(k, seg, ns, srcs, views, bad_at)
        for a in range(0, n, self.sub):
            b = min(n, a + self.sub)
            finite = streamed.compute(k, node.method, node.key, seg.start + a,
                                      None if base_view is None else base_view[a:b], [v[a:b] for v in model_views],
                                      factors, shas, node.scale, [o[a:b] for o in outs], stats, idents)
            if not bool(finite):
                return Bad(seg, ns.node, [(s.file, s.key) for s, v in zip(srcs, views) if not k.finite(v[a:b])])
        return None

    def _fused_bad(self, k: Kernel, seg: Segment, ns, srcs, views, bad_at: int) -> Bad:
        """The sources not finite in the sub-chunk where the torch kernel would have stopped."""
        a = bad_at - bad_at % self.sub
        b = min(seg.numel, a + self.sub)
        return Bad(seg, ns.node, [(s.file, s.key) for s, v in zip(srcs, views) if not k.finite(v[a:b])])


def cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
