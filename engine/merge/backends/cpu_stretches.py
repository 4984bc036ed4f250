"""The CPU backend reading its own sources from the page cache: a segment's slices are read a
stretch of elements at a time into the worker's scratch buffer (a few MB, which stays in the
CPU's cache) and merged from there by the fused kernels, every node of the segment at once.

Why: the reader threads copy an item's sources into a 64 MB read buffer, far larger than the
cache, so the copy writes them out to memory and the kernel then reads them back from it. On the
project's 2-vCPU machines that copy ran at 2.1-2.6 GB/s, the same ``pread`` into a buffer that
stays in the cache at 9-13 GB/s, and one thread reading and merging stretches of 3 fp16 models
went 1.3-1.6 -> 3.2-3.7 GB/s of input (docs/benchmarks.md). Past the page cache (O_DIRECT), with
a read limit, or without numba the reader threads still read whole items.

The bytes are those of the whole-item path: a kernel call on a stretch is the kernel's call on
the whole slice cut at other element boundaries, and every kernel computes each element on its
own (the method kernel's DARE hash and DELLA bits are indexed by the element's place in the
key, passed as ``start``). A node the fused kernels leave to torch (integer tensors, fp8,
unchecked copies) is read whole into the read buffer and computed as before, and so is a node
whose result is not finite, so that the NaN policy blames the same sources.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from engine.checkpoint.format import DTYPES
from engine.merge.arithmetic import _node_parts
from engine.merge.backends.base import Bad
from engine.merge.layout import ALIGN, NodeSlice, Segment, SourceSlice, align
from engine.methods import streamed
from engine.plan.model import ARANGE, METHOD


@dataclass
class _Call:
    """One node's fused kernel call, repeated on each stretch."""

    ns: NodeSlice
    node: object
    base: SourceSlice | None  # a method's base
    srcs: list[SourceSlice]  # the node's read slices as the whole-item path has them (base first)
    factors: list[float]
    shas: list
    stats: object
    bad_at: int = -1  # the first non-finite element of the segment (-1: none yet)


@dataclass
class Outcome:
    """What ``Stretches.merge`` did with a segment: the nodes it left out for the caller's
    whole-item path (``rest``: ARANGE ones need no read, the others the read buffer), the Bads
    known before anything was computed (a node with every source left out, a median's blamed
    sources), and the fused nodes whose result was not finite, with the first such element."""

    rest: list["_Rest"]
    bads: list[Bad]
    failed: list[tuple[NodeSlice, list[SourceSlice], int]]

    @property
    def needs_read_buffer(self) -> bool:
        return bool(self.failed) or any(not r.arange for r in self.rest)


class Stretches:
    def __init__(self, plan, fused, reads, stretch_bytes: int):
        self.plan = plan
        self.fused = fused  # engine.merge.backends.cpu_fused.FusedNodes
        self.reads = reads  # engine.merge.slice_reads.SliceReads
        # a worker's scratch: every read slice of a stretch, in the L2/L3 cache (Tuning.stretch_bytes),
        # or at least one element of each source of the plan's widest step
        widest = max((len(step.sources) for step in plan.steps), default=1)
        self.scratch_bytes = max(stretch_bytes, widest * align(8))

    def merge(self, seg: Segment, excluded: dict[int, set], stats: dict, scratch, out_buf) -> Outcome:
        """Every node of ``seg`` the fused kernels do, stretch by stretch from ``scratch`` (a
        worker's byte tensor of ``scratch_bytes``) into ``out_buf``."""
        calls, rest, bads = [], [], []
        for ns in seg.nodes:
            got = self._call(seg, ns, excluded, stats)
            if isinstance(got, Bad):
                bads.append(got)
            elif got is None:
                rest.append(_Rest(ns, self.plan.nodes[ns.node].kind == ARANGE))
            else:
                calls.append(got)
        if calls:
            self._run(seg, calls, scratch, out_buf)
        failed = [(c.ns, c.srcs, c.bad_at) for c in calls if c.bad_at >= 0]
        return Outcome(rest, bads, failed)

    def _call(self, seg: Segment, ns: NodeSlice, excluded: dict[int, set], stats: dict) -> _Call | Bad | None:
        """The node's fused call, the Bad the whole-item path would return before computing, or
        None for a node left to that path."""
        node = self.plan.nodes[ns.node]
        if node.kind == METHOD:
            node, base, base_out, kept, factors, shas = streamed.method_parts(self.plan, seg, ns, excluded)
            if base_out or not kept:
                return Bad(seg, ns.node, [])
            st = stats.get(ns.node)
            kept, factors, shas, blamed = streamed.element_models(node, kept, factors, shas, st)
            if blamed:
                return Bad(seg, ns.node, blamed)
            if not self.fused.takes_method(node, base, kept, ns.outs, st):
                return None
            return _Call(ns, node, base, [base, *kept] if base is not None else kept, factors, shas, st)
        if node.kind == ARANGE:
            return None
        node, kept, factors = _node_parts(self.plan, seg, ns, excluded)
        if not kept:
            return Bad(seg, ns.node, [])
        if not self.fused.takes_mean(node, kept, ns.outs):
            return None
        return _Call(ns, node, None, kept, factors, [], None)

    def _run(self, seg: Segment, calls: list[_Call], scratch, out_buf) -> None:
        # every slice a call reads, once, at its place in the scratch buffer
        used: dict[int, SourceSlice] = {}
        for c in calls:
            for s in c.srcs:
                used.setdefault(id(s), s)
        width = sum(DTYPES[s.dtype].itemsize for s in used.values())
        step = min(seg.numel, max(1, (scratch.numel() - ALIGN * len(used)) // max(width, 1)))
        place, at = {}, 0
        for ident, s in used.items():
            place[ident] = dataclasses.replace(s, buf_offset=at)
            at += align(step * DTYPES[s.dtype].itemsize)
        if at > scratch.numel():
            raise AssertionError(f"stretch of {at} bytes in a scratch of {scratch.numel()}")
        view = memoryview(scratch.numpy())
        moved = [([place[id(s)] for s in c.srcs], c) for c in calls]
        for a in range(0, seg.numel, step):
            b = min(seg.numel, a + step)
            for s in used.values():
                p = place[id(s)]
                self.reads.read(s, a, b, view[p.buf_offset:])
            for srcs, c in moved:
                if c.bad_at >= 0:
                    continue  # the whole-item path computes it again for the NaN policy
                outs = {d: off + a * DTYPES[d].itemsize for d, off in c.ns.outs.items()}
                if c.node.kind == METHOD:
                    base, kept = (srcs[0], srcs[1:]) if c.base is not None else (None, srcs)
                    got = self.fused.method(c.node, base, kept, c.factors, c.shas, c.stats, outs, seg.start + a,
                                            b - a, scratch, out_buf)
                else:
                    got = self.fused.compute(c.node, srcs, c.factors, outs, b - a, scratch, out_buf)
                if got is None:
                    raise AssertionError(f"the fused kernels refused {c.node.key} after taking it")
                if got >= 0:
                    c.bad_at = a + got


@dataclass
class _Rest:
    """A node left to the whole-item path; ``arange``: it reads nothing (position ids)."""

    ns: NodeSlice
    arange: bool
