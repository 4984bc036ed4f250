"""The merge's I/O threads: readers that ``pread`` source ranges into buffers a few items
ahead (with kernel read-ahead hints, and the pages dropped once copied), and the writer that
appends results to the output streams in order and checkpoints them for a resume.

Both hand their errors to the merge thread, which polls ``raise_error``; both stop when the
shared ``stop`` event is set.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from typing import Callable

import torch

from engine.checkpoint.format import DTYPES
from engine.checkpoint.reader import pread_exact

PREFETCH_ITEMS = 2  # items the kernel is asked to read ahead of the readers
PAGE = 4096


class Stop(Exception):
    """Readers and the writer stop when the merge does."""


def get(q: queue.Queue, timeout: float):
    try:
        return q.get(timeout=timeout)
    except queue.Empty:
        return None


class ReadThrottle:
    """Paces reads to ``rate`` bytes per second over all reader threads (``execute``'s
    ``read_limit``); waits in short sleeps so a cancel still stops the merge at once."""

    def __init__(self, rate: float):
        self.rate = float(rate)
        self.lock = threading.Lock()
        self.next_start = time.monotonic()

    def wait_for(self, nbytes: int, stop: threading.Event) -> None:
        with self.lock:
            start = max(self.next_start, time.monotonic())
            self.next_start = start + nbytes / self.rate
        while (delay := start - time.monotonic()) > 0:
            if stop.is_set():
                raise Stop()
            time.sleep(min(delay, 0.05))


class Readers:
    """Reader threads: item i goes to thread i % n; buffers are taken in item order.

    ``throttle`` paces the reads (None: as fast as the disk goes); ``drop_cache`` drops source
    pages once copied (see drop_cache_wanted); ``direct`` reads past the page cache, except
    the items ``cached(item, stop)`` says a method's statistics read through it (it returns
    once they have: engine.methods.stats_feed): those are copied from the page cache, so the
    disk serves their bytes once, not twice.

    ``hint_only``: the backend reads the sources itself (``backends.cpu_stretches``): the
    threads only ask the kernel to read ahead and hand out the buffers in order."""

    def __init__(self, items, fds, plan, free, stop: threading.Event, n: int,
                 throttle: ReadThrottle | None = None, drop_cache: bool = True, direct=None,
                 cached: Callable[[object, threading.Event], bool] = lambda item, stop: False,
                 hint_only: bool = False):
        self.items = items
        self.hint_only = hint_only
        self.direct = direct  # engine.merge.direct_reads.DirectFiles: reads past the page cache
        self.cached = cached
        self.throttle = throttle
        self.drop_cache = drop_cache
        self.fds = fds
        self.plan = plan
        self.free = free
        self.stop = stop
        self.n = max(1, n)
        self.lock = threading.Condition()
        self.ticket = 0  # next item allowed to take a buffer
        self.ready: dict[int, object] = {}
        self.error: BaseException | None = None
        self.threads = [threading.Thread(target=self._loop, args=(k,), name=f"merge-read-{k}", daemon=True)
                        for k in range(self.n)]

    def start(self) -> None:
        for th in self.threads:
            th.start()

    def join(self) -> None:
        with self.lock:
            self.lock.notify_all()
        for th in self.threads:
            th.join()

    def take(self, index: int, timeout: float):
        with self.lock:
            if index not in self.ready:
                self.lock.wait(timeout)
            return self.ready.pop(index, None)

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def _loop(self, k: int) -> None:
        try:
            for item in self.items[k::self.n]:
                if self.direct is None:
                    self._advise(item.index + PREFETCH_ITEMS)
                buf = self._buffer_for(item.index)
                if buf is None:
                    return
                # an item whose sources a method's statistics read is copied from the page cache
                # once they have (and its pages dropped behind: drop_cache); the rest past it (direct)
                cached = self.cached(item, self.stop) if self.direct is not None or self.drop_cache else False
                if self.hint_only:
                    pass
                elif self.direct is None or cached:
                    self._read(item, buf)
                else:
                    self._read_direct(k, item, buf)
                with self.lock:
                    self.ready[item.index] = buf
                    self.lock.notify_all()
        except BaseException as e:  # handed to the merge thread
            self.error = e
            self.stop.set()
            with self.lock:
                self.lock.notify_all()

    def _advise(self, index: int) -> None:
        """Ask the kernel to start reading an item further ahead: reads of all files then overlap
        (a deeper disk queue than one thread's sequential preads) while this item is read."""
        if index >= len(self.items) or not hasattr(os, "posix_fadvise"):
            return
        for seg in self.items[index].segments:
            for s in seg.sources:
                if not s.read:
                    continue
                try:
                    os.posix_fadvise(self.fds[s.file], s.file_offset, s.nbytes, os.POSIX_FADV_WILLNEED)
                except OSError:
                    return

    def _buffer_for(self, index: int):
        with self.lock:
            while self.ticket != index:
                if self.stop.is_set():
                    return None
                self.lock.wait(0.1)
        buf = None
        while buf is None:
            if self.stop.is_set():
                return None
            buf = get(self.free, 0.1)
        with self.lock:
            self.ticket += 1
            self.lock.notify_all()
        return buf

    def _read_direct(self, k: int, item, buf: torch.Tensor) -> None:
        from engine.merge.direct_reads import Range

        ranges: dict[int, list[Range]] = {}
        for seg in item.segments:
            for s in seg.sources:
                if s.read:
                    ranges.setdefault(s.file, []).append(Range(s.file_offset, s.file_offset + s.nbytes, s.buf_offset))
        self.direct.read(k, ranges, buf.numpy(), self._before_read)

    def _before_read(self, nbytes: int) -> None:
        if self.stop.is_set():
            raise Stop()
        if self.throttle is not None:
            self.throttle.wait_for(nbytes, self.stop)

    def _read(self, item, buf: torch.Tensor) -> None:
        view = memoryview(buf.numpy())
        spans: dict[int, list[int]] = {}
        for seg in item.segments:
            for s in seg.sources:
                if s.read:  # else a median's model: its statistics read it (its pages are dropped all the same)
                    self._before_read(s.nbytes)
                    pread_exact(self.fds[s.file], view[s.buf_offset: s.buf_offset + s.nbytes], s.file_offset,
                                 self.plan.files[s.file].path)
                span = spans.setdefault(s.file, [s.file_offset, s.file_offset + s.nbytes])
                span[0] = min(span[0], s.file_offset)
                span[1] = max(span[1], s.file_offset + s.nbytes)
        if self.drop_cache:
            _drop_cached(self.fds, spans)


def drop_cache_wanted(nbytes: int) -> bool:
    """Drop pages behind the merge when its files would fill over half the RAM: a rerun could
    not find them cached anyway, and the kernel would otherwise reclaim memory during the merge
    (at a CPU cost that made a full-size SDXL merge on this 2-core, 24 GB machine 1.5x slower).
    Smaller merges leave the page cache alone, so a rerun reads from memory."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return True
    return nbytes > ram // 2


def _drop_cached(fds: list[int], spans: dict[int, list[int]]) -> None:
    """Let the kernel drop the source pages just copied (whole pages only): sources are read
    once, and 40 checkpoints do not fit in the page cache anyway; without this a merge bigger
    than RAM spends its CPU reclaiming memory."""
    if not hasattr(os, "posix_fadvise"):
        return
    for f, (lo, hi) in spans.items():
        lo = -(-lo // PAGE) * PAGE
        hi = hi // PAGE * PAGE
        if hi > lo:
            try:
                os.posix_fadvise(fds[f], lo, hi - lo, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass


class Writer:
    """Writes item results to the output streams in order, checkpointing as it goes.

    Results are lent to the streams (written straight from the output buffer where the layout
    put them on the file's block grid, engine.merge.layout), so an output buffer goes back to
    the free ones only once the next item's batch has been handed over: the disk then always
    has the next write queued while the writer waits for the one before."""

    def __init__(self, streams, writes, free_out, stop: threading.Event, tuning):
        self.streams = streams
        self.writes = writes
        self.free_out = free_out
        self.stop = stop
        self.tuning = tuning
        self.queue: queue.Queue = queue.Queue()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="merge-write", daemon=True)
        self._since_sync = 0
        self._last_sync = time.monotonic()
        self._closed = False
        self._held: torch.Tensor | None = None  # the last item's output buffer, until its writes are done

    def start(self) -> None:
        self.thread.start()

    def submit(self, item, out: torch.Tensor) -> None:
        self.queue.put((item, out))

    def give_back(self, out: torch.Tensor) -> None:
        self.free_out.put(out)

    def close(self) -> None:
        """No more items: the writer checkpoints what it has (unless stopped) and ends."""
        if not self._closed:
            self._closed = True
            self.queue.put(None)

    def join(self) -> None:
        self.thread.join()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def _loop(self) -> None:
        try:
            while True:
                entry = self.queue.get()
                if entry is None:
                    break
                if self.stop.is_set() and self.error is None and not self.done.is_set():
                    self.free_out.put(entry[1])
                    continue
                self._write(*entry)
            if not self.stop.is_set():
                for s in self.streams:
                    s.end_batch()
                    s.checkpoint()
                self._release_held()
        except BaseException as e:
            self.error = e
            self.stop.set()
        finally:
            self.done.set()

    def _write(self, item, out: torch.Tensor) -> None:
        view = memoryview(out.numpy())
        for seg in item.segments:
            last = seg.stop == self._numel(seg)
            for w in self.writes[seg.step]:
                ns = next(x for x in seg.nodes if x.node == w.node)
                offset = ns.outs[w.dtype]
                n = seg.numel * DTYPES[w.dtype].itemsize
                self.streams[w.output].put(w.tensor, view[offset: offset + n], last, lent=True)
                self._since_sync += n
        for s in self.streams:
            s.end_batch()  # this item's writes queued, the one before's done
        self._release_held()
        self._held = out
        now = time.monotonic()
        if self._since_sync >= self.tuning.sync_bytes or now - self._last_sync >= self.tuning.sync_seconds:
            for s in self.streams:
                s.checkpoint()
            self._since_sync = 0
            self._last_sync = now

    def _release_held(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            self.free_out.put(held)

    def _numel(self, seg) -> int:
        w = self.writes[seg.step][0] if self.writes[seg.step] else None
        if w is None:
            return seg.stop
        plan = self.streams[w.output].writer.plans[w.tensor]
        return plan.nbytes // DTYPES[plan.dtype].itemsize
