"""Appending to a file with ``O_DIRECT``: the merge's outputs bypass the page cache.

Why: on the machines this project runs on, a buffered write of a merge output cost about a CPU
second per GB in the kernel (allocating, dirtying and then writing back page-cache pages; as
much to tmpfs), more than the merge's arithmetic. ``O_DIRECT`` hands the bytes straight to the
disk (0.1 CPU s per GB, and faster than a buffered write followed by ``fdatasync``), and an
output that is not read again has no business in the page cache anyway.

``O_DIRECT`` wants the file offset, the length and the buffer address aligned to the device's
block. Bytes are therefore copied into a page-aligned staging buffer and written in whole
blocks; ``flush`` also writes the last partial block (padded) and cuts the file back to its
true length, so after ``flush`` + ``fsync`` the file holds exactly what was written. The
partial block stays in the stage and is written again, whole, once more bytes arrive.

There are two stages: while a full one is written by this file's own thread, the next fills
(the caller's copies and the disk's writes overlap: one thread doing both in turn left the disk
idle during every copy, and a merge from the page cache waited on its output). At most one write
is in flight; its error is raised by the next ``write``, ``flush`` or ``close``, and the
descriptor is never closed under it.

A caller that keeps its buffer unchanged for a while can *lend* it (``write(data, lent=True)``
inside batches ended by ``end_batch``): the whole blocks of ``data`` that fall on the file's
block grid at an aligned address are then written straight from it, and only the partial blocks
at its ends are copied into the stage. The merge lays each large result out in its output buffer
at an address congruent to its file offset (``engine.merge.layout``), so its output is written
without the copy that otherwise cost as much memory traffic as the arithmetic's own writes. A
batch's queued pieces (the stage's blocks and the lent ones, in file order) go to the disk as
one ``pwritev``.

Where the file system refuses ``O_DIRECT`` (tmpfs before Linux 6.6, some FUSE and network
file systems: ``EINVAL`` at open or at the first write), the file falls back to ordinary
buffered writes through the same stage, so callers never need to know. ``ASTOLFO_DIRECT_IO=0``
(``direct_wanted``, asked by the merge's output streams and source readers) turns it off: the
benchmark's A/B, and a way out should a file system misbehave.
"""

from __future__ import annotations

import errno
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

BLOCK = 4096  # the largest logical block size in common use: aligning to it suits them all
STAGE_BYTES = 16 << 20
_NUMPY_COPY = 1 << 16  # from this many bytes a write's copy goes through numpy, which releases the GIL
LENT_MIN = 1 << 16  # a lent write shorter than this is copied: its partial blocks would be most of it
IOV_BATCH = 256  # pieces to one pwritev (the system's limit, IOV_MAX, is 1024 on Linux)
ENV = "ASTOLFO_DIRECT_IO"


def direct_wanted() -> bool:
    """O_DIRECT is available on this platform and not turned off."""
    if not hasattr(os, "O_DIRECT"):
        return False
    return os.environ.get(ENV, "").strip().lower() not in ("0", "no", "off", "false")


class DirectAppendFile:
    """A write-only file object (``write``, ``flush``, ``tell``, ``fileno``, ``close``) that
    appends from byte ``offset`` of ``path`` (0: the file is created or emptied; otherwise the
    file's first ``offset`` bytes are kept and anything after them is cut off).

    Bytes are queued as pieces of whole blocks (``_iov``, covering the file from ``_qbase`` to
    ``_base``) ahead of the *open region*: the stage's bytes from ``_at`` on, which hold the file
    from ``_base`` (block-aligned) to ``tell()``. A piece is a span of a stage, or a lent span
    of the caller's memory."""

    def __init__(self, path: str | os.PathLike, offset: int = 0, stage_bytes: int = STAGE_BYTES,
                 direct: bool = True):
        self.path = os.fspath(path)
        flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        if offset == 0:
            flags |= os.O_TRUNC
        self.direct = direct and hasattr(os, "O_DIRECT")
        self.fd = self._open(flags)
        self._cap = max(BLOCK, stage_bytes // BLOCK * BLOCK)
        self._maps = [mmap.mmap(-1, self._cap) for _ in range(2)]  # anonymous: page-aligned, as O_DIRECT needs
        self._stages = [memoryview(m) for m in self._maps]
        self._arrays = [np.frombuffer(m, np.uint8) for m in self._maps]
        self._filling = 0  # the stage being filled; the other one may be under a write
        self._pending: Future | None = None  # the write in flight
        self._pool: ThreadPoolExecutor | None = None
        self._base = offset // BLOCK * BLOCK  # file offset of the open region
        self._at = 0  # the open region's start in the filling stage (block-aligned)
        self._fill = offset - self._base  # bytes in the open region
        self._iov: list[memoryview] = []  # queued whole blocks, in file order
        self._qbase = self._base  # file offset of the first queued byte
        self._lent = False  # a queued piece is the caller's memory
        self.lent_bytes = 0  # bytes written straight from lent memory (not copied)
        try:
            if self._fill:
                self._load_tail()
            os.ftruncate(self.fd, offset)
        except BaseException:
            self.close()
            raise

    def _open(self, flags: int) -> int:
        if self.direct:
            try:
                return os.open(self.path, flags | os.O_DIRECT, 0o644)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.direct = False
        return os.open(self.path, flags, 0o644)

    def _load_tail(self) -> None:
        """The kept bytes of the last partial block go back into the stage (they are written
        again, whole, with the bytes that follow them)."""
        fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            got = os.preadv(fd, [self._stages[0][:self._fill]], self._base)
        finally:
            os.close(fd)
        if got != self._fill:
            raise OSError(errno.EIO, f"{self.path}: shorter than the {self._base + self._fill} bytes to keep")

    # the file object's interface ------------------------------------------------------------
    def fileno(self) -> int:
        return self.fd

    def tell(self) -> int:
        return self._base + self._fill

    def write(self, data, lent: bool = False) -> int:
        """Append ``data``. ``lent``: the caller leaves ``data``'s memory unchanged until the
        ``end_batch`` after the one that ends this batch has returned (or ``flush``, ``close``),
        so its aligned whole blocks may be written straight from it."""
        view = memoryview(data).cast("B")
        if lent and self.direct and len(view) >= LENT_MIN:
            head = -self.tell() % BLOCK  # bytes that complete the open region's last block
            mid = max(0, len(view) - head) // BLOCK * BLOCK
            if mid and (_address(view) + head) % BLOCK == 0:
                self._copy(view[:head])
                self._close_region()
                self._iov.append(view[head:head + mid])
                self._base += mid
                self.lent_bytes += mid
                self._lent = True
                self._copy(view[head + mid:])
                return len(view)
        self._copy(view)
        return len(view)

    def end_batch(self) -> None:
        """The lent pieces queued so far go to the disk; returns once every write queued before
        the previous ``end_batch`` is done (the memory lent before it is free again)."""
        if self.fd < 0:
            return
        if self._lent:
            self._close_region()
            self._submit()
        else:
            self._wait()

    def flush(self) -> None:
        """Everything written so far goes to the file (the partial last block padded, then the
        file cut back to its length): ``os.fsync`` afterwards makes it durable."""
        if self.fd < 0:
            return
        self._close_region()
        if self._iov:
            self._submit()
        self._wait()
        if self._fill:
            self._pwritev([self._stages[self._filling][self._at:self._at + BLOCK]], self._base)
            os.ftruncate(self.fd, self._base + self._fill)

    def close(self) -> None:
        """Flush and close; the descriptor and the stage are released even when the flush fails
        (a full disk), and that error is raised."""
        if self.fd < 0:
            return
        try:
            self.flush()
        finally:
            try:
                self._wait()  # (after a failed flush) no write may outlive the descriptor
            except OSError:
                pass
            if self._pool is not None:
                self._pool.shutdown()
            os.close(self.fd)
            self.fd = -1
            self._iov = []
            self._arrays = []  # (numpy's views of the maps go first, or closing them fails)
            for stage, m in zip(self._stages, self._maps):
                stage.release()
                try:
                    m.close()
                except BufferError:  # a slice still held by an error's traceback: freed with it
                    pass

    @property
    def closed(self) -> bool:
        return self.fd < 0

    # internals ------------------------------------------------------------------------------
    def _copy(self, view: memoryview) -> None:
        """Copy ``view`` onto the open region, queueing and writing the stage whenever it fills."""
        src = np.frombuffer(view, np.uint8) if len(view) >= _NUMPY_COPY else None
        done = 0
        while done < len(view):
            at = self._at + self._fill
            n = min(len(view) - done, self._cap - at)
            if src is not None:  # numpy copies without the GIL: the merge's workers are not held up
                np.copyto(self._arrays[self._filling][at:at + n], src[done:done + n])
            else:
                self._stages[self._filling][at:at + n] = view[done:done + n]
            self._fill += n
            done += n
            if self._at + self._fill == self._cap:
                self._close_region()
                self._submit()

    def _close_region(self) -> None:
        """The open region's whole blocks join the queue; its partial block stays open."""
        whole = self._fill // BLOCK * BLOCK
        if whole:
            self._iov.append(self._stages[self._filling][self._at:self._at + whole])
            self._at += whole
            self._base += whole
            self._fill -= whole

    def _submit(self) -> None:
        """Hand the queue to the file's thread and go on filling the other stage (once the write
        before, which used it, is done), the open partial block moved to its front."""
        self._wait()  # (its error raised before anything moves: a flush tries these bytes again)
        pieces, offset = self._iov, self._qbase
        self._iov, self._qbase, self._lent = [], self._base, False
        full = self._stages[self._filling]
        self._filling ^= 1
        if self._fill:
            self._stages[self._filling][:self._fill] = full[self._at:self._at + self._fill]
        self._at = 0
        if pieces:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="direct-write")
            self._pending = self._pool.submit(self._pwritev, pieces, offset)

    def _wait(self) -> None:
        """The write in flight, if any, is done (its error raised here)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _pwritev(self, pieces: list[memoryview], offset: int) -> None:
        """Write ``pieces`` back to back from ``offset``, a few hundred to a call."""
        pieces = list(pieces)
        while pieces:
            batch = pieces[:IOV_BATCH]
            try:
                n = os.pwritev(self.fd, batch, offset)
            except OSError as e:
                if e.errno != errno.EINVAL or not self.direct:
                    raise
                self._go_buffered()  # the file system took the open but not the write
                continue
            if n <= 0:
                raise OSError(errno.EIO, f"{self.path}: write returned {n}")
            offset += n
            while n:  # drop what was written
                if n >= len(pieces[0]):
                    n -= len(pieces.pop(0))
                else:
                    pieces[0] = pieces[0][n:]
                    n = 0
            if pieces and self.direct and offset % BLOCK:
                self._go_buffered()  # a short write off the block grid: finish it buffered

    def _go_buffered(self) -> None:
        import fcntl

        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl_flags(self.fd) & ~os.O_DIRECT)
        self.direct = False


def _address(view: memoryview) -> int:
    """Where ``view``'s first byte lies in memory."""
    return np.frombuffer(view, np.uint8).ctypes.data if len(view) else 0


def fcntl_flags(fd: int) -> int:
    """The open file's status flags (``O_DIRECT`` among them)."""
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETFL)
