"""What the merge dashboard knows about a job, folded from its event stream (the same events the
CLI renders and the job log stores). Plain Python, so the folding is tested without a screen."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from engine.merge import events as ev

SPARK_POINTS = 120
LOG_LINES = 200


@dataclass
class OutputState:
    path: str
    tensors_done: int = 0
    tensors_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    done: bool = False

    @property
    def fraction(self) -> float:
        if self.done:
            return 1.0
        return self.bytes_done / self.bytes_total if self.bytes_total else 0.0


@dataclass
class JobView:
    device: str = ""
    stage: str = "starting"
    tensors_done: int = 0
    tensors_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    bytes_written: int = 0
    elapsed_s: float = 0.0
    gbps: float = 0.0
    eta_s: float | None = None
    current_key: str | None = None
    detail: str | None = None  # a statistic being computed on current_key (a median's iteration)
    host_rss: int | None = None
    host_rss_peak: int | None = None
    card_mem_used: int | None = None  # the whole card, every process
    card_mem_total: int | None = None
    process_mem_peak: int | None = None  # the merge's own process at most
    device_uuid: str | None = None
    outputs: dict[str, OutputState] = field(default_factory=dict)
    throughput: deque = field(default_factory=lambda: deque(maxlen=SPARK_POINTS))
    log: deque = field(default_factory=lambda: deque(maxlen=LOG_LINES))
    warnings: int = 0
    final: str | None = None  # finished | failed | cancelled
    final_message: str = ""
    log_total: int = 0  # lines ever logged (the deque keeps the last LOG_LINES)

    @property
    def fraction(self) -> float:
        if self.final == "finished":
            return 1.0
        return self.bytes_done / self.bytes_total if self.bytes_total else 0.0

    def apply(self, event) -> None:
        handler = getattr(self, f"_on_{event.type}", None)
        if handler is not None:
            handler(event)

    def _log(self, kind: str, text: str) -> None:
        self.log.append((kind, text))
        self.log_total += 1

    def lines_since(self, seen: int) -> list[tuple[str, str]]:
        """Log lines after the first ``seen`` ever logged (as many as are still kept)."""
        new = self.log_total - seen
        return list(self.log)[-new:] if new > 0 else []

    def _on_started(self, e: ev.Started) -> None:
        self.device = e.device
        self.device_uuid = e.device_uuid
        self.tensors_total = e.tensors_total
        self.bytes_total = e.bytes_to_read
        for path in e.outputs:
            self.outputs.setdefault(path, OutputState(path))
        resumed = f", resuming after {e.resumed_tensors} tensors already written" if e.resumed_tensors else ""
        self._log("info", f"started on {e.device}: {e.sources} source files, {e.tensors_total} tensors, "
                          f"{e.bytes_to_read / 1e9:,.2f} GB to read{resumed}")

    def _on_stage(self, e: ev.Stage) -> None:
        self.stage = e.stage
        self._log("info", f"{e.stage}{': ' + e.message if e.message else ''}")

    def _on_progress(self, e: ev.Progress) -> None:
        self.stage = e.stage
        self.tensors_done, self.tensors_total = e.tensors_done, e.tensors_total
        self.bytes_done, self.bytes_total = e.bytes_done, e.bytes_total
        self.bytes_written = e.bytes_written
        self.elapsed_s, self.gbps, self.eta_s = e.elapsed_s, e.gbps, e.eta_s
        self.current_key = e.current_key
        self.detail = e.detail
        self.host_rss = e.host_rss
        if e.host_rss is not None:
            self.host_rss_peak = max(self.host_rss_peak or 0, e.host_rss)
        self.card_mem_used, self.card_mem_total = e.card_mem_used, e.card_mem_total
        if e.process_mem_peak is not None:
            self.process_mem_peak = e.process_mem_peak
        if e.stage == "merging":
            self.throughput.append(e.gbps)
        for o in e.outputs:
            state = self.outputs.setdefault(o.path, OutputState(o.path))
            state.tensors_done, state.tensors_total = o.tensors_done, o.tensors_total
            state.bytes_done, state.bytes_total = o.bytes_done, o.bytes_total

    def _on_warning(self, e: ev.MergeWarning) -> None:
        self.warnings += 1
        where = " ".join(x for x in (e.model_id, e.key) if x)
        self._log("warning", f"{e.message}{' (' + where + ')' if where else ''}")

    def _on_output_done(self, e: ev.OutputDone) -> None:
        state = self.outputs.setdefault(e.path, OutputState(e.path))
        state.done = True
        self._log("ok", f"written {Path(e.path).name} ({e.bytes / 1e9:,.2f} GB, {e.tensors} tensors) "
                        f"in {Path(e.path).parent}")

    def _on_finished(self, e: ev.Finished) -> None:
        self.final = "finished"
        self.elapsed_s = e.elapsed_s
        self.eta_s = 0.0
        self.current_key = None
        self.detail = None
        if e.process_mem_peak is not None:
            self.process_mem_peak = e.process_mem_peak
        if e.host_rss_peak is not None:
            self.host_rss_peak = e.host_rss_peak
        self.final_message = (f"finished in {e.elapsed_s:,.1f} s: read {e.bytes_read / 1e9:,.2f} GB at "
                              f"{e.gbps:,.2f} GB/s, {e.warnings} warning(s)")
        self._log("ok", self.final_message)

    def _on_failed(self, e: ev.Failed) -> None:
        self.final = "failed"
        where = " ".join(x for x in (e.model_id, e.key) if x)
        self.final_message = f"failed: {e.message}{' (' + where + ')' if where else ''}"
        self._log("error", self.final_message)

    def _on_cancelled(self, e: ev.Cancelled) -> None:
        self.final = "cancelled"
        self.final_message = e.message or "cancelled"
        self._log("warning", self.final_message)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
