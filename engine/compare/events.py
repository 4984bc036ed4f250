"""What a comparison reports while it runs, and how it ends other than with a result."""

from __future__ import annotations

from dataclasses import dataclass


class CompareError(Exception):
    """The comparison cannot run (no model to compare, an unusable reference); the message
    says why in words a user can act on."""


class UnknownReference(CompareError):
    """``--reference`` names neither a model id nor a file: a usage error."""


class BadDevice(CompareError):
    """``--device`` names a device this machine does not have: a usage error."""


class CompareCancelled(CompareError):
    """The cancel event was set; nothing was cached."""

    def __init__(self) -> None:
        super().__init__("cancelled")


@dataclass(frozen=True)
class PassStarted:
    """The files are being read; ``device`` says where the chunks are reduced, in words
    (``cpu (2 threads)``, ``cuda:0 (NVIDIA H200)``)."""

    device: str


@dataclass(frozen=True)
class Progress:
    """Elements read so far (over every model) out of ``total``; the tensor last read."""

    done: int
    total: int
    component: str
    key: str


@dataclass(frozen=True)
class LeftOut:
    """A model left out of the whole comparison: its id, path and why."""

    model_id: str
    path: str
    reason: str


@dataclass(frozen=True)
class CacheHit:
    """The result came from the cache: no file was read."""

    key: str
