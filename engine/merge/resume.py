"""Where a run starts: each output's partial file reopened at its last durable tensor (a
resume after a crash, or a restart after a NaN skip), and the first step whose results some
output still needs. A partial file whose progress mark does not match this plan's fingerprint
is started afresh, with a warning, never continued."""

from __future__ import annotations

from typing import Callable

from engine.merge.errors import MergeError
from engine.merge.layout import step_of_tensors
from engine.merge.output import OutputStream, read_progress
from engine.plan.model import MergePlan

Warn = Callable[..., None]  # (code, message, output=...) -> None


def open_streams(plan: MergePlan, streams: list[OutputStream], resume: bool, fingerprint: str, warn: Warn) -> int:
    """Open every output (fresh, or keeping its durable tensors) and return the first step to run."""
    for s in streams:
        n = read_progress(s.target, fingerprint) if resume else None
        if resume and n is None:
            warn("resume_fresh", f"{s.target}: no progress from an earlier run of this recipe to resume; "
                 "starting it afresh", output=str(s.target))
        n = min(n or 0, s.total)
        try:
            s.open(resume_tensors=n)
        except (ValueError, OSError) as e:
            if not n:
                raise MergeError(f"{s.target}: cannot write: {getattr(e, 'strerror', None) or e}") from None
            warn("resume_fresh", f"{s.target}: the partial file does not match its progress mark ({e}); "
                 "starting it afresh", output=str(s.target))
            s.open()
    return first_needed_step(plan, streams)


def reopen_at_durable(streams: list[OutputStream]) -> None:
    """Close and reopen each stream at its last whole tensor, dropping a half-written one and
    anything parked (a restart after a NaN skip)."""
    for s in streams:
        n = s.tensors_done
        s.close()
        if n:
            s.open(resume_tensors=n)
        else:
            s.open()


def first_needed_step(plan: MergePlan, streams: list[OutputStream]) -> int:
    """The first step whose results some output still needs, given the whole tensors each
    output has on disk."""
    start = len(plan.steps)
    for s, tensor_steps in zip(streams, step_of_tensors(plan)):
        rest = tensor_steps[s.skip_below:]
        if rest:
            start = min(start, min(rest))
    return start


def resumed_source_bytes(plan: MergePlan, start: int) -> int:
    """Source bytes of the steps before ``start``: done in an earlier run."""
    return sum(s.nbytes for step in plan.steps[:start] for s in step.sources)
