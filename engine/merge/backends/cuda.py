"""The CUDA backend: pinned staging buffers, copies on their own stream, compute on the GPU."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.checkpoint.format import DTYPES
from engine.merge.arithmetic import Kernel, _node_parts, _view, arange_values
from engine.merge.backends.base import Bad
from engine.merge.layout import Item, Segment
from engine.plan.model import ARANGE, COPY, MergePlan

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
        return self.kernel.mean(views, factors, outs)

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
