"""Several files hashed at once, as many as the cores allow.

One file's hash already keeps about three cores busy (the read, whole-file SHA256 + AutoV1,
AutoV3, the per-tensor work: see ``hasher``), and one SHA256 stream runs at ~1.5 GB/s, so a
merge of 44 fresh models on a GPU host would spend minutes hashing one file at a time. Here
``jobs`` files are hashed by ``jobs`` threads (hashlib, blake3 and torch release the GIL on big
buffers); the default is the cores this process may use divided by three, so a 2-core machine
keeps one file at a time, in the calling thread, exactly as before: it cannot get slower.

Callbacks are serialised (never two at once), so callers written for one file at a time stay
correct; they may come from a worker thread. Progress is reported for the whole set
(``on_progress(done, total)``) and per file (``on_file_progress(item, done, total)``). The
first error stops the other files unless ``on_error`` takes it; cancelling stops all of them.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Generic, TypeVar

from engine.hashes.model import HashCancelled

CORES_PER_FILE = 3

T = TypeVar("T")
R = TypeVar("R")


def default_jobs(cores: int | None = None) -> int:
    """Files to hash at once: the usable cores (the affinity mask) over ``CORES_PER_FILE``."""
    if cores is None:
        from engine.merge.devices import host_cores  # torch-free module; torch-free import

        cores = host_cores()
    return max(1, cores // CORES_PER_FILE)


class _Cancel:
    """Set when the caller cancels or when one file failed and the others must stop; looks
    like a threading.Event to the hasher."""

    def __init__(self, outer: threading.Event | None):
        self.outer = outer
        self.own = threading.Event()

    def is_set(self) -> bool:
        return self.own.is_set() or (self.outer is not None and self.outer.is_set())

    def set(self) -> None:
        self.own.set()


class HashPool(Generic[T, R]):
    """Runs ``hash_one(item, progress, cancel) -> result`` over ``items`` with ``jobs`` threads."""

    def __init__(self, hash_one: Callable[[T, Callable[[int, int], None], object], R], sizes: dict[int, int],
                 jobs: int, cancel: threading.Event | None = None,
                 on_progress: Callable[[int, int], None] | None = None,
                 on_file_progress: Callable[[T, int, int], None] | None = None,
                 on_start: Callable[[T], None] | None = None,
                 on_done: Callable[[T, R], None] | None = None,
                 on_error: Callable[[T, BaseException], None] | None = None):
        self.hash_one = hash_one
        self.sizes = sizes  # id(item) -> bytes, for the total
        self.jobs = max(1, jobs)
        self.cancel = _Cancel(cancel)
        self.on_progress, self.on_file_progress = on_progress, on_file_progress
        self.on_start, self.on_done, self.on_error = on_start, on_done, on_error
        self._lock = threading.Lock()  # callbacks one at a time; the byte counts
        self._done: dict[int, int] = {}
        self._total = sum(sizes.values())
        self._first_error: BaseException | None = None

    def run(self, items: list[T]) -> None:
        """Hash every item; raises HashCancelled when cancelled, else the first error that
        ``on_error`` did not take (the other files are stopped first)."""
        if self.jobs == 1 or len(items) <= 1:
            for item in items:
                self._one(item)
                if self._first_error is not None:
                    break
        else:
            todo: queue.Queue = queue.Queue()
            for item in items:
                todo.put(item)
            threads = [threading.Thread(target=self._work, args=(todo,), name=f"hash-{i}", daemon=True)
                       for i in range(min(self.jobs, len(items)))]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
        if self._first_error is not None:
            raise self._first_error
        if self.cancel.outer is not None and self.cancel.outer.is_set():
            raise HashCancelled("(hashing)")

    def _work(self, todo: queue.Queue) -> None:
        while not self.cancel.is_set():
            try:
                item = todo.get_nowait()
            except queue.Empty:
                return
            self._one(item)

    def _one(self, item: T) -> None:
        key = id(item)
        size = self.sizes.get(key, 0)

        def progress(n: int, file_total: int) -> None:
            with self._lock:
                self._done[key] = n
                self._total = max(self._total, sum(self._done.values()))
                if self.on_file_progress:
                    self.on_file_progress(item, n, file_total)
                if self.on_progress:
                    self.on_progress(sum(self._done.values()), self._total)

        with self._lock:
            if self.on_start:
                self.on_start(item)
        try:
            result = self.hash_one(item, progress, self.cancel)
        except HashCancelled as e:
            with self._lock:
                if self._first_error is None and not (self.cancel.outer is not None and self.cancel.outer.is_set()):
                    self._first_error = e  # only when nobody cancelled: stopped for another file's error
            return
        except Exception as e:
            with self._lock:
                if self.on_error is not None:
                    try:
                        self.on_error(item, e)
                    except Exception as refused:  # not an error it takes: it ends the set
                        e = refused
                    else:
                        self._done[key] = size
                        return
                if self._first_error is None:
                    self._first_error = e
            self.cancel.set()
            return
        with self._lock:
            self._done[key] = size
            if self.on_done:
                self.on_done(item, result)
            if self.on_progress:
                self.on_progress(sum(self._done.values()), self._total)
