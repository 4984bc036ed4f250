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
ENV = "ASTOLFO_DIRECT_IO"


def direct_wanted() -> bool:
    """O_DIRECT is available on this platform and not turned off."""
    if not hasattr(os, "O_DIRECT"):
        return False
    return os.environ.get(ENV, "").strip().lower() not in ("0", "no", "off", "false")


class DirectAppendFile:
    """A write-only file object (``write``, ``flush``, ``tell``, ``fileno``, ``close``) that
    appends from byte ``offset`` of ``path`` (0: the file is created or emptied; otherwise the
    file's first ``offset`` bytes are kept and anything after them is cut off)."""

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
        self._stage = self._stages[0]  # the one filling
        self._pending: Future | None = None  # the other one's write
        self._pool: ThreadPoolExecutor | None = None
        self._base = offset // BLOCK * BLOCK  # file offset of stage[0]
        self._fill = offset - self._base  # bytes in the stage
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
            got = os.preadv(fd, [self._stage[:self._fill]], self._base)
        finally:
            os.close(fd)
        if got != self._fill:
            raise OSError(errno.EIO, f"{self.path}: shorter than the {self._base + self._fill} bytes to keep")

    # the file object's interface ------------------------------------------------------------
    def fileno(self) -> int:
        return self.fd

    def tell(self) -> int:
        return self._base + self._fill

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        src = np.frombuffer(view, np.uint8) if len(view) >= _NUMPY_COPY else None
        done = 0
        while done < len(view):
            n = min(len(view) - done, self._cap - self._fill)
            if src is not None:  # numpy copies without the GIL: the merge's workers are not held up
                np.copyto(self._arrays[self._stage is self._stages[1]][self._fill:self._fill + n], src[done:done + n])
            else:
                self._stage[self._fill:self._fill + n] = view[done:done + n]
            self._fill += n
            done += n
            if self._fill == self._cap:
                self._write_blocks()
        return done

    def flush(self) -> None:
        """Everything written so far goes to the file (the partial last block padded, then the
        file cut back to its length): ``os.fsync`` afterwards makes it durable."""
        if self.fd < 0:
            return
        self._wait()
        whole = self._fill // BLOCK * BLOCK
        if whole:
            self._pwrite(self._stage[:whole], self._base)
            self._keep_tail(whole, self._stage)
        if self._fill:
            self._pwrite(self._stage[:BLOCK], self._base)
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
    def _write_blocks(self) -> None:
        """Hand the full stage's whole blocks to the file's thread and go on filling the other
        stage, its partial block moved to the other's front."""
        whole = self._fill // BLOCK * BLOCK
        if not whole:
            return
        self._wait()  # the other stage is free once its write is done
        full, base = self._stage, self._base
        self._stage = self._stages[1] if full is self._stages[0] else self._stages[0]
        self._keep_tail(whole, full)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="direct-write")
        self._pending = self._pool.submit(self._pwrite, full[:whole], base)

    def _keep_tail(self, whole: int, written) -> None:
        """The bytes after the first ``whole`` of ``written`` go to the front of the filling
        stage, which now starts ``whole`` bytes further into the file."""
        rest = self._fill - whole
        if rest:
            self._stage[:rest] = written[whole:self._fill]
        self._base += whole
        self._fill = rest

    def _wait(self) -> None:
        """The write in flight, if any, is done (its error raised here)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _pwrite(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            try:
                n = os.pwrite(self.fd, view[done:], offset + done)
            except OSError as e:
                if e.errno != errno.EINVAL or not self.direct:
                    raise
                self._go_buffered()  # the file system took the open but not the write
                continue
            if n <= 0:
                raise OSError(errno.EIO, f"{self.path}: write returned {n}")
            done += n
            if done < len(view) and self.direct and (offset + done) % BLOCK:
                self._go_buffered()  # a short write off the block grid: finish it buffered

    def _go_buffered(self) -> None:
        import fcntl

        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl_flags(self.fd) & ~os.O_DIRECT)
        self.direct = False


def fcntl_flags(fd: int) -> int:
    """The open file's status flags (``O_DIRECT`` among them)."""
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETFL)
