"""Buffer sizes and thread counts of a merge, chosen per device."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Tuning:
    """Buffer sizes and thread counts; the defaults suit both a 2-core laptop and a GPU box."""

    buffer_bytes: int = 64 << 20  # one read buffer, and one output buffer
    read_buffers: int = 4
    out_buffers: int = 3
    readers: int = 1
    workers: int = 0  # CPU compute threads; 0: one per core, at most backends.cpu.MAX_WORKERS
    sub_elems: int = 1 << 17  # CPU: elements per pass (1 MB of fp64: stays in L2)
    sync_bytes: int = 256 << 20
    sync_seconds: float = 5.0
    progress_interval: float = 0.1  # at most ~10 progress events a second

    @classmethod
    def for_device(cls, device: torch.device) -> "Tuning":
        if device.type == "cuda":
            readers = max(2, min(8, (os.cpu_count() or 2) // 2))
            return cls(buffer_bytes=128 << 20, read_buffers=readers + 3, out_buffers=4, readers=readers)
        return cls()
