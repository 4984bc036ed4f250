"""What the merge's orchestration asks of a place that computes items, so that it never
needs to know whether that is CPU threads, a GPU, or a test double.

The run hands out items in order: for each it takes a read buffer the readers filled and a
free output buffer, calls ``submit``, keeps at most ``depth`` items in flight, and calls
``finish`` on the oldest before reusing its buffers. ``finish`` returns the nodes whose result
was not finite (``Bad``), with the sources to blame; the NaN policy decides what follows.
``close`` is called exactly once, on success, error and cancel alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from engine.checkpoint.direct_io import BLOCK

if TYPE_CHECKING:
    import torch

    from engine.merge.layout import Item, Segment


@dataclass
class Bad:
    """A non-finite result: ``sources`` are the plan Sources (file, key) holding NaN/Inf."""

    segment: "Segment"
    node: int
    sources: list[tuple[int, str]]


class Backend(Protocol):
    name: str
    depth: int  # items in flight at most; the run keeps this many buffers more

    def alloc(self, nbytes: int) -> "torch.Tensor":
        """A host byte buffer for reads or results (pinned where the device wants it)."""

    def submit(self, item: "Item", read_buf: "torch.Tensor", out_buf: "torch.Tensor",
               excluded: dict[int, set[tuple[int, str]]]) -> object:
        """Start computing ``item`` from ``read_buf`` into ``out_buf``, leaving out the
        (file, key) sources in ``excluded`` per node; returns a handle for ``finish``."""

    def finish(self, handle: object) -> list[Bad]:
        """Wait for the item of ``handle``; its buffers may be reused afterwards."""

    def close(self) -> None:
        """Release threads and device memory; the run calls it exactly once."""


def page_aligned(raw: "torch.Tensor", nbytes: int) -> "torch.Tensor":
    """The ``nbytes`` of ``raw`` (allocated ``nbytes + BLOCK`` long) that start on a page: the
    layout puts each large result where its address is congruent to its file offset, and the
    output's O_DIRECT writes take it from where it lies (engine.checkpoint.direct_io)."""
    skip = -raw.data_ptr() % BLOCK
    return raw[skip:skip + nbytes]
