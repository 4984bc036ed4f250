"""The merge methods' element pass, fused: one pass per block of elements over the base and the
models, the byte-for-byte twin of ``engine.methods.streamed.compute`` (the torch ops the CUDA
backend runs).

Per element, fp64, in streamed.compute's order and with its roundings (a multiply, then an add:
never a fused multiply-add, which the torch twin cannot do): ``tau = x - base``; the running
"inputs finite" probe ``base + sum tau``; DELLA's keep bit or DARE's drop (the counter-based
uniform of ``engine.kernels.hashing``, computed inline from each model's stream key and the
element's index in its key); the trim threshold; times the model's factor; then the sum, or the
sign vote's sums; then the combine (disjoint mean of the elected sign, the sum over the factors'
scale, the mean over the factors, times model stock's t, or the key's median), the rescale
division, alpha, plus the base, and one rounding to each output dtype.

Arguments follow ``engine.kernels.mean.weighted_mean``: the read buffer as uint16 / float32 /
float64 views, each source a kind code and an element offset; the base's kind is -1 for a
median without one (deltas against 0); a median is passed no model (its statistics read them:
``engine.methods.streamed.element_models``). Per model: factor, drop stream key (int64 bits), trim
threshold; DELLA's keep bits as one row of packed bits (numpy's big-endian bit order) per model,
starting at bit ``keep_bit0``. ``first`` is the slice's first element index in its key (for the
drop hashes and the median). Codes: ``vote`` 0 none, 1 sum, 2 count; ``combine`` 0 sum
(divided by ``scale`` when that is not 1), 1 mean, 2 stock, 3 median. Divisors of 0 mean "not
divided". Returns the index of the first element whose probe is not finite, or -1.
"""

from __future__ import annotations

import numba
import numpy as np

from engine.kernels.floats import bf16_to_f64, f16_to_f64, f64_to_bf16_bits, f64_to_f16_bits, is_finite
from engine.kernels.hashing import _M1, _M2, GOLDEN
from engine.kernels.jit import kernel
from engine.kernels.mean import BF16, F16, F32

BLOCK = 2048  # seven fp64 accumulators of a block: 28 KB, in L1 while every model is added
VOTE_NONE, VOTE_SUM, VOTE_COUNT = 0, 1, 2
COMBINE_SUM, COMBINE_MEAN, COMBINE_STOCK, COMBINE_MEDIAN = 0, 1, 2, 3


@kernel
def widen(dst, kind, off, in16, in32, in64):
    """``dst`` = a source's elements from ``off`` widened to fp64 (kind -1: zeros)."""
    m = dst.size
    if kind == F16:
        src = in16[off:off + m]
        for i in range(m):
            dst[i] = f16_to_f64(src[i])
    elif kind == BF16:
        src = in16[off:off + m]
        for i in range(m):
            dst[i] = bf16_to_f64(src[i])
    elif kind == F32:
        src32 = in32[off:off + m]
        for i in range(m):
            dst[i] = np.float64(src32[i])
    elif kind < 0:
        for i in range(m):
            dst[i] = 0.0
    else:
        src64 = in64[off:off + m]
        for i in range(m):
            dst[i] = src64[i]


@kernel
def widen_minus(dst, kind, in16, in32, in64, b):
    """``dst`` = a source's elements widened to fp64, minus ``b`` (a delta in one pass)."""
    m = dst.size
    if kind == F16:
        for i in range(m):
            dst[i] = f16_to_f64(in16[i]) - b[i]
    elif kind == BF16:
        for i in range(m):
            dst[i] = bf16_to_f64(in16[i]) - b[i]
    elif kind == F32:
        for i in range(m):
            dst[i] = np.float64(in32[i]) - b[i]
    else:
        for i in range(m):
            dst[i] = in64[i] - b[i]


@kernel
def _load_delta(x, b, probe, kind, off, in16, in32, in64):
    """``x`` = the model's values widened, minus ``b``; the probe adds them."""
    m = x.size
    if kind == F16:
        src = in16[off:off + m]
        for i in range(m):
            t = f16_to_f64(src[i]) - b[i]
            x[i] = t
            probe[i] = probe[i] + t
    elif kind == BF16:
        src = in16[off:off + m]
        for i in range(m):
            t = bf16_to_f64(src[i]) - b[i]
            x[i] = t
            probe[i] = probe[i] + t
    elif kind == F32:
        src32 = in32[off:off + m]
        for i in range(m):
            t = np.float64(src32[i]) - b[i]
            x[i] = t
            probe[i] = probe[i] + t
    else:
        src64 = in64[off:off + m]
        for i in range(m):
            t = src64[i] - b[i]
            x[i] = t
            probe[i] = probe[i] + t


@kernel
def _drop(x, key, first, drop):
    """DARE: the delta set to 0 where the element's uniform (``engine.kernels.hashing.uniform``
    of stream ``key``, element ``first + i``) is below ``drop``."""
    k = np.uint64(key)
    g = np.uint64(GOLDEN)
    m1 = np.uint64(_M1)
    m2 = np.uint64(_M2)
    for i in range(x.size):
        z = k + np.uint64(first + i + 1) * g
        z = (z ^ (z >> np.uint64(30))) * m1
        z = (z ^ (z >> np.uint64(27))) * m2
        z = z ^ (z >> np.uint64(31))
        u = np.float64(z >> np.uint64(11)) * (1.0 / 9007199254740992.0)
        x[i] = 0.0 if u < drop else x[i]


@kernel
def _keep(x, keep, bit0):
    """DELLA: the delta set to 0 where the model's keep bit (big-endian packed) is clear."""
    for i in range(x.size):
        bit = bit0 + i
        x[i] = x[i] if (keep[bit >> 3] >> (7 - (bit & 7))) & 1 else 0.0


@numba.njit(inline="always", error_model="numpy")
def filter_delta(x, has_keep, keep, bit0, has_drop, key, first, drop, has_trim, threshold):
    """A model's delta over a block, filtered in the methods' order: DELLA's keep bits (``keep``
    from bit ``bit0``) or DARE's drop (stream ``key``, elements from ``first``), then the trim."""
    if has_keep:
        _keep(x, keep, bit0)
    elif has_drop:
        _drop(x, key, first, drop)
    if has_trim:
        _trim(x, threshold)


@kernel
def _trim(x, thr):
    for i in range(x.size):
        x[i] = 0.0 if abs(x[i]) < thr else x[i]


@kernel
def _sum(total, x, f):
    """``total += x * f`` (a multiply, then an add)."""
    for i in range(x.size):
        total[i] = total[i] + x[i] * f


@kernel
def _vote_sum(total, pos, posw, neg, negw, x, f):
    """The sum vote's accumulators: the total of the weighted deltas, and per sign their sum and
    weight (adding 0.0 where the sign differs leaves a sum unchanged: none is ever -0.0)."""
    for i in range(x.size):
        t = x[i] * f
        up = t > 0.0
        down = t < 0.0
        total[i] = total[i] + t
        pos[i] = pos[i] + (t if up else 0.0)
        posw[i] = posw[i] + (f if up else 0.0)
        neg[i] = neg[i] + (t if down else 0.0)
        negw[i] = negw[i] + (f if down else 0.0)


@kernel
def _vote_count(total, pos, posw, neg, negw, x, f):
    """The count vote's: the total of the weighted signs (torch.sign: NaN stays NaN)."""
    for i in range(x.size):
        t = x[i] * f
        up = t > 0.0
        down = t < 0.0
        s = 1.0 if up else (-1.0 if down else t * 0.0)
        total[i] = total[i] + s * f
        pos[i] = pos[i] + (t if up else 0.0)
        posw[i] = posw[i] + (f if up else 0.0)
        neg[i] = neg[i] + (t if down else 0.0)
        negw[i] = negw[i] + (f if down else 0.0)


@kernel
def _delta_vote(total, pos, posw, neg, negw, x, b, probe, f, vote):
    """For a slice without drop or trim, over the widened values ``x``: the delta and the probe,
    and the accumulation (one loop without a vote; with one, ``x`` becomes the delta and the
    vote kernels add it), the same operations in the same order as the masked path."""
    if vote == VOTE_NONE:
        for i in range(x.size):
            t = x[i] - b[i]
            probe[i] = probe[i] + t
            total[i] = total[i] + t * f
        return
    for i in range(x.size):
        d = x[i] - b[i]
        probe[i] = probe[i] + d
        x[i] = d
    if vote == VOTE_SUM:
        _vote_sum(total, pos, posw, neg, negw, x, f)
    else:
        _vote_count(total, pos, posw, neg, negw, x, f)


@kernel
def _finish(b, total, pos, posw, neg, negw, med, vote, combine, mean_div, scale, stock_t, rescale_div, alpha):
    """The combined delta, rescaled, times alpha, plus the base, into ``total``."""
    for i in range(total.size):
        if combine == COMBINE_MEDIAN:
            d = med[i]
        elif vote != VOTE_NONE:
            tt = total[i]
            d = pos[i] / posw[i] if tt > 0.0 else (neg[i] / negw[i] if tt < 0.0 else 0.0)
        else:
            d = total[i]
            if combine == COMBINE_MEAN or combine == COMBINE_STOCK:
                d = d / mean_div
                if combine == COMBINE_STOCK:
                    d = d * stock_t
            elif scale != 1.0:
                d = d / scale
        if rescale_div != 0.0:
            d = d / rescale_div
        if alpha != 1.0:
            d = d * alpha
        total[i] = d + b[i]


@kernel
def _first_bad(probe):
    bad = 0
    for i in range(probe.size):
        bad += not is_finite(probe[i])
    if bad == 0:
        return -1
    for i in range(probe.size):
        if not is_finite(probe[i]):
            return i
    return -1


@kernel
def _store(acc, kind, off, out16, out32, out64):
    m = acc.size
    if kind == F16:
        o16 = out16[off:off + m]
        for i in range(m):
            o16[i] = f64_to_f16_bits(acc[i])
    elif kind == BF16:
        o16 = out16[off:off + m]
        for i in range(m):
            o16[i] = f64_to_bf16_bits(acc[i])
    elif kind == F32:
        o32 = out32[off:off + m]
        for i in range(m):
            o32[i] = np.float32(acc[i])
    else:
        o64 = out64[off:off + m]
        for i in range(m):
            o64[i] = acc[i]


@kernel
def method_elements(in16, in32, in64, base_kind, base_off, kinds, offsets, factors, keys, thresholds,
                    keep, keep_bit0, n, first, drop, has_drop, has_keep, has_trim, vote, combine, mean_div,
                    scale, stock_t, rescale_div, alpha, med, out16, out32, out64, out_kinds, out_offsets):
    """See the module docstring. Returns the first element whose inputs are not all finite, or -1."""
    blocks = np.empty((8, BLOCK), np.float64)
    for a in range(0, n, BLOCK):
        m = min(BLOCK, n - a)
        b = blocks[0, :m]
        x = blocks[1, :m]
        probe = blocks[2, :m]
        total = blocks[3, :m]
        pos = blocks[4, :m]
        posw = blocks[5, :m]
        neg = blocks[6, :m]
        negw = blocks[7, :m]
        widen(b, base_kind, base_off + a, in16, in32, in64)
        probe[:] = b
        total[:] = 0.0
        pos[:] = 0.0
        posw[:] = 0.0
        neg[:] = 0.0
        negw[:] = 0.0
        plain = not (has_keep or has_drop or has_trim)
        for j in range(kinds.size):
            if plain:
                widen(x, kinds[j], offsets[j] + a, in16, in32, in64)
                _delta_vote(total, pos, posw, neg, negw, x, b, probe, factors[j], vote)
                continue
            _load_delta(x, b, probe, kinds[j], offsets[j] + a, in16, in32, in64)
            filter_delta(x, has_keep, keep[j], keep_bit0 + a, has_drop, keys[j], first + a, drop, has_trim,
                         thresholds[j])
            if vote == VOTE_NONE:
                _sum(total, x, factors[j])
            elif vote == VOTE_SUM:
                _vote_sum(total, pos, posw, neg, negw, x, factors[j])
            else:
                _vote_count(total, pos, posw, neg, negw, x, factors[j])
        bad = _first_bad(probe)
        if bad >= 0:
            return a + bad
        _finish(b, total, pos, posw, neg, negw, med[a:a + m] if combine == COMBINE_MEDIAN else med[:0], vote,
                combine, mean_div, scale, stock_t, rescale_div, alpha)
        for j in range(out_kinds.size):
            _store(total, out_kinds[j], out_offsets[j] + a, out16, out32, out64)
    return -1
