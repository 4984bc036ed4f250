"""The merge run: one pass over the sources, bounded memory, exact numbers, outputs that
appear only when complete, progress as events, and resume after an interruption.

``execute(plan)`` is orchestration only; each part lives beside it:

- before anything is written: the device, the sources' hashes (``plan.provenance``: pins and
  metadata) and a check that no source changed since the plan was made;
- ``resume``: each output's partial file reopened at its last durable tensor, and the first
  step some output still needs;
- ``pipeline``: readers, a backend (``backends/``: CPU threads or the GPU) and the writer,
  over fixed buffers (``layout``); ``nan_policy`` decides what a NaN/Inf does;
- ``progress``: events at most every ``Tuning.progress_interval``;
- ``output``: partial files, durable progress marks, the atomic rename at the end.

Each source tensor is read once per run, even when several outputs use it. On cancel or
error every partial file is removed; after a ``kill -9`` the partials and their marks stay,
and ``execute(plan, resume=True)`` continues without recomputing what was written, producing
the same bytes.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from engine.checkpoint.format import SafetensorsError
from engine.checkpoint.reader import close_fds
from engine.library.report import Severity
from engine.merge import events as ev
from engine.merge.devices import MemoryMonitor, describe, host_rss_peak, resolve_device, torch_uuid
from engine.merge.errors import MergeCancelled, MergeError
from engine.merge.io import drop_cache_wanted
from engine.merge.layout import Item
from engine.merge.nan_policy import NanPolicy
from engine.merge.output import OutputStream, plan_fingerprint
from engine.merge.pipeline import PassHooks, Pipeline, Restart, open_backend
from engine.merge.progress import ProgressMeter
from engine.merge.resume import first_needed_step, open_streams, reopen_at_durable, resumed_source_bytes
from engine.merge.tuning import Tuning
from engine.plan.model import MergePlan

__all__ = ["MergeCancelled", "MergeError", "MergeResult", "OutputResult", "Tuning", "execute"]

# Of the resume fingerprint: 2 dropped the accumulator dtype from nodes; 3: products multiply then
# add on every device (a partial from before may hold CUDA's fused products). The device is not
# in the fingerprint: every device writes the same bytes, so a resume may change device.
FORMAT_VERSION = 3


@dataclass
class OutputResult:
    path: str
    bytes: int
    tensors: int


@dataclass
class MergeResult:
    outputs: list[OutputResult]
    elapsed_s: float
    bytes_read: int
    bytes_written: int
    device: str
    resumed_tensors: int = 0
    warnings: list[str] = field(default_factory=list)
    host_rss_peak: int | None = None
    process_mem_peak: int | None = None


def execute(plan: MergePlan, on_event: Callable[[ev.Event], None] | None = None,
            cancel: threading.Event | None = None, resume: bool = False,
            tuning: Tuning | None = None, read_limit: float | None = None,
            backend_factory: Callable | None = None) -> MergeResult:
    """Merge ``plan``. Raises MergeCancelled when ``cancel`` is set (nothing left behind) and
    MergeError when the merge cannot complete (nothing left behind either).

    ``read_limit``: at most this many bytes per second read from the sources (None: as fast as
    the disk goes), for shared disks and network storage that a full-speed merge would hog.

    ``backend_factory``: builds the backend of each pass (``pipeline.open_backend``, by device,
    when None); the tests pass the CUDA backend over a CPU test double of the CUDA runtime."""
    return _Run(plan, on_event, cancel or threading.Event(), tuning, read_limit, backend_factory).run(resume)


class _Run:
    def __init__(self, plan: MergePlan, on_event, cancel: threading.Event, tuning: Tuning | None,
                 read_limit: float | None, backend_factory: Callable | None = None):
        self.plan = plan
        self.on_event = on_event
        self.cancel = cancel
        self.tuning_given = tuning
        self.tuning = tuning or Tuning()
        self.read_limit = read_limit
        # drop pages behind reads and writes when the merge's files would crowd out the RAM
        self.bytes_to_read = plan.bytes_to_read  # a sum over every source: once, not per progress tick
        self.drop_cache = drop_cache_wanted(self.bytes_to_read + plan.bytes_to_write)
        self.backend_factory = backend_factory or open_backend
        self.device = torch.device("cpu")
        self.memory: MemoryMonitor | None = None
        self.warnings: list[str] = []
        self.nan = NanPolicy(plan, self.warn)
        self.streams: list[OutputStream] = []
        self.fds: list[int] = []
        self.bytes_read = 0
        self.bytes_done = 0  # source bytes merged (skipped ones count as done on resume)
        self.resumed_bytes = 0
        self.t0 = time.monotonic()
        self.current_key: str | None = None
        self.detail: str | None = None  # a statistic being computed on current_key
        self.stage = "merging"
        self.meter = ProgressMeter(self.emit, plan.tensor_count, self.tuning.progress_interval, None, self.t0)

    # ------------------------------------------------------------------ events

    def emit(self, event) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def warn(self, code: str, message: str, model_id=None, key=None, output=None) -> None:
        self.warnings.append(message)
        self.emit(ev.MergeWarning(code, message, model_id, key, output))

    def progress(self, force: bool = False) -> None:
        self.meter.merging(self.stage, self.bytes_read, self.bytes_done, self.bytes_to_read,
                           self.resumed_bytes, self.streams, self.current_key, force, self.detail)

    def working_on(self, key: str, detail: str | None) -> None:
        """A method's whole-tensor statistic of ``key`` is being computed (``detail``: what,
        and how far), or is done (None): shown with the progress until the next item is."""
        self.current_key, self.detail = key, detail
        self.progress()

    def check_cancel(self) -> None:
        if self.cancel.is_set():
            raise MergeCancelled("cancelled")

    def item_done(self, item: Item) -> None:
        n = sum(s.nbytes for seg in item.segments for s in seg.sources)
        self.bytes_read += n
        self.bytes_done += n
        if item.segments:
            self.current_key = self.plan.steps[item.segments[-1].step].key
            self.detail = None

    # ------------------------------------------------------------------ the run

    def run(self, resume: bool) -> MergeResult:
        try:
            try:
                return self._run(resume)
            finally:
                self._close_fds()
                if self.memory is not None:
                    self.memory.close()
        except MergeCancelled:
            self._abort()
            self.emit(ev.Cancelled())
            raise
        except KeyboardInterrupt:
            self._abort()
            self.emit(ev.Cancelled("interrupted"))
            raise MergeCancelled("interrupted") from None
        except MergeError as e:
            self._abort()
            self.emit(ev.Failed(str(e), e.model_id, e.key))
            raise
        except Exception as e:
            self._abort()
            message = _describe_error(e)
            self.emit(ev.Failed(message))
            raise MergeError(message) from e

    def _abort(self) -> None:
        for s in self.streams:
            try:
                s.abort()
            except OSError:
                pass
        self.streams = []

    def _run(self, resume: bool) -> MergeResult:
        plan = self.plan
        try:
            self.device = resolve_device(plan.device)
        except ValueError as e:
            raise MergeError(str(e)) from None
        if self.tuning_given is None:
            self.tuning = Tuning.for_device(self.device)
        if self.device.type == "cpu":
            _warm_cpu_kernels(plan)
        self.memory = self.meter.memory = MemoryMonitor(self.device)
        hashes = self._hashes()
        plan.hashes = hashes  # every source's now: the methods' drop masks are keyed by SHA256
        self._check_sources_unchanged()
        start = self._open_outputs(resume, hashes)
        self._open_fds()
        self.resumed_bytes = self.bytes_done = resumed_source_bytes(plan, start)
        resumed_tensors = sum(s.skip_below for s in self.streams)
        self.emit(ev.Started(
            outputs=[str(o.path) for o in plan.outputs], tensors_total=plan.tensor_count,
            bytes_to_read=self.bytes_to_read, bytes_to_write=sum(s.total_bytes for s in self.streams),
            device=describe(self.device), sources=len(plan.files), resumed_tensors=resumed_tensors,
            device_uuid=torch_uuid(self.device) if self.device.type == "cuda" else None,
        ))
        for p in plan.problems:
            if p.severity >= Severity.WARNING:
                self.warn(p.code or "plan", p.message, p.model_id, None, p.output)
        self.emit(ev.Stage("merging"))
        self.meter.start_stage()
        hooks = PassHooks(self.check_cancel, self.progress, self.item_done, self.working_on)
        pipeline = Pipeline(plan, self.fds, self.streams, self.tuning, self.device, self.nan, hooks, self.read_limit,
                            self.drop_cache, self.backend_factory)
        while True:
            try:
                pipeline.run(start)
                break
            except Restart:
                reopen_at_durable(self.streams)
                start = first_needed_step(plan, self.streams)
        self._report_clamped(pipeline.stats.clamped)
        self.nan.summarize()
        return self._commit(resumed_tensors)

    def _report_clamped(self, clamped: dict[int, tuple[str, float]]) -> None:
        """Model stock's t outside [0, 1] on some tensors (clamped there): one warning."""
        if not clamped:
            return
        keys = sorted(clamped.values())
        shown = ", ".join(f"{k} (t {t:.3g})" for k, t in keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5
                                                                        else "")
        self.warn("stock_t_clamped", f"model stock: t was clamped to [0, 1] on {len(keys)} tensor(s): {shown}")

    def _open_outputs(self, resume: bool, hashes: dict) -> int:
        """Metadata, the output streams (fresh or resumed), and the first step to run."""
        from engine.plan.provenance import build_metadata  # here: provenance reads the catalog

        plan = self.plan
        for out in plan.outputs:
            out.metadata = build_metadata(plan, out, hashes)
        fingerprint = plan_fingerprint(plan, FORMAT_VERSION)
        for out in plan.outputs:
            out.path.parent.mkdir(parents=True, exist_ok=True)
            self.streams.append(OutputStream(out.path, out.tensors, out.metadata, fingerprint, self.drop_cache))
        return open_streams(plan, self.streams, resume, fingerprint, self.warn)

    def _commit(self, resumed_tensors: int) -> MergeResult:
        self.stage = "finishing"
        self.emit(ev.Stage("finishing", "fsync and rename"))
        self.progress(force=True)
        results = []
        for s in self.streams:
            self.check_cancel()
            path = s.commit()
            results.append(OutputResult(str(path), s.total_bytes, s.total))
            self.emit(ev.OutputDone(str(path), s.total_bytes, s.total))
        self.streams = []
        elapsed = time.monotonic() - self.t0
        merge_time = max(time.monotonic() - self.meter.stage_start, 1e-9)
        written = sum(r.bytes for r in results)
        peak = self.memory.sample().process_peak
        self.emit(ev.Finished(
            outputs=[r.path for r in results], elapsed_s=round(elapsed, 3), bytes_read=self.bytes_read,
            bytes_written=written, gbps=round(self.bytes_read / merge_time / 1e9, 3),
            warnings=len(self.warnings), host_rss_peak=host_rss_peak(), process_mem_peak=peak,
        ))
        return MergeResult(results, elapsed, self.bytes_read, written, describe(self.device), resumed_tensors,
                           list(self.warnings), host_rss_peak(), peak)

    def _hashes(self) -> dict:
        """Hashes of every source (provenance and pins): from the catalog cache or computed
        now, before anything is written."""
        from engine.hashes.model import HashCancelled, HashError
        from engine.plan.provenance import pin_mismatch, plan_hashes  # here: provenance reads the catalog

        def on_stage(message: str) -> None:
            self.stage = "hashing"
            self.meter.start_stage()
            self.emit(ev.Stage("hashing", message))

        in_flight: dict[str, tuple[int, int]] = {}  # files hashed at once (callbacks come one at a time)

        def file_progress(report, done: int, total: int) -> None:
            in_flight[report.path.name] = (done, total)

        def file_done(report) -> None:
            in_flight.pop(report.path.name, None)

        def progress(done: int, total: int) -> None:
            files = ", ".join(f"{name} {d / max(t, 1):.0%}" for name, (d, t) in in_flight.items())
            self.meter.hashing(done, total, files or None)

        try:
            hashes = plan_hashes(self.plan, on_stage, progress, self.cancel, file_progress, file_done)
        except HashCancelled:
            raise MergeCancelled("cancelled while hashing") from None
        except HashError as e:
            raise MergeError(str(e)) from None
        self.stage = "merging"
        mismatch = pin_mismatch(self.plan, hashes)
        if mismatch is not None:
            raise MergeError(mismatch[1], mismatch[0])
        return hashes

    def _check_sources_unchanged(self) -> None:
        for f in self.plan.files:
            try:
                st = os.stat(f.path)
            except OSError as e:
                raise MergeError(f"{f.path}: cannot read: {e.strerror or e}", f.model_id) from None
            if (st.st_size, st.st_mtime_ns) != (f.size, f.mtime_ns):
                raise MergeError(f"{f.path}: changed since the recipe was checked; check it again", f.model_id)

    def _open_fds(self) -> None:
        for f in self.plan.files:
            try:
                fd = os.open(f.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            except OSError as e:
                raise MergeError(f"{f.path}: cannot open: {e.strerror or e}", f.model_id) from None
            self.fds.append(fd)
            if hasattr(os, "posix_fadvise"):
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                except OSError:
                    pass

    def _close_fds(self) -> None:
        close_fds(self.fds)
        self.fds = []


def _warm_cpu_kernels(plan: MergePlan) -> None:
    """Load (or compile) the fused CPU kernels the plan calls in the background now (if
    ``build_plan`` has not already), so it overlaps hashing and opening the outputs instead of
    delaying the first item."""
    from engine.kernels import warm

    if warm.wanted():
        warm.start(methods=plan.uses_methods)


def _describe_error(e: Exception) -> str:
    if isinstance(e, SafetensorsError):
        return str(e)
    if isinstance(e, OSError):
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror or e}"
    return f"{e.__class__.__name__}: {e}"
