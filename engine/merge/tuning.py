"""Buffer sizes and thread counts of a merge, chosen per device: enough readers for the cores
this process may use, pinned host memory capped to a share of RAM, and device buffers that fit
the card's free memory."""

from __future__ import annotations

from dataclasses import dataclass

import torch

MiB = 1 << 20
PINNED_RAM_SHARE = 8  # pinned (unswappable) buffers take at most 1/8 of RAM ...
PINNED_AVAILABLE_SHARE = 2  # ... and at most half of what is available now
GPU_FREE_SHARE = 0.8  # the device part of a merge uses at most this share of the free memory
MIN_CUDA_BUFFER = 4 * MiB


@dataclass
class Tuning:
    """Buffer sizes and thread counts; the defaults suit both a 2-core laptop and a GPU box."""

    buffer_bytes: int = 64 << 20  # one read buffer, and one output buffer
    read_buffers: int = 4
    out_buffers: int = 3
    readers: int = 1
    direct_readers: int = 4  # readers of a merge that reads past the page cache (direct_reads)
    workers: int = 0  # CPU compute threads; 0: one per core, at most backends.cpu.MAX_WORKERS
    sub_elems: int = 1 << 17  # CPU: elements per pass (1 MB of fp64: stays in L2)
    stretch_bytes: int = 4 << 20  # CPU reading its own sources: a worker's scratch (backends.cpu_stretches)
    sync_bytes: int = 256 << 20
    sync_seconds: float = 5.0
    progress_interval: float = 0.1  # at most ~10 progress events a second

    @classmethod
    def for_device(cls, device: torch.device, cores: int | None = None,
                   ram: tuple[int | None, int | None] | None = None,
                   gpu_free: int | None = None) -> "Tuning":
        """The tuning for ``device``. ``cores`` (usable by this process), ``ram`` (total,
        available) and ``gpu_free`` (bytes) are measured here unless given (tests give them)."""
        from engine.merge import devices

        if device.type != "cuda":
            # Two readers as soon as there are two cores: from the page cache one reader's
            # copies were the merge's critical path (1.7 of 2.6 s; bench_merge, cached run).
            cores = cores if cores is not None else devices.host_cores()
            return cls(readers=2, read_buffers=6) if cores >= 2 else cls()
        from engine.merge.backends.cuda import DEPTH, SCRATCH_BYTES_PER_ELEM, SLOTS

        cores = cores if cores is not None else devices.host_cores()
        readers = max(2, min(8, cores // 2))
        t = cls(buffer_bytes=128 * MiB, read_buffers=readers + 3, out_buffers=4, readers=readers)
        # pinned host buffers: the pipeline allocates this many of them (see Pipeline.run)
        count = t.read_buffers + t.out_buffers + 2 * (DEPTH - 1)
        total, available = ram if ram is not None else devices.host_memory()
        caps = [c for c in (total and total // PINNED_RAM_SHARE,
                            available and available // PINNED_AVAILABLE_SHARE) if c]
        if caps:
            t.buffer_bytes = min(t.buffer_bytes, _mib_floor(min(caps) // count))
        # device: SLOTS input and output buffers, plus scratch (at most one slice of 4 bytes a
        # source element, the smallest a mean of 16-bit sources reads, per buffer byte)
        free = gpu_free if gpu_free is not None else devices.gpu_free_bytes(device)
        if free:
            per_byte = 2 * SLOTS + SCRATCH_BYTES_PER_ELEM / 4
            t.buffer_bytes = min(t.buffer_bytes, _mib_floor(int(free * GPU_FREE_SHARE / per_byte)))
        t.buffer_bytes = max(MIN_CUDA_BUFFER, t.buffer_bytes)
        return t


def _mib_floor(n: int) -> int:
    return n // MiB * MiB
