"""Merge progress events: the only way the merge talks to the CLI, the TUI and job logs.

Every event is a plain dataclass; ``event_to_dict`` gives a JSON-safe dict with a ``"type"``
field and ``event_from_dict`` rebuilds the event, so a job's ``events.jsonl`` can be replayed
into the same renderer as a live merge. The merge emits at most ~10 progress events a second
(plus one per warning, output and stage), so logs stay small.

Event types (``type`` field):

``started``
    The merge is about to read data: outputs, totals, device (and the GPU's UUID, so a
    dashboard in another process finds the same card in NVML), and how many tensors a resumed
    run already had on disk.
``stage``
    The merge moved to a new stage: ``hashing`` (source hashes for provenance/pins),
    ``merging``, ``finishing`` (fsync and rename).
``progress``
    Tensors and bytes done/total, throughput (GB/s of source data read), ETA, the tensor being
    merged (in the hashing stage: the files being hashed at once, each with its progress), GPU
    memory in bytes (None where unknown): ``card_mem_used``/``card_mem_total`` for the whole
    card (every process on it) and ``process_mem_peak``, the most this merge's process held
    (torch's reserved memory), host RSS, and per-output progress (``OutputProgress``);
    ``detail`` says what is being computed on ``current_key`` while a method's whole-tensor
    statistic holds the merge there (a geometric median's iteration, model stock's cosines).
``warning``
    Something the user must know but that does not stop the merge: a key missing from some
    models of a selection, a source skipped for NaN/Inf (``skip_nan``), an integer tensor copied
    instead of averaged. ``code`` is stable (e.g. ``key_missing``, ``nan_skipped``).
``output_done``
    One output file is complete at its final path.
``finished``, ``failed``, ``cancelled``
    The end of the merge; exactly one of them is the last event.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Union


@dataclass
class OutputProgress:
    path: str
    tensors_done: int
    tensors_total: int
    bytes_done: int
    bytes_total: int


@dataclass
class Started:
    outputs: list[str]
    tensors_total: int
    bytes_to_read: int
    bytes_to_write: int
    device: str
    sources: int  # number of distinct source files read
    resumed_tensors: int = 0  # tensors already on disk from an interrupted run (0: fresh)
    device_uuid: str | None = None  # the CUDA device's UUID (GPU-... or MIG-...); None on the CPU
    type: str = "started"


@dataclass
class Stage:
    stage: str  # hashing | merging | finishing
    message: str = ""
    type: str = "stage"


@dataclass
class Progress:
    stage: str
    tensors_done: int
    tensors_total: int
    bytes_done: int  # source bytes read (or hashed, in the hashing stage)
    bytes_total: int
    bytes_written: int
    elapsed_s: float
    gbps: float  # source GB/s over the last few seconds
    eta_s: float | None
    current_key: str | None
    host_rss: int | None
    card_mem_used: int | None = None
    card_mem_total: int | None = None
    process_mem_peak: int | None = None
    outputs: list[OutputProgress] = field(default_factory=list)
    # what the merge is doing on ``current_key`` when it is more than reading and adding: a
    # method's whole-tensor statistic (``"median, iteration 12 of at most 100"``)
    detail: str | None = None
    type: str = "progress"

    @property
    def fraction(self) -> float:
        return self.bytes_done / self.bytes_total if self.bytes_total else 1.0


@dataclass
class MergeWarning:
    code: str
    message: str
    model_id: str | None = None
    key: str | None = None
    output: str | None = None
    type: str = "warning"


@dataclass
class OutputDone:
    path: str
    bytes: int
    tensors: int
    type: str = "output_done"


@dataclass
class Finished:
    outputs: list[str]
    elapsed_s: float
    bytes_read: int
    bytes_written: int
    gbps: float
    warnings: int
    host_rss_peak: int | None = None
    process_mem_peak: int | None = None
    type: str = "finished"


@dataclass
class Failed:
    message: str
    model_id: str | None = None
    key: str | None = None
    type: str = "failed"


@dataclass
class Cancelled:
    message: str = "cancelled"
    type: str = "cancelled"


Event = Union[Started, Stage, Progress, MergeWarning, OutputDone, Finished, Failed, Cancelled]

EVENT_TYPES: dict[str, type] = {
    cls.type: cls  # type: ignore[attr-defined]
    for cls in (Started, Stage, Progress, MergeWarning, OutputDone, Finished, Failed, Cancelled)
}


def event_to_dict(event: Event) -> dict[str, Any]:
    """A JSON-safe dict of ``event`` (nested dataclasses become dicts; ``type`` included)."""
    return dataclasses.asdict(event)


def event_from_dict(d: dict[str, Any]) -> Event:
    """Rebuild an event from ``event_to_dict`` output (unknown fields are ignored, so logs
    written by a newer astolfo still load)."""
    try:
        cls = EVENT_TYPES[d["type"]]
    except KeyError:
        raise ValueError(f"unknown event type {d.get('type')!r}") from None
    kwargs = _known_fields(cls, d)
    if cls is Progress:
        kwargs["outputs"] = [OutputProgress(**_known_fields(OutputProgress, o)) for o in kwargs.get("outputs", [])]
    return cls(**kwargs)


def _known_fields(cls, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}
