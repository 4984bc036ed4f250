"""How a merge plan is cut into work items that fit fixed-size buffers.

A *segment* is an element range of one step (all of a small tensor, or a chunk of a large one);
an *item* packs consecutive segments until its read bytes or its output bytes would overflow
one buffer. Every source range of an item is read into one read buffer and every result goes
to one output buffer, so memory is a few buffers, whatever the number of models or the size of
the largest tensor. Chunks get smaller as the number of sources grows, which keeps the bytes in
flight constant.

Offsets inside buffers are aligned to 64 bytes so that byte views can be reinterpreted as any
dtype (and stay cache-line aligned). With ``positions`` (where each node's tensor starts in the
output file that writes it first), a result of 64 KiB or more is placed instead where its
address is congruent to its file offset modulo the disk block (output buffers are page-aligned):
its whole blocks are then written straight from the output buffer (``DirectAppendFile``'s lent
writes), not copied into a staging buffer first. That costs up to a block of padding a result.

A geometric median's models are not read into the buffers (``SourceSlice.read`` false, no room
taken): the median is computed from the files by its statistics (``engine.methods.median``),
which also count their NaN/Inf values, so the element pass needs only the base. A source that
another output of the same key merges otherwise is read as usual.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.checkpoint.direct_io import BLOCK, LENT_MIN
from engine.checkpoint.format import DTYPES
from engine.plan.model import ARANGE, METHOD, MergePlan

ALIGN = 64


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class SourceSlice:
    file: int  # index into plan.files
    key: str  # stored key
    dtype: str
    weight: float
    file_offset: int  # absolute file offset of this slice
    nbytes: int
    buf_offset: int  # offset in the item's read buffer; -1: not read (a median's model)

    @property
    def read(self) -> bool:
        """Whether the element pass reads this slice (a median's models it does not)."""
        return self.buf_offset >= 0


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
    held_bytes: int = 0  # the medians' results its slices use (fp64, held by their statistics)
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


def build_items(plan: MergePlan, buffer_bytes: int, start_step: int = 0,
                positions: dict[tuple[int, str], int] | None = None) -> list[Item]:
    """Items for steps ``start_step``.. of ``plan``, each fitting ``buffer_bytes`` of reads and
    ``buffer_bytes`` of outputs; ``positions``: (node, dtype) -> file offset of the tensor that
    the output buffer's results are lent to (``output_positions``)."""
    dtypes = node_dtypes(plan)
    positions = positions or {}
    items: list[Item] = []
    current = Item(0)
    for si in range(start_step, len(plan.steps)):
        step = plan.steps[si]
        numel = plan.nodes[step.nodes[0]].numel
        unread = unread_sources(plan, si)
        # a median's result (fp64, computed by its statistics) is held while the item is in flight:
        # counted as read bytes, so that items hold as many elements as when its models were read
        held = 8 * sum(is_median(plan.nodes[nid]) for nid in step.nodes)
        src_cost = held + sum(DTYPES[s.dtype].itemsize for s in step.sources if (s.file, s.key) not in unread)
        out_cost = sum(DTYPES[d].itemsize for nid in step.nodes for d in dtypes[nid])
        # Room for the per-slice alignment padding; a chunk alone always fits an empty buffer.
        room = buffer_bytes - ALIGN * (len(step.sources) + sum(len(dtypes[n]) for n in step.nodes))
        cost = max(src_cost, out_cost, 1)
        # results laid out on their file's block grid: a block of padding more each
        lend = _lent_slots(positions, step, dtypes, min(numel, max(1, room // cost)), room)
        room -= BLOCK * len(lend)
        chunk = numel if plan.nodes[step.nodes[0]].kind == ARANGE else max(1, room // cost)
        for start in range(0, max(numel, 1), chunk):
            stop = min(numel, start + chunk)
            n = stop - start
            read = held * n + sum(align(n * DTYPES[s.dtype].itemsize) for s in step.sources
                                  if (s.file, s.key) not in unread)
            out = sum(align(n * DTYPES[d].itemsize) + (BLOCK + ALIGN if _lent(lend, nid, d, n) else 0)
                      for nid in step.nodes for d in dtypes[nid])
            if current.segments and (
                current.read_bytes + current.held_bytes + read > buffer_bytes or current.out_bytes + out > buffer_bytes
            ):
                items.append(current)
                current = Item(len(items))
            current.segments.append(_segment(plan, si, start, stop, current, dtypes, unread, lend, buffer_bytes))
            current.held_bytes += held * n
    if current.segments:
        items.append(current)
    return items


def is_median(node) -> bool:
    """A merge-method node whose combine is the geometric median."""
    return node.kind == METHOD and node.method.combine == "median"


def unread_sources(plan: MergePlan, si: int) -> set[tuple[int, str]]:
    """The (file, stored key) sources of step ``si`` that only geometric medians merge, as models:
    the element pass does not read them."""
    medians: set[tuple[int, str]] = set()
    others: set[tuple[int, str]] = set()
    for nid in plan.steps[si].nodes:
        node = plan.nodes[nid]
        srcs = [(s.file, s.key) for s in node.sources]
        if is_median(node):
            lead = 1 if node.method.base is not None else 0
            others.update(srcs[:lead])
            medians.update(srcs[lead:])
        else:
            others.update(srcs)
    return medians - others


def output_positions(writes: list[list[Write]], data_offset) -> dict[tuple[int, str], int]:
    """(node, dtype) -> where the first output that stores the node in that dtype has its
    tensor (``data_offset(output, tensor)``): the file its results are laid out for."""
    positions: dict[tuple[int, str], int] = {}
    for step in writes:
        for w in step:
            positions.setdefault((w.node, w.dtype), data_offset(w.output, w.tensor))
    return positions


def _lent_slots(positions: dict, step, dtypes, chunk: int, room: int) -> dict[tuple[int, str], int]:
    """The (node, dtype) results of a step laid out on their file's block grid, with their file
    offsets: those whose chunks reach ``LENT_MIN`` bytes, unless their padding (a block each)
    would take over a quarter of the buffer's room (small buffers: a test's)."""
    lend = {}
    for nid in step.nodes:
        for d in dtypes[nid]:
            pos = positions.get((nid, d))
            size = DTYPES[d].itemsize
            if pos is not None and pos % size == 0 and chunk * size >= LENT_MIN:
                lend[(nid, d)] = pos
    return lend if 4 * BLOCK * len(lend) <= room else {}


def _lent(lend: dict, nid: int, dtype: str, n: int) -> bool:
    """A slice of ``n`` elements of node ``nid`` in ``dtype`` is laid out on its file's block grid."""
    return (nid, dtype) in lend and n * DTYPES[dtype].itemsize >= LENT_MIN


def _segment(plan: MergePlan, si: int, start: int, stop: int, item: Item, dtypes, unread: set,
             lend: dict, buffer_bytes: int) -> Segment:
    step = plan.steps[si]
    n = stop - start
    slices: list[SourceSlice] = []
    index: dict[tuple[int, str], int] = {}
    for s in step.sources:
        size = DTYPES[s.dtype].itemsize
        index[(s.file, s.key)] = len(slices)
        read = (s.file, s.key) not in unread
        slices.append(SourceSlice(s.file, s.key, s.dtype, s.weight, s.offset + start * size, n * size,
                                  item.read_bytes if read else -1))
        if read:
            item.read_bytes += align(n * size)
    nodes = []
    for nid in step.nodes:
        node = plan.nodes[nid]
        outs = {}
        for d in dtypes[nid]:
            size = DTYPES[d].itemsize
            at = item.out_bytes
            if _lent(lend, nid, d, n):
                # the same address modulo a block as in the file (a buffer's start is page-aligned)
                pad = (lend[(nid, d)] + start * size - at) % BLOCK
                if at + pad + n * size <= buffer_bytes:
                    at += pad
            outs[d] = at
            item.out_bytes = align(at + n * size)
        nodes.append(NodeSlice(nid, [index[(s.file, s.key)] for s in node.sources], outs))
    return Segment(si, start, stop, slices, nodes)
