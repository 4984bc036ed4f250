"""The weighted mean of a merge node, fused: one pass per block of elements.

For each block of ``BLOCK`` elements (fp64 accumulators that stay in L1): every source is
widened to fp64, multiplied by its factor and then added, in source order (two roundings, never
a fused multiply-add: the torch kernel of the CUDA path does the same, so CPU and GPU bytes agree
where a factor is not an exact integer; numba without fastmath never contracts); then, in one pass,
the sums are checked finite, divided once by the total (a true division, or the product by the
exact reciprocal of a power-of-two total: the same rounding of the same real number) and rounded
once to the first output dtype (``engine.kernels.floats``), the others from the divided sums. The
result is byte-identical to ``engine.merge.arithmetic.Kernel``.

Arguments are numba-friendly: the read buffer as three dtype views (uint16 for fp16 and bf16,
float32, float64), each source as a kind code and an element offset into its view, each output
likewise into the output buffer's views. A checked copy is a mean of one source with factor 1.

``weighted_mean`` returns the index of the first element whose sum is not finite (NaN or Inf in
a source, or an overflow of the sum), or -1; with ``check`` false it computes every element and
returns -1. A caller then finds the culprit sources as the torch engine does.
"""

from __future__ import annotations

import math

import numpy as np

from engine.kernels.floats import (
    bf16_to_f64,
    f16_to_f64,
    f64_to_bf16_bits,
    f64_to_f16_bits,
    is_finite,
)
from engine.kernels.jit import inline, kernel

F16, BF16, F32, F64 = 0, 1, 2, 3
KIND = {"F16": F16, "BF16": BF16, "F32": F32, "F64": F64}
BLOCK = 1024  # 16 KB of fp64 sums: they stay in L1 while every source is added


@kernel
def _add_f16(acc, src, w, first):
    if first:
        for i in range(acc.size):
            acc[i] = f16_to_f64(src[i]) * w
    else:
        for i in range(acc.size):
            acc[i] = acc[i] + f16_to_f64(src[i]) * w


@kernel
def _add_bf16(acc, src, w, first):
    if first:
        for i in range(acc.size):
            acc[i] = bf16_to_f64(src[i]) * w
    else:
        for i in range(acc.size):
            acc[i] = acc[i] + bf16_to_f64(src[i]) * w


@kernel
def _add_float(acc, src, w, first):
    if first:
        for i in range(acc.size):
            acc[i] = np.float64(src[i]) * w
    else:
        for i in range(acc.size):
            acc[i] = acc[i] + np.float64(src[i]) * w


SCALE_NONE, SCALE_DIVIDE, SCALE_MULTIPLY = 0, 1, 2


@inline
def _scaled(v, scale, total, recip):
    if scale == SCALE_DIVIDE:
        return v / total
    if scale == SCALE_MULTIPLY:
        return v * recip
    return v


@kernel
def _finish_f16(acc, out, scale, total, recip):
    """Count the sums that are not finite, scale each (``_scaled``) back into ``acc`` and round
    it to fp16 into ``out``: one pass over the block instead of one for the check, one for the
    division and one per narrowing (about half the cost of the three on the project's machines)."""
    bad = 0
    for i in range(acc.size):
        v = acc[i]
        bad += not is_finite(v)
        v = _scaled(v, scale, total, recip)
        acc[i] = v
        out[i] = f64_to_f16_bits(v)
    return bad


@kernel
def _finish_bf16(acc, out, scale, total, recip):
    bad = 0
    for i in range(acc.size):
        v = acc[i]
        bad += not is_finite(v)
        v = _scaled(v, scale, total, recip)
        acc[i] = v
        out[i] = f64_to_bf16_bits(v)
    return bad


@kernel
def _finish_f32(acc, out, scale, total, recip):
    bad = 0
    for i in range(acc.size):
        v = acc[i]
        bad += not is_finite(v)
        v = _scaled(v, scale, total, recip)
        acc[i] = v
        out[i] = np.float32(v)
    return bad


@kernel
def _finish_f64(acc, out, scale, total, recip):
    bad = 0
    for i in range(acc.size):
        v = acc[i]
        bad += not is_finite(v)
        v = _scaled(v, scale, total, recip)
        acc[i] = v
        out[i] = v
    return bad


@kernel
def _first_bad(acc):
    for i in range(acc.size):
        if not is_finite(acc[i]):
            return i
    return -1


@kernel
def _to_f16(acc, out):
    for i in range(acc.size):
        out[i] = f64_to_f16_bits(acc[i])


@kernel
def _to_bf16(acc, out):
    for i in range(acc.size):
        out[i] = f64_to_bf16_bits(acc[i])


@kernel
def _to_f32(acc, out):
    for i in range(acc.size):
        out[i] = np.float32(acc[i])


@kernel
def _to_f64(acc, out):
    for i in range(acc.size):
        out[i] = acc[i]


@inline
def _sum(acc, in16, in32, in64, kinds, offsets, factors, a):
    """Elements ``a ..`` of every source, widened, times its factor, added in source order."""
    m = acc.size
    for j in range(kinds.size):
        o = offsets[j] + a
        k = kinds[j]
        if k == F16:
            _add_f16(acc, in16[o:o + m], factors[j], j == 0)
        elif k == BF16:
            _add_bf16(acc, in16[o:o + m], factors[j], j == 0)
        elif k == F32:
            _add_float(acc, in32[o:o + m], factors[j], j == 0)
        else:
            _add_float(acc, in64[o:o + m], factors[j], j == 0)


@kernel
def weighted_mean(in16, in32, in64, kinds, offsets, factors, total, n, out16, out32, out64, out_kinds,
                  out_offsets, check):
    """sum(factors[j] * source j) / total over ``n`` elements into every output; see the module
    docstring for the argument layout. Returns the first non-finite element's index, or -1."""
    acc_block = np.empty(BLOCK, np.float64)
    # Dividing by a power of two is multiplying by its exact reciprocal: both are the rounding
    # of the same real number, and a multiplication is several times cheaper than a division.
    frac, exp = math.frexp(total)
    scale = SCALE_NONE if total == 1.0 else (
        SCALE_MULTIPLY if abs(frac) == 0.5 and -1000 < exp < 1000 else SCALE_DIVIDE)
    recip = 1.0 / total
    for a in range(0, n, BLOCK):
        m = min(BLOCK, n - a)
        acc = acc_block[:m]
        _sum(acc, in16, in32, in64, kinds, offsets, factors, a)
        # the first output: checked, scaled and rounded in one pass (the scaled sums kept in acc
        # for the others); a block with a non-finite sum is abandoned at its first such element
        o = out_offsets[0] + a
        k = out_kinds[0]
        if k == F16:
            bad = _finish_f16(acc, out16[o:o + m], scale, total, recip)
        elif k == BF16:
            bad = _finish_bf16(acc, out16[o:o + m], scale, total, recip)
        elif k == F32:
            bad = _finish_f32(acc, out32[o:o + m], scale, total, recip)
        else:
            bad = _finish_f64(acc, out64[o:o + m], scale, total, recip)
        if check and bad:  # the first sum that is not finite (summed again: acc holds them scaled)
            _sum(acc, in16, in32, in64, kinds, offsets, factors, a)
            return a + _first_bad(acc)
        for j in range(1, out_kinds.size):
            o = out_offsets[j] + a
            k = out_kinds[j]
            if k == F16:
                _to_f16(acc, out16[o:o + m])
            elif k == BF16:
                _to_bf16(acc, out16[o:o + m])
            elif k == F32:
                _to_f32(acc, out32[o:o + m])
            else:
                _to_f64(acc, out64[o:o + m])
    return -1
