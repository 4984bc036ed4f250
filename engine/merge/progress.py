"""Progress of a merge as events: throughput over the last few seconds, an ETA from the work
done this run (tensors resumed from an earlier run do not count as speed), memory figures,
and at most one event per ``interval`` unless forced. One builder serves the hashing stage
before the merge and the merge itself, so both read the same to the CLI, the TUI and logs."""

from __future__ import annotations

import time
from typing import Callable

from engine.merge import events as ev
from engine.merge.devices import MemoryMonitor, host_rss

_RATE_WINDOW_S = 3.0


class ProgressMeter:
    def __init__(self, emit: Callable[[ev.Event], None], tensors_total: int, interval: float,
                 memory: MemoryMonitor | None = None, t0: float | None = None):
        self.emit = emit
        self.tensors_total = tensors_total
        self.interval = interval
        self.memory = memory
        self.t0 = time.monotonic() if t0 is None else t0
        self._last = 0.0
        self._rate: list[tuple[float, int]] = []
        self.stage_start = self.t0

    def start_stage(self) -> None:
        """Rates and the ETA count from now (the merge after hashing, a restart)."""
        self.stage_start = time.monotonic()
        self._rate.clear()

    def due(self, force: bool = False) -> float | None:
        """The current time when an event is due, else None."""
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return None
        self._last = now
        return now

    def rate(self, now: float, counted: int) -> float:
        """Bytes per second over the last few seconds of ``counted``."""
        self._rate.append((now, counted))
        while len(self._rate) > 2 and now - self._rate[0][0] > _RATE_WINDOW_S:
            self._rate.pop(0)
        t_old, b_old = self._rate[0]
        return (counted - b_old) / (now - t_old) if now > t_old else 0.0

    def hashing(self, done: int, total: int, files: str | None = None) -> None:
        """``files``: the files being hashed now, with their progress (in ``current_key``)."""
        now = self.due()
        if now is None:
            return
        elapsed = now - self.stage_start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate else None
        self.emit(ev.Progress("hashing", 0, self.tensors_total, done, total, 0, round(now - self.t0, 3),
                              round(rate / 1e9, 3), None if eta is None else round(eta, 1), files, host_rss()))

    def merging(self, stage: str, bytes_read: int, bytes_done: int, bytes_total: int, resumed_bytes: int,
                streams, current_key: str | None, force: bool = False, detail: str | None = None) -> None:
        now = self.due(force)
        if now is None:
            return
        gbps = self.rate(now, bytes_read) / 1e9
        elapsed = now - self.stage_start
        fresh = bytes_done - resumed_bytes
        eta = (bytes_total - bytes_done) * elapsed / fresh if fresh > 0 and elapsed > 0.5 else None
        mem = self.memory.sample() if self.memory is not None else None
        self.emit(ev.Progress(
            stage=stage,
            tensors_done=sum(s.tensors_done for s in streams),
            tensors_total=self.tensors_total,
            bytes_done=bytes_done, bytes_total=bytes_total,
            bytes_written=sum(s.bytes_written for s in streams),
            elapsed_s=round(now - self.t0, 3), gbps=round(gbps, 3),
            eta_s=None if eta is None else round(eta, 1),
            current_key=current_key, host_rss=host_rss(),
            card_mem_used=mem.card_used if mem else None, card_mem_total=mem.card_total if mem else None,
            process_mem_peak=mem.process_peak if mem else None,
            outputs=[ev.OutputProgress(str(s.target), s.tensors_done, s.total,
                                       min(s.bytes_written + len(s.header_bytes), s.total_bytes), s.total_bytes)
                     for s in streams],
            detail=detail,
        ))
