"""engine.kernels.median_points.span_points against the separate passes it fuses (widen less the
base, DELLA's keep bits or DARE's drop, the trim, the vote, the narrowing to fp32 or fp16, the centring
and the Gram matrix, each on the whole span): the same bits in every mode, whatever the tile,
with the values that are not finite counted per source."""

from __future__ import annotations

import numpy as np
import pytest

from engine.kernels import median_points as mp
from engine.kernels.gram import LANES, gram_add
from engine.kernels.hashing import _signed
from engine.kernels.mean import BF16, F16, F32, F64
from engine.kernels.median_gram import center
from engine.kernels.methods import _drop, _keep, _trim
from engine.kernels.weiszfeld import narrow_exactly, vote_filter

N, SPAN = 5, 3000  # not a multiple of any tile or of the lanes
FIRST = 4099  # the span's first element in its key (not a multiple of 8)
BASE_KIND = F16
KINDS = [F16, BF16, F32, F64, F16]  # the models'
NO_ROWS, NO_HELD, NO_LANES, NO_KEEP = np.zeros((1, 0)), np.zeros((1, 0), np.float32), np.zeros((1, 1, LANES)), \
    np.zeros((1, 1), np.uint8)


def _sources(rng, nan: bool):
    """The base and N models in one byte buffer (one slot each), and their fp64 values."""
    slot = SPAN * 8
    raw = np.zeros((N + 1) * slot, np.uint8)
    values = []
    for j, kind in enumerate([BASE_KIND] + KINDS):
        x = 0.5 + rng.standard_normal(SPAN) * 0.05
        at = raw[j * slot:(j + 1) * slot]
        if kind == F16:
            v = x.astype(np.float16)
            if nan and j == 1:  # the first model
                v[17] = np.nan
            at[:2 * SPAN] = v.view(np.uint8)
            values.append(v.astype(np.float64))
        elif kind == BF16:
            bits = (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
            at[:2 * SPAN] = bits.view(np.uint8)
            values.append((bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64))
        elif kind == F32:
            v = x.astype(np.float32)
            at[:4 * SPAN] = v.view(np.uint8)
            values.append(v.astype(np.float64))
        else:
            at[:] = x.view(np.uint8)
            values.append(x)
    sizes = {F16: 2, BF16: 2, F32: 4, F64: 8}
    offsets = [j * slot // sizes[k] for j, k in enumerate([BASE_KIND] + KINDS)]
    return raw, offsets, values


def _separate(values, has_base, filters, weights):
    """The points by the separate passes, on the whole span."""
    base = values[0] if has_base else np.zeros(SPAN)
    pts = np.stack([v - base if has_base else v.copy() for v in values[1:]])
    for j in range(N):
        if filters["keep"] is not None:
            _keep(pts[j], filters["keep"][j], filters["bit0"])
        elif filters["drop"] > 0:
            _drop(pts[j], filters["keys"][j], FIRST, filters["drop"])
        if filters["trim"] is not None:
            _trim(pts[j], filters["trim"][j])
    if filters["vote"]:
        vote_filter(pts, weights, filters["vote"] == 1)
    return pts


@pytest.mark.parametrize("has_base", [True, False])
@pytest.mark.parametrize("filtering", ["none", "dare+trim+sum", "della+count"])
@pytest.mark.parametrize("tile", [8, 64, 1024])
@pytest.mark.parametrize("held_type", [np.float32, np.uint16], ids=["fp32", "fp16"])
def test_every_mode_gives_the_bits_of_the_separate_passes(has_base, filtering, tile, held_type):
    rng = np.random.default_rng(7)
    raw, offsets, values = _sources(rng, nan=False)
    weights = np.array([1.0, 2.0, 0.5, 1.0, 3.0])
    filters = {"keep": None, "bit0": 0, "drop": 0.0, "keys": np.zeros(N, np.int64), "trim": None, "vote": 0}
    if "dare" in filtering:
        filters.update(drop=0.3, keys=np.array([_signed(1000 + j) for j in range(N)], np.int64),
                       trim=np.full(N, 0.01), vote=1)
    if "della" in filtering:
        bit0 = FIRST % 8
        filters.update(keep=rng.integers(0, 256, (N, (bit0 + SPAN + 7) // 8), dtype=np.uint8), bit0=bit0, vote=2)
    want = _separate(values, has_base, filters, weights)
    want_held = np.zeros((N, SPAN + 16), held_type)
    want_exact = narrow_exactly(want, want_held, 16)  # the fp64 model's deltas are not fp32 values
    assert not want_exact
    centred = want.copy()
    center(centred)
    want_lanes = np.zeros((N, N, LANES))
    gram_add(want_lanes, centred, FIRST)

    def run(mode, rows=NO_ROWS, held=NO_HELD, lanes=NO_LANES):
        bad = np.zeros(N + 1, np.int64)
        exact = mp.span_points(raw.view(np.uint16), raw.view(np.float32), raw.view(np.float64),
                               BASE_KIND if has_base else -1, offsets[0], np.array(KINDS, np.int64),
                               np.array(offsets[1:], np.int64), SPAN, FIRST, weights, filters["drop"],
                               filters["keys"], filters["drop"] > 0 and filters["keep"] is None,
                               filters["keep"] if filters["keep"] is not None else NO_KEEP,
                               filters["bit0"], filters["keep"] is not None,
                               filters["trim"] if filters["trim"] is not None else np.zeros(N),
                               filters["trim"] is not None, filters["vote"], np.empty(N * tile), bad, mode, rows,
                               held, 16, lanes)
        assert (bad == 0).all()
        return exact

    rows = np.full((N, SPAN + 16), -1.0)
    run(mp.ROWS, rows=rows)
    assert np.array_equal(rows[:, 16:].view(np.int64), want.view(np.int64))
    held = np.zeros((N, SPAN + 16), held_type)
    assert run(mp.HOLD, held=held) == want_exact
    assert np.array_equal(held, want_held)  # (fp16 held as its bits; fp32 by value: no NaN here)
    held = np.zeros((N, SPAN + 16), held_type)
    lanes = np.zeros((N, N, LANES))
    assert run(mp.GRAM, held=held, lanes=lanes) == want_exact
    assert np.array_equal(held, want_held)
    upper = np.triu_indices(N)
    assert np.array_equal(lanes[upper].view(np.int64), want_lanes[upper].view(np.int64))


def test_values_that_are_not_finite_are_counted_per_source_before_any_filter():
    rng = np.random.default_rng(3)
    raw, offsets, values = _sources(rng, nan=True)  # the first model holds a NaN at element 17
    bad = np.zeros(N + 1, np.int64)
    # DARE with drop 0.999 sets nearly every delta to 0: the NaN is counted all the same
    keys = np.array([_signed(5 + j) for j in range(N)], np.int64)
    held = np.zeros((N, SPAN), np.float32)
    mp.span_points(raw.view(np.uint16), raw.view(np.float32), raw.view(np.float64), BASE_KIND, offsets[0],
                   np.array(KINDS, np.int64), np.array(offsets[1:], np.int64), SPAN, 0, np.ones(N), 0.999,
                   keys, True, NO_KEEP, 0, False, np.zeros(N), False, 0, np.empty(N * 64), bad, mp.HOLD,
                   NO_ROWS, held, 0, NO_LANES)
    assert np.isnan(values[1][17])
    assert held[0, 17] == 0.0  # the drop hid the NaN
    assert bad.tolist() == [1, 0, 0, 0, 0, 0]  # and it was counted all the same


def test_tile_elements_are_a_multiple_of_the_lanes_and_fit_the_bytes():
    for count in (1, 2, 16, 100, 257, 5000):
        t = mp.tile_elements(count)
        assert t % 8 == 0 and 8 <= t <= mp.TILE_MAX
        assert t == 8 or t * count * 8 <= mp.TILE_BYTES


@pytest.mark.parametrize("mode", [mp.HOLD, mp.GRAM])
def test_fp16_models_without_a_base_are_held_as_their_stored_bits(mode):
    """A median of fp16 models themselves: every point is exact in fp16, held as the very bits
    stored (the Gram matrix is still that of the fp64 values)."""
    rng = np.random.default_rng(5)
    stored = (rng.standard_normal((N, SPAN)) * 0.05).astype(np.float16)
    stored[2, 9] = -0.0
    stored[3, 11] = np.float16(6e-8)  # a subnormal
    raw = stored.view(np.uint8).reshape(-1)
    held = np.zeros((N, SPAN + 16), np.uint16)
    lanes = np.zeros((N, N, LANES))
    bad = np.zeros(N + 1, np.int64)
    exact = mp.span_points(raw.view(np.uint16), raw[:0].view(np.float32), raw[:0].view(np.float64), -1, 0,
                           np.full(N, F16, np.int64), np.arange(N, dtype=np.int64) * SPAN, SPAN, FIRST, np.ones(N),
                           0.0, np.zeros(N, np.int64), False, NO_KEEP, 0, False, np.zeros(N), False, 0,
                           np.empty(N * 64), bad, mode, NO_ROWS, held, 16, lanes)
    assert exact and (bad == 0).all()
    assert np.array_equal(held[:, 16:], stored.view(np.uint16))
    if mode == mp.GRAM:
        centred = stored.astype(np.float64)
        center(centred)
        want = np.zeros((N, N, LANES))
        gram_add(want, centred, FIRST)
        upper = np.triu_indices(N)
        assert np.array_equal(lanes[upper].view(np.int64), want[upper].view(np.int64))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16], ids=["fp32", "fp64", "fp16"])
def test_the_last_pass_forms_the_iterate_of_a_step_bit_for_bit(dtype):
    """The Gram route's last pass (weiszfeld.iterate_only) gives the iterate a sweep's step
    forms from the same coefficients, without its distances."""
    from engine.kernels.weiszfeld import LANES as STEP_LANES
    from engine.kernels.weiszfeld import iterate_only, step

    rng = np.random.default_rng(11)
    values = (rng.standard_normal((7, 5000)) * 0.03).astype(dtype)
    points = values.view(np.uint16) if dtype == np.float16 else values  # fp16 held as its bits
    wide = values.astype(np.float64)  # the same values in fp64: the same iterate, bit for bit
    coef = rng.uniform(0.1, 3.0, 7)
    total = 0.0
    for c in coef:
        total += float(c)
    for col, count in ((0, 5000), (3, 4093), (1000, 2049)):
        want, got = np.zeros(count), np.full(count, np.nan)
        step(points, col, col + 5, count, coef, total, want, np.zeros((7, STEP_LANES)))
        iterate_only(points, col, count, coef, total, got)
        assert np.array_equal(got.view(np.int64), want.view(np.int64))
        lanes, wide_lanes, again = np.zeros((7, STEP_LANES)), np.zeros((7, STEP_LANES)), np.zeros(count)
        step(points, col, col + 5, count, coef, total, want, lanes)
        step(wide, col, col + 5, count, coef, total, again, wide_lanes)
        assert np.array_equal(again.view(np.int64), want.view(np.int64))
        assert np.array_equal(lanes.view(np.int64), wide_lanes.view(np.int64))
