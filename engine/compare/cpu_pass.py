"""The compare pass's reduction on the CPU: numba's deltas kernel and Gram lanes, each chunk's
two phases split across the cores.

Each phase (deltas, Gram) is cut into parts that touch disjoint memory (element ranges, blocks
of pairs) and is finished by every part before the next starts, so the bits do not depend on
the number of threads. The read buffer goes back to the reader as soon as the deltas hold its
values, before the Gram is added, so the next read overlaps the Gram.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

from engine.compare.buffers import ReadBuffers

DEFAULT_BUDGET = 40 << 20  # bytes of the read buffers and the fp64 deltas: within the L3 cache
_SPLIT = 1 << 16  # elements of a chunk (all rows) below which one thread does it: not worth a hand-off


def _span(m: int, k: int, parts: int) -> tuple[int, int]:
    """Part ``k`` of ``parts`` of the elements ``0 .. m``, cut at tile boundaries."""
    from engine.kernels.deltas import TILE

    tiles = -(-m // TILE)
    return min(m, tiles * k // parts * TILE), min(m, tiles * (k + 1) // parts * TILE)


class _Team:
    """The threads a chunk's work is split across: the caller's and ``size - 1`` workers.
    numba's kernels and the reads release the GIL."""

    def __init__(self, size: int):
        self.size = max(1, size)
        self.pool = ThreadPoolExecutor(self.size - 1, thread_name_prefix="astolfo-compare") if self.size > 1 else None

    def run(self, phase: Callable[[int], None], parts: int) -> None:
        """``phase(k)`` for every part ``k``; the first error (in part order) is raised once all
        parts have stopped, so no worker still writes into a buffer the caller reuses."""
        if self.pool is None or parts == 1:
            for k in range(parts):
                phase(k)
            return
        futures = [self.pool.submit(phase, k) for k in range(1, parts)]
        error: BaseException | None = None
        try:
            phase(0)
        except BaseException as e:
            error = e
        for f in futures:
            try:
                f.result()
            except BaseException as e:
                error = error or e
        if error is not None:
            raise error

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


class CpuPass:
    """Deltas and Gram matrices of one component at a time, in fp64 lanes (see
    ``engine.kernels.gram``); ``threads`` share each chunk."""

    budget = DEFAULT_BUDGET

    def __init__(self, threads: int):
        self.team = _Team(threads)
        self.name = f"cpu ({self.team.size} threads)"

    def buffers(self, rows: int, chunk: int, count: int) -> list:
        return [ReadBuffers(rows, chunk) for _ in range(count)]

    def start(self, n: int, with_ref: bool, chunk: int) -> None:
        """Begin a component of ``n`` models (and the reference row, read or the mean)."""
        self.n, self.with_ref = n, with_ref
        self.xs = np.empty((n + 1, chunk), np.float64)
        self.lanes: dict[str | None, np.ndarray] = {}

    def add(self, slot, block: str | None, layout: tuple[np.ndarray, np.ndarray], start: int, m: int,
            give_back: Callable[[object], None]) -> None:
        """Add the chunk in ``slot`` (``m`` elements from ``start`` of a tensor of ``block``)."""
        from engine.kernels.deltas import deltas
        from engine.kernels.gram import LANES, gram_add_part

        n, xs = self.n, self.xs
        acc = self.lanes.get(block)
        if acc is None:
            acc = self.lanes[block] = np.zeros((n + 1, n + 1, LANES), np.float64)
        kinds, offs = layout
        parts = self.team.size if m * len(kinds) >= _SPLIT else 1

        def center(k: int) -> None:
            j0, j1 = _span(m, k, parts)
            # a NaN/Inf (inf - inf here) reaches the delta's norm on the Gram's diagonal, where
            # result.py leaves the model out of the component (its non-finite diagonal)
            deltas(xs, kinds, offs, slot.in16, slot.in32, slot.in64, n, self.with_ref, j0, j1)

        def gram(k: int) -> None:
            gram_add_part(acc, xs[:, :m], start, k, parts)

        self.team.run(center, parts)
        give_back(slot)  # its bytes are in xs now: the next read may go there
        self.team.run(gram, parts)

    def drain(self, give_back: Callable[[object], None]) -> None:
        """Nothing is held past ``add``."""

    def finish(self) -> dict[str | None, np.ndarray]:
        from engine.kernels.gram import gram_finish

        grams = {b: gram_finish(acc) for b, acc in self.lanes.items()}
        self.lanes = {}
        return grams

    def close(self) -> None:
        self.team.close()
