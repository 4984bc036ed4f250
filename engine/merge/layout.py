"""How a merge plan is cut into work items that fit fixed-size buffers.

A *segment* is an element range of one step (all of a small tensor, or a chunk of a large one);
an *item* packs consecutive segments until its read bytes or its output bytes would overflow
one buffer. Every source range of an item is read into one read buffer and every result goes
to one output buffer, so memory is a few buffers, whatever the number of models or the size of
the largest tensor. Chunks get smaller as the number of sources grows, which keeps the bytes in
flight constant.

Offsets inside buffers are aligned to 64 bytes so that byte views can be reinterpreted as any
dtype (and stay cache-line aligned).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.checkpoint.format import DTYPES
from engine.plan.model import ARANGE, MergePlan

ALIGN = 64


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class SourceSlice:
    file: int  # index into plan.files
    key: str  # stored key
    dtype: str
    weight: float
    file_offset: int  # absolute file offset of this slice
    nbytes: int
    buf_offset: int  # offset in the item's read buffer


@dataclass
class NodeSlice:
    node: int
    sources: list[int]  # indices into Segment.sources (in the node's source order)
    outs: dict[str, int]  # output dtype -> offset of this slice in the item's output buffer


@dataclass
class Segment:
    step: int
    start: int  # element range of the step's tensor
    stop: int
    sources: list[SourceSlice]
    nodes: list[NodeSlice]

    @property
    def numel(self) -> int:
        return self.stop - self.start


@dataclass
class Item:
    index: int
    segments: list[Segment] = field(default_factory=list)
    read_bytes: int = 0
    out_bytes: int = 0
    # method node id -> its whole-tensor statistics (engine.methods.tensor_stats), set by the
    # pipeline before the item goes to a backend
    stats: dict = field(default_factory=dict)


@dataclass
class Write:
    """Output ``output``'s tensor number ``tensor`` is node ``node`` stored as ``dtype``."""

    output: int
    tensor: int
    node: int
    dtype: str


def node_dtypes(plan: MergePlan) -> dict[int, list[str]]:
    """Every dtype each node is written in (several outputs may store one node differently)."""
    out: dict[int, set[str]] = {}
    for o in plan.outputs:
        for t, nid in zip(o.tensors, o.nodes):
            out.setdefault(nid, set()).add(t.dtype)
    return {nid: sorted(ds, key=lambda d: (-DTYPES[d].itemsize, d)) for nid, ds in out.items()}


def step_writes(plan: MergePlan) -> list[list[Write]]:
    """For each step, the output tensors it produces."""
    step_of_node = {nid: i for i, step in enumerate(plan.steps) for nid in step.nodes}
    writes: list[list[Write]] = [[] for _ in plan.steps]
    for o in plan.outputs:
        for ti, (t, nid) in enumerate(zip(o.tensors, o.nodes)):
            writes[step_of_node[nid]].append(Write(o.index, ti, nid, t.dtype))
    return writes


def step_of_tensors(plan: MergePlan) -> list[list[int]]:
    """For each output, the step that produces each of its tensors."""
    step_of_node = {nid: i for i, step in enumerate(plan.steps) for nid in step.nodes}
    return [[step_of_node[nid] for nid in o.nodes] for o in plan.outputs]


def build_items(plan: MergePlan, buffer_bytes: int, start_step: int = 0) -> list[Item]:
    """Items for steps ``start_step``.. of ``plan``, each fitting ``buffer_bytes`` of reads and
    ``buffer_bytes`` of outputs."""
    dtypes = node_dtypes(plan)
    items: list[Item] = []
    current = Item(0)
    for si in range(start_step, len(plan.steps)):
        step = plan.steps[si]
        numel = plan.nodes[step.nodes[0]].numel
        src_cost = sum(DTYPES[s.dtype].itemsize for s in step.sources)
        out_cost = sum(DTYPES[d].itemsize for nid in step.nodes for d in dtypes[nid])
        # Room for the per-slice alignment padding; a chunk alone always fits an empty buffer.
        room = buffer_bytes - ALIGN * (len(step.sources) + sum(len(dtypes[n]) for n in step.nodes))
        chunk = numel if plan.nodes[step.nodes[0]].kind == ARANGE else max(1, room // max(src_cost, out_cost, 1))
        for start in range(0, max(numel, 1), chunk):
            stop = min(numel, start + chunk)
            n = stop - start
            read = sum(_align(n * DTYPES[s.dtype].itemsize) for s in step.sources)
            out = sum(_align(n * DTYPES[d].itemsize) for nid in step.nodes for d in dtypes[nid])
            if current.segments and (
                current.read_bytes + read > buffer_bytes or current.out_bytes + out > buffer_bytes
            ):
                items.append(current)
                current = Item(len(items))
            current.segments.append(_segment(plan, si, start, stop, current, dtypes))
    if current.segments:
        items.append(current)
    return items


def _segment(plan: MergePlan, si: int, start: int, stop: int, item: Item, dtypes) -> Segment:
    step = plan.steps[si]
    n = stop - start
    slices: list[SourceSlice] = []
    index: dict[tuple[int, str], int] = {}
    for s in step.sources:
        size = DTYPES[s.dtype].itemsize
        index[(s.file, s.key)] = len(slices)
        slices.append(SourceSlice(s.file, s.key, s.dtype, s.weight, s.offset + start * size, n * size, item.read_bytes))
        item.read_bytes += _align(n * size)
    nodes = []
    for nid in step.nodes:
        node = plan.nodes[nid]
        outs = {}
        for d in dtypes[nid]:
            outs[d] = item.out_bytes
            item.out_bytes += _align(n * DTYPES[d].itemsize)
        nodes.append(NodeSlice(nid, [index[(s.file, s.key)] for s in node.sources], outs))
    return Segment(si, start, stop, slices, nodes)
