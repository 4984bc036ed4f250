"""Whole-tensor reads for the methods' statistics (trim thresholds, DELLA ranks): the key's
base and each model's delta, one at a time, in fp64, on the statistics thread.

Three things made these reads the slow part of a cold TIES merge, each measured here (2 vCPU
VM, virtual disk), and each is undone here:

- one thread's buffered reads of a cold file wait on each request in turn (0.6-1.0 GB/s,
  whatever the request size); ``pread_pieces`` keeps ``READERS`` requests of ``PIECE_BYTES``
  in flight for a large tensor (1.4-2.0 GB/s in a read of one file alone; 1 MB or 8 MB
  pieces made no difference within a merge);
- the read of the next tensor waited for the work on the current one; ``WholeReads`` starts
  it (``following``, or the next key's first source, ``then``) before widening the current;
- a fresh array of a large key's size is mapped anew by the allocator and page-faults per
  4 KB on first touch (about 4 ns an element, ten times the widening); the buffers here are
  kept and grown to the largest key seen, for as long as the pass.

Memory: two raw buffers and two fp64 ones of the largest key the statistics read whole
(2 x 2 + 2 x 8 bytes an element of it: 1.2 GB for SDXL's largest, 63 M elements).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Callable

import torch

from engine.checkpoint.format import DTYPES
from engine.checkpoint.reader import pread_exact
from engine.plan.model import Source

PIECE_BYTES = 8 << 20
READERS = 4
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def pread_pieces(fd: int, view: memoryview, offset: int, path) -> None:
    """``pread_exact`` of a large range as several requests in flight (the threads share the
    fd: the reads are positional); the first error is raised once every piece has ended."""
    total = len(view)
    if total <= 2 * PIECE_BYTES:
        pread_exact(fd, view, offset, path)
        return
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(READERS, thread_name_prefix="astolfo-stats-read")
    pieces = [_POOL.submit(pread_exact, fd, view[a:a + PIECE_BYTES], offset + a, path)
              for a in range(0, total, PIECE_BYTES)]
    wait(pieces)
    for piece in pieces:
        piece.result()


class WholeReads:
    """One thread's whole-tensor reads, the next already under way while the current is
    widened and worked on. ``read_raw(src, view)`` fills ``view`` with ``src``'s bytes;
    ``widen(raw, src, minus, out)`` turns them into fp64 (``widening.widen_raw``)."""

    def __init__(self, read_raw: Callable[[Source, memoryview], None],
                 widen: Callable[[torch.Tensor, Source, torch.Tensor | None, torch.Tensor], torch.Tensor]):
        self._read_raw = read_raw
        self._widen = widen
        self._held: dict[str, torch.Tensor] = {}
        self._pending: tuple[Source, str, Future] | None = None
        self._fetcher = ThreadPoolExecutor(1, thread_name_prefix="astolfo-stats-fetch")
        self._next_raw = "raw0"
        self.then: Source | None = None  # fetched after a source with nothing following it

    def buffer(self, name: str, dtype: torch.dtype, n: int) -> torch.Tensor:
        """The kept buffer ``name``, at least ``n`` long (its first ``n``)."""
        buf = self._held.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < n:
            self._held.pop(name, None)  # the old one goes before the larger one comes
            buf = self._held[name] = torch.empty(n, dtype=dtype)
        return buf[:n]

    def f64(self, src: Source, minus: torch.Tensor | None, name: str, following: Source | None = None) -> torch.Tensor:
        """``src`` whole in fp64 (less ``minus``), in the kept buffer ``name``; the read of
        ``following`` (else of ``then``) starts before the widening."""
        raw = self._take(src)
        self._start(following if following is not None else self.then)
        return self._widen(raw, src, minus, self.buffer(name, torch.float64, _numel(src)))

    def close(self) -> None:
        """Let a read under way end (its result unused) and the fetch thread go."""
        self._settle()
        self._fetcher.shutdown(wait=True)
        self._held.clear()

    def _take(self, src: Source) -> torch.Tensor:
        pending = self._pending
        if pending is not None and pending[0] == src:
            self._pending = None
            pending[2].result()  # its error, if any, is this source's
            return self._held[pending[1]][:src.nbytes]
        self._settle()
        raw = self._raw_buffer(src)
        self._read_raw(src, memoryview(raw.numpy()))
        return raw

    def _start(self, src: Source | None) -> None:
        if src is None or (self._pending is not None and self._pending[0] == src):
            return
        self._settle()
        name = self._next_raw
        raw = self._raw_buffer(src)
        self._pending = (src, name, self._fetcher.submit(self._read_raw, src, memoryview(raw.numpy())))

    def _raw_buffer(self, src: Source) -> torch.Tensor:
        """The raw buffer not handed out last (the two alternate: one is read into while the
        other is widened)."""
        name = self._next_raw
        self._next_raw = "raw1" if name == "raw0" else "raw0"
        return self.buffer(name, torch.uint8, src.nbytes)

    def _settle(self) -> None:
        """A read nobody asks for any more ends here, its error dropped (the source is read
        again where it is wanted, and fails there)."""
        if self._pending is not None:
            _, _, future = self._pending
            self._pending = None
            wait([future])


def _numel(src: Source) -> int:
    return src.nbytes // DTYPES[src.dtype].itemsize
