"""The geometric median's spans on the thread pool (``engine.methods.median._each``): every span
once, no more at a time than asked (each holds a span's points), and after a cancel or an error
nothing still runs when the call returns."""

from __future__ import annotations

import threading
import time

import pytest

from engine.methods.median import _each


class Tracker:
    def __init__(self, fail_at: int | None = None):
        self.lock = threading.Lock()
        self.done: list[int] = []
        self.active = 0
        self.most = 0
        self.fail_at = fail_at

    def __call__(self, s: int) -> None:
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
        try:
            time.sleep(0.01)
            if s == self.fail_at:
                raise ValueError(f"span {s}")
            with self.lock:
                self.done.append(s)
        finally:
            with self.lock:
                self.active -= 1


def test_every_span_once_and_at_most_at_once():
    t = Tracker()
    _each(t, 40, lambda: None, at_once=2)
    assert sorted(t.done) == list(range(40)) and t.most <= 2 and t.active == 0


def test_an_error_stops_the_spans_and_leaves_none_running():
    t = Tracker(fail_at=5)
    with pytest.raises(ValueError, match="span 5"):
        _each(t, 200, lambda: None, at_once=3)
    assert t.active == 0 and len(t.done) < 199


def test_a_cancel_stops_the_spans_and_leaves_none_running():
    class Cancelled(Exception):
        pass

    t = Tracker()
    running = []
    t0 = time.monotonic()

    def slow(s: int) -> None:
        running.append(s)
        t(s)
        time.sleep(0.3)
        running.remove(s)

    def check_cancel() -> None:
        if time.monotonic() - t0 > 0.05:
            raise Cancelled()

    with pytest.raises(Cancelled):
        _each(slow, 50, check_cancel, at_once=2)
    assert running == [] and len(t.done) < 50
