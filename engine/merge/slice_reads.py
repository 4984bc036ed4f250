"""Reads of a segment's source slices from the page cache: whole, into an item's read buffer at
their places (what the reader threads do), or a stretch of elements into any view (what the CPU
backend does when it reads its own sources, ``engine.merge.backends.cpu_stretches``).

Each read is a positional ``pread`` (threads may share a descriptor); a failed or short read is
a SafetensorsError that names the file and the byte.
"""

from __future__ import annotations

from engine.checkpoint.format import DTYPES
from engine.checkpoint.reader import pread_exact
from engine.merge.layout import Segment, SourceSlice


class SliceReads:
    def __init__(self, fds: list[int], paths: list):
        self.fds = fds
        self.paths = paths

    def read(self, s: SourceSlice, a: int, b: int, view: memoryview) -> None:
        """Elements ``a .. b`` of the slice ``s`` (counted from the slice's first) into ``view``."""
        size = DTYPES[s.dtype].itemsize
        pread_exact(self.fds[s.file], view[: (b - a) * size], s.file_offset + a * size, self.paths[s.file])

    def read_segment(self, seg: Segment, buf: memoryview) -> None:
        """Every slice of ``seg`` the element pass reads, whole, at its place in the read buffer."""
        for s in seg.sources:
            if s.read:
                pread_exact(self.fds[s.file], buf[s.buf_offset: s.buf_offset + s.nbytes], s.file_offset,
                            self.paths[s.file])
