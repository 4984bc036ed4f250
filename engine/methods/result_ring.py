"""Where the geometric medians' results live between their computation and the element pass
that writes them: one array reused as a ring, instead of a fresh array per key.

A key's median (fp64, 8 bytes an element) is computed a key or more ahead of the merge
(``engine.methods.stats_feed``) and dropped when the key's last item is computed. A fresh array
for each costs the first touch of each of its pages, which on this project's machine (a virtual
machine that hands freed memory back to its host) cost more than the arithmetic done on them:
2-3 s of a 16-model median merge that takes 7. The results are taken in key order and dropped in
key order, so one array serves them as a ring: each result takes the next free stretch, and the
stretch comes free when the result is dropped (a ``weakref.finalize`` on the view handed out,
which the key's statistics hold) and every earlier one has been too.

The ring is sized for the pass (``reserve``: the largest key's elements, twice, plus what the
statistics may hold ahead); a result that finds no room (a key dropped late) gets an array of its
own, as before. Small results always do: malloc's heap reuses their pages anyway.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque

import numpy as np

SMALLEST = 1 << 16  # elements: smaller results are plain arrays


class _Stretch:
    __slots__ = ("start", "stop", "done")

    def __init__(self, start: int, stop: int):
        self.start, self.stop, self.done = start, stop, False


class ResultRing:
    def __init__(self):
        self._lock = threading.Lock()
        self._buf: np.ndarray | None = None
        self._live: deque[_Stretch] = deque()  # in the order they were taken
        self._head = 0  # where the next stretch starts
        self._tail = 0  # where the oldest live stretch starts

    def reserve(self, elements: int) -> None:
        """A ring of ``elements`` fp64 for the coming pass (0: none); what the last pass handed
        out stays valid (its views keep their array alive)."""
        with self._lock:
            self._buf = np.empty(elements, np.float64) if elements >= SMALLEST else None
            self._live.clear()
            self._head = self._tail = 0

    def take(self, n: int) -> np.ndarray:
        """A float64[n] array; from the ring when there is room."""
        if n < SMALLEST:
            return np.empty(max(n, 1), np.float64)[:n]
        with self._lock:
            buf = self._buf
            start = None if buf is None else self._place(n, buf.size)
            if start is not None:
                stretch = _Stretch(start, start + n)
                self._live.append(stretch)
                self._head = start + n
        if start is None:
            return np.empty(n, np.float64)
        view = buf[start:start + n]
        weakref.finalize(view, self._give_back, buf, stretch)
        return view

    def _place(self, n: int, size: int) -> int | None:
        if not self._live:
            self._head = self._tail = 0
            return 0 if n <= size else None
        if self._tail < self._head:  # the live stretches do not wrap around
            if self._head + n <= size:  # after them
                return self._head
            if n <= self._tail:  # from the start, before the oldest live one
                return 0
            return None
        return self._head if self._head + n <= self._tail else None  # between the newest and the oldest

    def _give_back(self, buf: np.ndarray, stretch: _Stretch) -> None:
        with self._lock:
            if buf is not self._buf:
                return  # a stretch of an earlier pass's ring
            stretch.done = True
            while self._live and self._live[0].done:
                self._live.popleft()
            if self._live:
                self._tail = self._live[0].start
            else:
                self._head = self._tail = 0

    def in_use(self) -> int:
        """Stretches handed out and not yet given back (tests)."""
        with self._lock:
            return len(self._live)
