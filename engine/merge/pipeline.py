"""One pass of the merge over the plan's items, from a start step: readers fill read
buffers a few items ahead, a backend computes each item into an output buffer, the writer
appends results to the outputs in order. The calling thread hands out items in order, keeps
at most ``backend.depth`` in flight, and polls for cancel and thread errors while it waits.

A non-finite result goes to the NaN policy: it raises MergeError (stop) or records the
sources to leave out, and the pass ends with ``Restart`` so the run reopens the outputs at
their last durable tensor and starts a new pass with those sources excluded.

Every thread and the backend are released on every way out (success, error, cancel); the
backend is built inside that guard, so a failed construction still releases the rest, and a
cleanup error never replaces the error that ended the pass.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from engine.merge.backends.base import Backend
from engine.merge.direct_reads import open_direct
from engine.merge.io import Readers, ReadThrottle, Writer, get
from engine.merge.layout import Item, build_items, output_positions, step_writes
from engine.merge.nan_policy import NanPolicy
from engine.merge.output import OutputStream
from engine.merge.slice_reads import SliceReads
from engine.merge.tuning import Tuning
from engine.methods.stats_feed import StatsFeed
from engine.plan.model import MergePlan


class Restart(Exception):
    """A source was left out for NaN/Inf: continue from the last durable point."""


@dataclass
class PassHooks:
    """What the pass tells the run: ``check_cancel`` raises to stop, ``tick`` lets it emit
    progress while waiting, ``item_done`` counts a finished item's source bytes,
    ``working_on(key, detail)`` names a whole-tensor statistic being computed (None: done)."""

    check_cancel: Callable[[], None]
    tick: Callable[[], None]
    item_done: Callable[[Item], None]
    working_on: Callable[[str, str | None], None] = lambda key, detail: None


def open_backend(plan: MergePlan, device: torch.device, tuning: Tuning, items: list[Item]) -> Backend:
    """The backend for ``device``: CUDA (scratch sized by this pass's items) or CPU threads."""
    if device.type == "cuda":
        from engine.merge.backends.cuda import CudaBackend  # only a GPU run pays for it

        return CudaBackend(plan, device, tuning.buffer_bytes, items)
    from engine.merge.backends.cpu import CpuBackend

    return CpuBackend(plan, tuning.sub_elems, tuning.workers)


class Pipeline:
    def __init__(self, plan: MergePlan, fds: list[int], streams: list[OutputStream], tuning: Tuning,
                 device: torch.device, nan: NanPolicy, hooks: PassHooks, read_limit: float | None = None,
                 drop_cache: bool = False,
                 backend_factory: Callable[[MergePlan, torch.device, Tuning, list[Item]], Backend] = open_backend):
        self.plan = plan
        self.fds = fds
        self.streams = streams
        self.tuning = tuning
        self.device = device
        self.nan = nan
        self.hooks = hooks
        self.read_limit = read_limit
        self.drop_cache = drop_cache
        self.backend_factory = backend_factory
        # whole-tensor statistics of methods that need them (kept across passes for the report)
        self.stats = StatsFeed(plan, fds, hooks.check_cancel, hooks.tick, hooks.working_on)

    def run(self, start: int) -> None:
        """Compute and write every step from ``start``; raises Restart after a NaN skip."""
        plan, t = self.plan, self.tuning
        # results laid out on the block grid of the file they go to, to be written from where they lie
        positions = output_positions(step_writes(plan), lambda o, i: self.streams[o].data_offset(i))
        items = build_items(plan, t.buffer_bytes, start, positions)
        stop = threading.Event()
        backend = reader = writer = direct = None
        inflight: deque = deque()
        ok = False
        try:
            backend = self.backend_factory(plan, self.device, t, items)
            free_read: queue.Queue = queue.Queue()
            for _ in range(max(2, t.read_buffers) + backend.depth - 1):
                free_read.put(backend.alloc(t.buffer_bytes))
            free_out: queue.Queue = queue.Queue()
            for _ in range(max(2, t.out_buffers) + backend.depth - 1):
                free_out.put(backend.alloc(t.buffer_bytes))
            throttle = ReadThrottle(self.read_limit) if self.read_limit else None
            # files too big to stay cached are read past the page cache (direct_reads); their
            # requests wait on the disk, not the CPU, so more of them are kept in flight
            readers = t.readers
            if self.drop_cache:
                direct = open_direct(self.fds, [f.path for f in plan.files], max(t.readers, t.direct_readers))
                readers = len(direct.bounces) if direct else t.readers
            # from the page cache, a CPU backend with the fused kernels reads its sources itself, a
            # few MB at a time just before merging them (backends.cpu_stretches): the readers only
            # ask the kernel to read ahead
            own_reads = direct is None and not self.drop_cache and throttle is None and getattr(
                backend, "read_sources", lambda reads, stretch_bytes: False)(
                SliceReads(self.fds, [f.path for f in plan.files]), t.stretch_bytes)
            median_device = getattr(backend, "median_device", None)  # a CUDA backend's: the medians' points there
            self.stats.begin_pass(items, self.nan.excluded, median_device() if median_device else None)
            reader = Readers(items, self.fds, plan, free_read, stop, readers, throttle, self.drop_cache, direct,
                             self.stats.reads, hint_only=own_reads)
            writer = Writer(self.streams, step_writes(plan), free_out, stop, t)
            reader.start()
            writer.start()
            for item in items:
                self.stats.attach(item)
                buf = self._wait(lambda: reader.take(item.index, 0.1), reader, writer)
                out = self._wait(lambda: get(free_out, 0.1), reader, writer)
                inflight.append((item, backend.submit(item, buf, out, self.nan.excluded), buf, out))
                while len(inflight) >= backend.depth:
                    self._finish(backend, inflight.popleft(), free_read, writer)
                self.hooks.check_cancel()
            while inflight:
                self._finish(backend, inflight.popleft(), free_read, writer)
            writer.close()
            self._wait(lambda: writer.done.wait(0.1) or None, reader, writer)
            writer.raise_error()
            ok = True
        except BaseException:
            for entry in inflight:  # let in-flight work end before its buffers go
                try:
                    backend.finish(entry[1])
                except Exception:
                    pass
            raise
        finally:
            stop.set()
            self.stats.end_pass()
            _release(backend, reader, writer, direct, raise_errors=ok)

    def _wait(self, attempt, reader, writer):
        """Poll ``attempt`` (returns a value or None) while watching cancel, errors, progress."""
        while True:
            value = attempt()
            if value is not None:
                return value
            self.hooks.check_cancel()
            reader.raise_error()
            writer.raise_error()
            self.hooks.tick()

    def _finish(self, backend: Backend, pending, free_read, writer: Writer) -> None:
        item, handle, buf, out = pending
        bads = backend.finish(handle)
        item.stats.clear()  # items live as long as the pass: their statistics (a median: 8 bytes an element) go now
        free_read.put(buf)
        if bads:
            writer.give_back(out)
            self.nan.handle(bads)
            raise Restart()
        self.hooks.item_done(item)
        writer.submit(item, out)
        self.hooks.tick()


def _release(backend, reader, writer, direct, raise_errors: bool) -> None:
    """Stop the threads and close the backend, each even when an earlier one fails; an error
    here is raised only when the pass itself succeeded (else the pass's error is the cause)."""
    first: BaseException | None = None
    for release in (writer.close if writer else None, reader.join if reader else None,
                    writer.join if writer else None, backend.close if backend else None,
                    direct.close if direct else None):
        if release is None:
            continue
        try:
            release()
        except Exception as e:
            first = first or e
    if first is not None and raise_errors:
        raise first
