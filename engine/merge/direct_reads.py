"""Source reads past the page cache (``O_DIRECT``), for merges whose files could not stay cached.

Why: a cold buffered read cost this project's 2-core machine about 0.6 CPU s per GB in the kernel
(page-cache pages allocated, filled, then dropped again behind the merge), a third of the
machine while a full-size merge streams 20-1800 GB of sources. An ``O_DIRECT`` read has the disk
write into our own memory: about 0.07 CPU s per GB.

``O_DIRECT`` wants offsets, lengths and addresses aligned to the device block, and tensors sit
anywhere in a safetensors file. So an item's slices of one file are read in *windows*: aligned
runs of the file, at most a bounce buffer long, that cover the slices and any small gaps
between them (reading a gap of up to ``GAP`` bytes is cheaper than another request), and each
slice's bytes are copied from the bounce buffer to their place in the read buffer. The copy
stays in the CPU's caches (the bounce buffer is a few MB and reused).

Each source file is reopened for this through ``/proc/self/fd``, which names the very file the
merge opened and checked (never the path again: the file there may have changed). Where that or
``O_DIRECT`` is not available, ``open_direct`` returns None and the readers keep buffered reads.
"""

from __future__ import annotations

import errno
import mmap
import os
from dataclasses import dataclass

import numpy as np

from engine.checkpoint.direct_io import BLOCK, direct_wanted
from engine.checkpoint.format import SafetensorsError
from engine.checkpoint.reader import close_fds

BOUNCE_BYTES = 8 << 20
GAP = 256 << 10  # read through gaps up to this size rather than issue another request


@dataclass(frozen=True)
class Range:
    lo: int  # file bytes [lo, hi) go to the read buffer at ``dest``
    hi: int
    dest: int


@dataclass(frozen=True)
class Window:
    start: int  # aligned file offset read into the bounce buffer
    length: int  # aligned bytes to read (the file may end sooner)
    need: int  # file offset up to which the bytes must be there (else the file is short)
    copies: tuple[tuple[int, int, int], ...]  # (bounce offset, read-buffer offset, bytes)


def windows(ranges: list[Range], cap: int, gap: int = GAP, block: int = BLOCK) -> list[Window]:
    """Aligned reads of at most ``cap`` bytes (a multiple of ``block``) that deliver every byte
    of ``ranges``, and the copies that put them in place. Ranges may overlap and come in any
    order; each byte is copied from the window that first covers it."""
    todo = sorted((r for r in ranges if r.hi > r.lo), key=lambda r: (r.lo, r.hi))
    out: list[Window] = []
    cursor = 0  # every byte below this, of every range, is delivered
    j = 0
    while j < len(todo):
        lo = max(cursor, todo[j].lo)
        start = lo // block * block
        limit = start + cap
        end = min(todo[j].hi, limit)
        t = j + 1
        while t < len(todo) and todo[t].lo <= end + gap and todo[t].lo < limit:
            end = max(end, min(todo[t].hi, limit))
            t += 1
        copies = []
        for r in todo[j:t]:
            a, b = max(r.lo, lo), min(r.hi, end)
            if a < b:
                copies.append((a - start, r.dest + (a - r.lo), b - a))
        length = min(-(-end // block) * block, limit) - start
        out.append(Window(start, length, end, tuple(copies)))
        cursor = end
        # on to the first range with bytes left; a later range that ended sooner was copied by
        # the windows that covered it, and is skipped by an empty intersection
        while j < len(todo) and todo[j].hi <= cursor:
            j += 1
    return out


def pread_blocks(fd: int, view: memoryview, offset: int, path) -> int:
    """Read ``view`` from an ``O_DIRECT`` descriptor at the aligned ``offset``; returns the bytes
    read, fewer only at the end of the file (the caller checks that what it needs is there). An
    error is a SafetensorsError naming the file and the byte."""
    done = 0
    while done < len(view):
        try:
            n = os.preadv(fd, [view[done:]], offset + done)
        except OSError as e:
            if e.errno == errno.EINTR:
                continue
            raise SafetensorsError(path, f"read failed at byte {offset + done}: {e.strerror or e}") from None
        if n <= 0:
            break
        done += n
        if done % BLOCK:
            break  # a short read ends off the block grid only at the end of the file
    return done


class DirectFiles:
    """``O_DIRECT`` descriptors of the merge's source files and one bounce buffer per reader."""

    def __init__(self, fds: list[int], paths: list, readers: int):
        self.paths = paths
        self.fds: list[int] = []
        try:
            for fd in fds:
                self.fds.append(os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC))
        except BaseException:
            self.close()
            raise
        self._maps = [mmap.mmap(-1, BOUNCE_BYTES) for _ in range(readers)]
        self.bounces = [np.frombuffer(m, np.uint8) for m in self._maps]

    def read(self, reader: int, ranges_by_file: dict[int, list[Range]], dest: np.ndarray, before_read) -> None:
        """Fill ``dest`` (the read buffer's bytes) with every range; ``before_read(nbytes)`` runs
        before each request (the stop check and the read-rate limit)."""
        bounce = self.bounces[reader]
        view = memoryview(bounce)
        for f, ranges in ranges_by_file.items():
            for w in windows(ranges, len(bounce)):
                before_read(w.length)
                got = self._pread(f, view[:w.length], w.start)
                if w.start + got < w.need:
                    raise SafetensorsError(self.paths[f], f"unexpected end of file at byte {w.start + got} "
                                                          "(file truncated?)")
                for src, dst, n in w.copies:
                    dest[dst:dst + n] = bounce[src:src + n]

    def _pread(self, f: int, view: memoryview, offset: int) -> int:
        return pread_blocks(self.fds[f], view, offset, self.paths[f])

    def close(self) -> None:
        close_fds(self.fds)
        self.fds = []
        self.bounces = []
        for m in getattr(self, "_maps", []):
            try:
                m.close()
            except BufferError:
                pass


def open_direct(fds: list[int], paths: list, readers: int) -> DirectFiles | None:
    """Direct descriptors for the sources, or None where this system or file system has none
    (then the readers read through the page cache, as before)."""
    if not direct_wanted() or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        return DirectFiles(fds, paths, readers)
    except OSError:
        return None
