"""The merge: one pass over the sources, bounded memory, exact numbers, outputs that appear only
when complete, progress as events, and resume after an interruption.

``execute(plan)`` runs three kinds of threads around fixed buffers (see ``merge_layout``):

- readers ``pread`` every source range of an item into a read buffer (``os.preadv`` releases
  the GIL), a few items ahead, taking buffers strictly in item order so they cannot deadlock;
- a backend (``merge_compute``) computes each item into an output buffer: CPU worker threads,
  or the GPU with two items in flight; the calling thread hands out items, collects results in
  order and emits the events;
- a writer appends results to each output's partial file (``merge_output``), and every
  ``sync_bytes`` or ``sync_seconds`` fsyncs them and records durable progress for a resume.

Each source tensor is read once per run, even when several outputs use it; outputs sharing a
selection share its nodes. A NaN/Inf stops the merge naming model and key, or with
``skip_nan`` restarts from the last durable point with that source left out of that key (the
same machinery a resume uses). On cancel or error every partial file is removed; after a
``kill -9`` the partials and their progress marks stay, and ``execute(plan, resume=True)``
continues without recomputing the tensors already written, producing the same bytes.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from engine.checkpoint.format import SafetensorsError
from engine.library.report import Severity
from engine.merge import events as ev
from engine.merge.arithmetic import Bad
from engine.merge.backends.cpu import CpuBackend
from engine.merge.backends.cuda import CudaBackend
from engine.merge.devices import MemoryMonitor, describe, host_rss, host_rss_peak, resolve_device
from engine.merge.io import Readers, ReadThrottle, Writer, drop_cache_wanted, get
from engine.merge.layout import build_items, step_of_tensors, step_writes
from engine.merge.output import OutputStream, plan_fingerprint, read_progress, remove_progress
from engine.merge.tuning import Tuning
from engine.plan.model import MergePlan

FORMAT_VERSION = 1
NAN_WARNINGS_PER_MODEL = 10  # one warning per key up to this many, then a count


class MergeError(Exception):
    """The merge cannot go on; the message names the file (or model and key) and the reason."""

    def __init__(self, message: str, model_id: str | None = None, key: str | None = None):
        self.model_id = model_id
        self.key = key
        super().__init__(message)


class MergeCancelled(Exception):
    """The merge was cancelled; no output file and no partial file were left."""


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
    device_mem_peak: int | None = None


def execute(plan: MergePlan, on_event: Callable[[ev.Event], None] | None = None,
            cancel: threading.Event | None = None, resume: bool = False,
            tuning: Tuning | None = None, read_limit: float | None = None) -> MergeResult:
    """Merge ``plan``. Raises MergeCancelled when ``cancel`` is set (nothing left behind) and
    MergeError when the merge cannot complete (nothing left behind either).

    ``read_limit``: at most this many bytes per second read from the sources (None: as fast as
    the disk goes), for shared disks and network storage that a full-speed merge would hog."""
    run = _Run(plan, on_event, cancel or threading.Event(), tuning)
    run.read_limit = read_limit
    return run.run(resume)


def discard_partial(plan: MergePlan) -> None:
    """Remove what an interrupted merge of ``plan`` left beside its outputs for a resume."""
    for out in plan.outputs:
        remove_progress(out.path)


class _Restart(Exception):
    """Internal: a source was skipped for NaN/Inf; continue from the last durable point."""


class _Run:
    def __init__(self, plan: MergePlan, on_event, cancel: threading.Event, tuning: Tuning | None):
        self.plan = plan
        self.on_event = on_event
        self.cancel = cancel
        self.device = torch.device("cpu")
        self.tuning = tuning or Tuning()
        self._tuning_given = tuning is not None
        self.memory = MemoryMonitor(self.device)
        self.excluded: dict[int, set[tuple[int, str]]] = {}
        self.nan_warnings: dict[str, int] = {}  # model id -> keys skipped for NaN/Inf
        self.warnings: list[str] = []
        self.streams: list[OutputStream] = []
        self.fds: list[int] = []
        self.bytes_read = 0
        self.bytes_done = 0  # source bytes merged (skipped ones count as done on resume)
        self.resumed_bytes = 0
        self.t0 = time.monotonic()
        self.t_merge = self.t0
        self._last_progress = 0.0
        self._rate: list[tuple[float, int]] = []
        self.current_key: str | None = None
        self.stage = "merging"
        self.read_limit: float | None = None  # bytes/s; see execute
        self.drop_cache = False  # drop file pages behind the merge (set per plan size)

    # ------------------------------------------------------------------ events

    def emit(self, event) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def warn(self, code: str, message: str, model_id=None, key=None, output=None) -> None:
        self.warnings.append(message)
        self.emit(ev.MergeWarning(code, message, model_id, key, output))

    def progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_progress < self.tuning.progress_interval:
            return
        self._last_progress = now
        self._rate.append((now, self.bytes_read))
        while len(self._rate) > 2 and now - self._rate[0][0] > 3.0:
            self._rate.pop(0)
        t_old, b_old = self._rate[0]
        gbps = (self.bytes_read - b_old) / (now - t_old) / 1e9 if now > t_old else 0.0
        total = self.plan.bytes_to_read
        elapsed = now - self.t_merge
        fresh = self.bytes_done - self.resumed_bytes
        eta = (total - self.bytes_done) * elapsed / fresh if fresh > 0 and elapsed > 0.5 else None
        mem = self.memory.sample()
        self.emit(ev.Progress(
            stage=self.stage,
            tensors_done=sum(s.tensors_done for s in self.streams),
            tensors_total=self.plan.tensor_count,
            bytes_done=self.bytes_done, bytes_total=total,
            bytes_written=sum(s.bytes_written for s in self.streams),
            elapsed_s=round(now - self.t0, 3), gbps=round(gbps, 3),
            eta_s=None if eta is None else round(eta, 1),
            current_key=self.current_key, host_rss=host_rss(),
            device_mem_used=mem.used, device_mem_total=mem.total, device_mem_peak=mem.peak,
            outputs=[ev.OutputProgress(str(s.target), s.tensors_done, s.total,
                                       min(s.bytes_written + len(s.header_bytes), s.total_bytes), s.total_bytes)
                     for s in self.streams],
        ))

    # ------------------------------------------------------------------ the run

    def run(self, resume: bool) -> MergeResult:
        try:
            try:
                return self._run(resume)
            finally:
                self._close_fds()
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
        from engine.plan.provenance import build_metadata

        plan = self.plan
        try:
            self.device = resolve_device(plan.device)
        except ValueError as e:
            raise MergeError(str(e)) from None
        if not self._tuning_given:
            self.tuning = Tuning.for_device(self.device)
        self.memory = MemoryMonitor(self.device)
        hashes = self._hashes()
        self._check_sources_unchanged()
        for out in plan.outputs:
            out.metadata = build_metadata(plan, out, hashes)
        fingerprint = plan_fingerprint(plan, FORMAT_VERSION)
        for out in plan.outputs:
            out.path.parent.mkdir(parents=True, exist_ok=True)
            self.streams.append(OutputStream(out.path, out.tensors, out.metadata, fingerprint))
        self.drop_cache = drop_cache_wanted(plan.bytes_to_read + plan.bytes_to_write)
        for s in self.streams:
            s.drop_cache = self.drop_cache
        start = self._open_streams(resume, fingerprint)
        self._open_fds()
        self.resumed_bytes = sum(s.nbytes for step in plan.steps[:start] for s in step.sources)
        resumed_tensors = sum(s.skip_below for s in self.streams)
        self.bytes_done = self.resumed_bytes
        self.emit(ev.Started(
            outputs=[str(o.path) for o in plan.outputs], tensors_total=plan.tensor_count,
            bytes_to_read=plan.bytes_to_read, bytes_to_write=sum(s.total_bytes for s in self.streams),
            device=describe(self.device), sources=len(plan.files), resumed_tensors=resumed_tensors,
        ))
        for p in plan.problems:
            if p.severity >= Severity.WARNING:
                self.warn(p.code or "plan", p.message, p.model_id, None, p.output)
        self.emit(ev.Stage("merging"))
        self.t_merge = time.monotonic()
        while True:
            try:
                self._pipeline(start)
                break
            except _Restart:
                start = self._restart_point(reopen=True)
        for mid, n in self.nan_warnings.items():
            if n > NAN_WARNINGS_PER_MODEL:
                self.warn("nan_skipped", f"model {mid}: left out of {n} keys in all for NaN/Inf values "
                          f"({n - NAN_WARNINGS_PER_MODEL} not listed one by one)", mid)
        self.stage = "finishing"
        self.emit(ev.Stage("finishing", "fsync and rename"))
        self.progress(force=True)
        results = []
        for s in self.streams:
            self._check_cancel()
            path = s.commit()
            results.append(OutputResult(str(path), s.total_bytes, s.total))
            self.emit(ev.OutputDone(str(path), s.total_bytes, s.total))
        self.streams = []
        elapsed = time.monotonic() - self.t0
        merge_time = max(time.monotonic() - self.t_merge, 1e-9)
        written = sum(r.bytes for r in results)
        peak = self.memory.sample().peak
        self.emit(ev.Finished(
            outputs=[r.path for r in results], elapsed_s=round(elapsed, 3), bytes_read=self.bytes_read,
            bytes_written=written, gbps=round(self.bytes_read / merge_time / 1e9, 3),
            warnings=len(self.warnings), host_rss_peak=host_rss_peak(), device_mem_peak=peak,
        ))
        return MergeResult(results, elapsed, self.bytes_read, written, describe(self.device), resumed_tensors,
                           list(self.warnings), host_rss_peak(), peak)

    def _check_cancel(self) -> None:
        if self.cancel.is_set():
            raise MergeCancelled("cancelled")

    def _hashes(self) -> dict:
        """Hashes of every source (provenance and pins): from the catalog cache or computed
        now, before anything is written."""
        from engine.hashes.model import HashCancelled, HashError
        from engine.plan.provenance import pin_mismatch, plan_hashes

        start = time.monotonic()

        def on_progress(done: int, total: int) -> None:
            now = time.monotonic()
            if now - self._last_progress >= self.tuning.progress_interval:
                self._last_progress = now
                rate = done / (now - start) if now > start else 0
                self.emit(ev.Progress("hashing", 0, self.plan.tensor_count, done, total, 0, round(now - self.t0, 3),
                                      round(rate / 1e9, 3), round((total - done) / rate, 1) if rate else None,
                                      None, host_rss()))

        def on_stage(message: str) -> None:
            self.stage = "hashing"
            self.emit(ev.Stage("hashing", message))

        try:
            hashes = plan_hashes(self.plan, on_stage, on_progress, self.cancel)
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
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []

    # ------------------------------------------------------------------ resume

    def _open_streams(self, resume: bool, fingerprint: str) -> int:
        """Open every output (fresh, or keeping durable tensors) and return the first step to run."""
        for s in self.streams:
            n = read_progress(s.target, fingerprint) if resume else None
            if resume and n is None:
                self.warn("resume_fresh", f"{s.target}: no progress from an earlier run of this recipe to resume; "
                          "starting it afresh", output=str(s.target))
            n = min(n or 0, s.total)
            try:
                s.open(resume_tensors=n)
            except (ValueError, OSError) as e:
                if not n:
                    raise MergeError(f"{s.target}: cannot write: {getattr(e, 'strerror', None) or e}") from None
                self.warn("resume_fresh", f"{s.target}: the partial file does not match its progress mark ({e}); "
                          "starting it afresh", output=str(s.target))
                s.open()
        return self._restart_point(reopen=False)

    def _restart_point(self, reopen: bool) -> int:
        """The first step whose results some output still needs, given the whole tensors each
        output has on disk; with ``reopen`` the streams are first closed and reopened at their
        last whole tensor (dropping a half-written one and anything parked)."""
        if reopen:
            for s in self.streams:
                n = s.tensors_done
                s.close()
                s.open(resume_tensors=n) if n else s.open()
        steps = step_of_tensors(self.plan)
        start = len(self.plan.steps)
        for s, tensor_steps in zip(self.streams, steps):
            rest = tensor_steps[s.skip_below:]
            if rest:
                start = min(start, min(rest))
        return start

    # ------------------------------------------------------------------ the pipeline

    def _pipeline(self, start: int) -> None:
        plan, t = self.plan, self.tuning
        items = build_items(plan, t.buffer_bytes, start)
        if self.device.type == "cuda":
            max_elems = max((seg.numel for it in items for seg in it.segments), default=1)
            backend = CudaBackend(plan, self.device, t.buffer_bytes, max_elems)
        else:
            backend = CpuBackend(plan, t.sub_elems, t.workers)
        writes = step_writes(plan)
        free_read: queue.Queue = queue.Queue()
        for _ in range(max(2, t.read_buffers) + backend.depth - 1):
            free_read.put(backend.alloc(t.buffer_bytes))
        free_out: queue.Queue = queue.Queue()
        for _ in range(max(2, t.out_buffers) + backend.depth - 1):
            free_out.put(backend.alloc(t.buffer_bytes))
        stop = threading.Event()
        reader = Readers(items, self.fds, plan, free_read, stop, t.readers)
        reader.drop_cache = self.drop_cache
        reader.throttle = ReadThrottle(self.read_limit) if self.read_limit else None
        writer = Writer(self.streams, writes, free_out, stop, t)
        reader.start()
        writer.start()
        inflight: deque = deque()
        try:
            for item in items:
                buf = self._wait(lambda: reader.take(item.index, 0.1), reader, writer)
                out = self._wait(lambda: get(free_out, 0.1), reader, writer)
                inflight.append((item, backend.submit(item, buf, out, self.excluded), buf, out))
                while len(inflight) >= backend.depth:
                    self._finish(backend, inflight.popleft(), free_read, writer)
                self._check_cancel()
            while inflight:
                self._finish(backend, inflight.popleft(), free_read, writer)
            writer.finish()
            self._wait(lambda: writer.done.wait(0.1) or None, reader, writer)
            writer.raise_error()
        except BaseException:
            for entry in inflight:  # let in-flight work end before its buffers go
                try:
                    backend.finish(entry[1])
                except Exception:
                    pass
            raise
        finally:
            stop.set()
            writer.close()
            reader.join()
            writer.join()
            backend.close()

    def _wait(self, attempt, reader, writer):
        """Poll ``attempt`` (returns a value or None) while watching cancel, errors, progress."""
        while True:
            value = attempt()
            if value is not None:
                return value
            self._check_cancel()
            reader.raise_error()
            writer.raise_error()
            self.progress()

    def _finish(self, backend, pending, free_read, writer) -> None:
        item, handle, buf, out = pending
        bads = backend.finish(handle)
        free_read.put(buf)
        if bads:
            writer.give_back(out)
            self._handle_bads(bads)
            raise _Restart()
        for seg in item.segments:
            n = sum(s.nbytes for s in seg.sources)
            self.bytes_read += n
            self.bytes_done += n
        if item.segments:
            self.current_key = self.plan.steps[item.segments[-1].step].key
        writer.submit(item, out)
        self.progress()

    def _handle_bads(self, bads: list[Bad]) -> None:
        plan = self.plan
        for bad in bads:
            node = plan.nodes[bad.node]
            key = node.key
            if not bad.sources:
                raise MergeError(f"{key}: every model of the selection holds NaN/Inf values here; nothing left to "
                                 "average", key=key)
            first = plan.files[bad.sources[0][0]]
            if not self.plan.recipe.skip_nan:
                names = ", ".join(f"{plan.files[f].model_id} ({plan.files[f].path.name})" for f, _ in bad.sources)
                raise MergeError(f"NaN/Inf values in {key} of model {names}: stopped (skip_nan = true leaves that "
                                 "model out of the keys where this happens)", first.model_id, key)
            if node.kind != "mean" or len(node.sources) - len(self.excluded.get(bad.node, ())) <= len(bad.sources):
                raise MergeError(f"NaN/Inf values in {key} of model {first.model_id} ({first.path.name}), and no "
                                 "other model of the selection has this tensor: cannot skip it", first.model_id, key)
            for f, stored in bad.sources:
                self.excluded.setdefault(bad.node, set()).add((f, stored))
                mid = plan.files[f].model_id
                shown = self.nan_warnings.get(mid, 0)
                self.nan_warnings[mid] = shown + 1
                if shown < NAN_WARNINGS_PER_MODEL:
                    self.warn("nan_skipped", f"model {mid}: {key} holds NaN/Inf values; left out of this key "
                              "(skip_nan)", mid, key)


def _describe_error(e: Exception) -> str:
    if isinstance(e, SafetensorsError):
        return str(e)
    if isinstance(e, OSError):
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror or e}"
    return f"{e.__class__.__name__}: {e}"
