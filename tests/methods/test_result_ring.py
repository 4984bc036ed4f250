"""The medians' result ring (engine.methods.result_ring): results taken in key order reuse one
array as the earlier ones are dropped, in any order of dropping; a result that finds no room,
and a small one, get an array of their own; a view handed out stays valid whatever comes after."""

from __future__ import annotations

import gc

import numpy as np

from engine.methods.result_ring import SMALLEST, ResultRing


def _on_ring(ring: ResultRing, m: np.ndarray) -> bool:
    return ring._buf is not None and m.base is ring._buf


def test_results_reuse_the_ring_once_the_earlier_ones_are_dropped():
    ring = ResultRing()
    ring.reserve(4 * SMALLEST)
    a = ring.take(2 * SMALLEST)
    b = ring.take(2 * SMALLEST)
    assert _on_ring(ring, a) and _on_ring(ring, b)
    a[:] = 1.0
    b[:] = 2.0
    c = ring.take(SMALLEST)  # full: an array of its own
    assert not _on_ring(ring, c)
    del a
    gc.collect()
    d = ring.take(2 * SMALLEST)  # where a was (wrapped around to the start)
    assert _on_ring(ring, d) and d.__array_interface__["data"][0] == ring._buf.__array_interface__["data"][0]
    d[:] = 3.0
    assert (b == 2.0).all()  # b untouched by d
    del b, d
    gc.collect()
    assert ring.in_use() == 0


def test_a_later_result_dropped_first_frees_nothing_until_the_earlier_one_goes():
    ring = ResultRing()
    ring.reserve(3 * SMALLEST)
    a = ring.take(SMALLEST)
    b = ring.take(SMALLEST)
    c = ring.take(SMALLEST)
    del b, c  # out of order: a still holds the oldest stretch
    gc.collect()
    assert ring.in_use() == 3
    e = ring.take(SMALLEST)
    assert not _on_ring(ring, e)  # no room behind a
    a[:] = 5.0
    del a
    gc.collect()
    assert ring.in_use() == 0
    f = ring.take(3 * SMALLEST)
    assert _on_ring(ring, f)


def test_small_results_and_no_ring_give_plain_arrays():
    ring = ResultRing()
    ring.reserve(0)
    assert not _on_ring(ring, ring.take(4 * SMALLEST))
    ring.reserve(4 * SMALLEST)
    small = ring.take(SMALLEST - 1)
    assert small.size == SMALLEST - 1 and not _on_ring(ring, small)
    assert ring.take(0).size == 0


def test_a_view_of_an_earlier_pass_stays_valid_after_a_new_reserve():
    ring = ResultRing()
    ring.reserve(2 * SMALLEST)
    old = ring.take(2 * SMALLEST)
    old[:] = 7.0
    ring.reserve(2 * SMALLEST)  # the next pass: a new array
    new = ring.take(2 * SMALLEST)
    new[:] = 8.0
    assert (old == 7.0).all() and _on_ring(ring, new)
    del old  # its give-back belongs to the old array: the new ring is not touched
    gc.collect()
    assert ring.in_use() == 1
