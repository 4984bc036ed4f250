"""Each model file read front to back in large windows, for the compare pass.

The pass needs a chunk of every file at a time (a few hundred KB each for N = 8, less for more
models); read as such, a cold full-size pass ran at 0.57 GB/s where the merge engine reads at
the disk's 1.4 GB/s: one small request at a time to each of the files, and, for files that do
not fit the page cache, the kernel's CPU time filling and reclaiming pages. So each file gets a
window of its own, refilled by one large aligned read (``O_DIRECT`` when the files would fill
over half the RAM, as the merge engine's readers decide, else through the page cache), and the
chunks are copied out of it.

The direct descriptor is opened through ``/proc/self/fd``, which names the very file the pass
opened and checked; where that or ``O_DIRECT`` is not available the window reads through the
page cache. A file that ends before a tensor's bytes is a SafetensorsError naming the file.
"""

from __future__ import annotations

import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from engine.checkpoint.direct_io import BLOCK, direct_wanted
from engine.checkpoint.format import SafetensorsError
from engine.checkpoint.reader import pread_exact
from engine.merge.direct_reads import pread_blocks

WINDOW_TOTAL = 128 << 20  # the windows of all files together (two buffers each), 1-8 MB a buffer
AHEAD_THREADS = 4  # reads in flight at once besides the pass's own
WINDOW_MAX = 8 << 20
WINDOW_MIN = 1 << 20


class FileWindow:
    """A window onto one file: ``read(dest, offset)`` fills ``dest`` with the file's bytes from
    ``offset``. With ``O_DIRECT`` the window is two buffers: while the pass copies from one,
    ``ahead`` (a small thread pool shared by the files) reads the next stretch of the file into
    the other, so the disk has a request from every file in flight (one at a time, the pass read
    at the speed of ``cat``, below what the disk gives the merge engine's parallel readers).
    A read that leaves the window (a jump back, or past what was read ahead) refills it from
    the first byte it lacks, rounded down to a block. Without ``O_DIRECT`` there is no window:
    the page cache's readahead does that job, and the bytes go straight into ``dest`` (a second
    copy through a window cost more than it saved with the files cached)."""

    def __init__(self, fd: int, path, size: int, direct: bool, ahead: ThreadPoolExecutor | None):
        self.path = path
        self._fd = fd
        self._ahead = ahead
        self._own: int | None = None
        self._maps: list[mmap.mmap] = []
        self._bufs: list[np.ndarray] = []
        if direct:
            self._open_direct(size)
        self._lo = self._hi = 0
        self._next: Future | None = None  # the read into the other buffer: (start, bytes got)
        self._next_start = -1

    def _open_direct(self, size: int) -> None:
        """The ``O_DIRECT`` descriptor and the two page-aligned buffers, once a first block has
        read: some file systems open with ``O_DIRECT`` and refuse the reads (then the window is
        not used and reads go through the page cache)."""
        try:
            own = os.open(f"/proc/self/fd/{self._fd}", os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        except (OSError, AttributeError):
            return
        maps = [mmap.mmap(-1, size) for _ in range(2)]
        try:
            os.preadv(own, [memoryview(maps[0])[:BLOCK]], 0)
        except OSError:
            os.close(own)
            for m in maps:
                m.close()
            return
        self._own, self._maps = own, maps
        self._bufs = [np.frombuffer(m, np.uint8) for m in maps]

    def read(self, dest: memoryview, offset: int) -> None:
        if not self._maps:  # through the page cache: straight into ``dest``
            pread_exact(self._fd, dest, offset, self.path)
            return
        done = 0
        while done < len(dest):
            at = offset + done
            if not (self._lo <= at < self._hi):
                self._move_to(at)
            n = min(len(dest) - done, self._hi - at)
            dest[done:done + n] = self._bufs[0][at - self._lo: at - self._lo + n]
            done += n

    def _move_to(self, at: int) -> None:
        start = at // BLOCK * BLOCK
        got = -1
        if self._next is not None:
            future, self._next = self._next, None
            try:
                got = future.result()
            except SafetensorsError:
                got = -1  # read again below, where the error is raised if those bytes are needed
            if self._next_start <= at < self._next_start + max(got, 0):
                self._bufs.reverse()
                self._maps.reverse()
                start = self._next_start
            else:
                got = -1
        if got < 0:
            got = self._pread(memoryview(self._bufs[0]), start)
        self._lo, self._hi = start, start + got
        if self._hi <= at:
            raise SafetensorsError(self.path, f"unexpected end of file at byte {self._hi} (file truncated?)")
        if got == len(self._bufs[0]) and self._ahead is not None:  # not at the end: read the next stretch
            self._next_start = self._hi
            self._next = self._ahead.submit(self._pread, memoryview(self._bufs[1]), self._hi)

    def _pread(self, view: memoryview, offset: int) -> int:
        return pread_blocks(self._own, view, offset, self.path)

    def close(self) -> None:
        if self._next is not None:  # a read still going into a buffer: let it end first
            try:
                self._next.result()
            except BaseException:
                pass
            self._next = None
        if self._own is not None:
            try:
                os.close(self._own)
            except OSError:
                pass
            self._own = None
        self._bufs = []
        for m in self._maps:
            try:
                m.close()
            except BufferError:
                pass
        self._maps = []


class Windows(dict):
    """Source index -> FileWindow, and the pool that reads ahead for them."""

    def __init__(self, ahead: ThreadPoolExecutor | None):
        super().__init__()
        self.ahead = ahead

    def close(self) -> None:
        for w in self.values():
            w.close()
        if self.ahead is not None:
            self.ahead.shutdown(wait=True)


def open_windows(fds: dict[int, int], paths: dict[int, object], total_bytes: int,
                 direct: bool | None = None) -> Windows:
    """A window for each file (``fds``: source index -> descriptor). ``direct`` None: past the
    page cache when the files would fill over half the RAM (the merge engine's rule)."""
    from engine.merge.io import drop_cache_wanted

    if direct is None:
        direct = direct_wanted() and os.path.isdir("/proc/self/fd") and drop_cache_wanted(total_bytes)
    size = max(WINDOW_MIN, min(WINDOW_MAX, WINDOW_TOTAL // max(1, 2 * len(fds)))) // BLOCK * BLOCK
    out = Windows(ThreadPoolExecutor(AHEAD_THREADS, thread_name_prefix="astolfo-compare-ahead") if direct else None)
    try:
        for i, fd in fds.items():
            out[i] = FileWindow(fd, paths[i], size, direct, out.ahead)
    except BaseException:
        out.close()
        raise
    return out
