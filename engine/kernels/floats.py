"""Float formats from and to their bits, one element at a time, inside the kernels.

numba has no usable float16 or bfloat16 on the CPU, so 16-bit sources arrive as uint16 and are
decoded here with integer operations (exact: every fp16 and bf16 value is an fp64 value), and
16-bit results are encoded from fp32 bits. Every function is branch-free in effect (selects),
so a loop calling it vectorises.

Narrowing fp64 to fp16/bf16 rounds once, correctly: the fp64 value is first cut to fp32's 24
significant bits rounding to odd (the kept part, its last bit set when anything was cut), then
converted to fp32 (exact) and rounded to nearest-even at 16 bits, a rounding that is then the
correct rounding of the fp64 value (round to odd at >= p + 2 bits makes a later rounding to p
bits exact). This is the torch engine's recipe (``engine.merge.arithmetic.Kernel.narrow``) op for
op, so the bytes are the same, including where it is not a single rounding: bf16 results below
fp32's normal range (|x| < 2**-126), where the fp32 conversion rounds too.

NaN results are never written by a merge (a non-finite sum stops it or leaves the source out),
so their bits are not a contract; they still follow torch's AVX2/AVX-512 kernels: fp16 keeps the
sign and the top of the payload with the quiet bit set, bf16 is 0xFFFF.
"""

from __future__ import annotations

import numpy as np

from engine.kernels.jit import (
    HAS_F16C,
    f16_bits_to_f64_hw,
    f32_bits,
    f32_from_bits,
    f32_to_f16_bits_hw,
    f64_bits,
    f64_from_bits,
    inline,
    kernel,
)

# fp64 keeps 52 fraction bits, fp32 23: rounding to odd works on the 29 bits below fp32's.
_CUT = (1 << 29) - 1
_KEEP_LSB = 1 << 29
_F64_EXP = 0x7FF << 52


@inline
def _small_to_f64(b, mbits, bias):
    """A 16-bit float (1 sign, 15 - mbits exponent bits, mbits fraction bits) from its bits."""
    e = (b >> mbits) & ((1 << (15 - mbits)) - 1)
    m = b & ((1 << mbits) - 1)
    top = (1 << (15 - mbits)) - 1
    normal = f64_from_bits(((e + (1023 - bias)) << 52) | (m << (52 - mbits)))
    special = f64_from_bits(_F64_EXP | (m << (52 - mbits)))  # Inf, NaN (payload kept)
    sub = np.float64(m) * (2.0 ** (1 - bias - mbits))  # exact: m < 2**mbits
    v = sub if e == 0 else (special if e == top else normal)
    return -v if b & 0x8000 else v


@inline
def f16_to_f64_soft(b):
    """fp16 bits (an integer 0 .. 0xFFFF) to float64, exactly, with integer operations."""
    return _small_to_f64(np.int64(b), 10, 15)


@inline
def _f16_to_f64_hw(b):
    return f16_bits_to_f64_hw(np.int64(b))


@inline
def bf16_to_f64_soft(b):
    """bf16 bits (an integer 0 .. 0xFFFF) to float64, exactly, field by field."""
    return _small_to_f64(np.int64(b), 7, 127)


@inline
def bf16_to_f64(b):
    """bf16 bits (an integer 0 .. 0xFFFF) to float64, exactly: bf16 is the top half of fp32."""
    return np.float64(f32_from_bits(np.int64(b) << 16))


@inline
def f64_to_f32_odd(v):
    """fp64 rounded to odd at fp32's precision, then converted to fp32 (the first half of a
    correct narrowing to 16 bits; see the module docstring)."""
    bits = f64_bits(v)
    low = ((bits & _CUT) + _CUT) & _KEEP_LSB  # fp32's last kept bit, set iff something was cut
    return np.float32(f64_from_bits((bits & ~_CUT) | low))


@inline
def f32_to_f16_bits_soft(f):
    """fp32 to fp16 bits, round to nearest even (overflow to Inf, subnormals, NaN like vcvtps2ph),
    with integer operations."""
    x = f32_bits(f)
    sign = (x >> 16) & 0x8000
    a = x & 0x7FFFFFFF
    normal = (a - 0x38000000 + 0xFFF + ((a >> 13) & 1)) >> 13  # rebias 127 -> 15, round at bit 13
    # below fp16's normal range: adding 0.5 puts fp16's subnormal step (2**-24) at fp32's last
    # bit, so the fp32 addition does the rounding
    sub = f32_bits(f32_from_bits(a) + np.float32(0.5)) - 0x3F000000
    nan = 0x7E00 | ((a >> 13) & 0x3FF)
    h = sub if a < 0x38800000 else (normal if a < 0x477FF000 else (0x7C00 if a <= 0x7F800000 else nan))
    return sign | h


@inline
def _f32_to_f16_bits_hw(f):
    return f32_to_f16_bits_hw(f)


# The CPU's own fp16 conversions where it has them (one instruction per vector), else integer code.
f16_to_f64 = _f16_to_f64_hw if HAS_F16C else f16_to_f64_soft
f32_to_f16_bits = _f32_to_f16_bits_hw if HAS_F16C else f32_to_f16_bits_soft


@inline
def f32_to_bf16_bits(f):
    """fp32 to bf16 bits, round to nearest even on the integer bits (subnormals included)."""
    x = f32_bits(f)
    r = (x + 0x7FFF + ((x >> 16) & 1)) >> 16
    return 0xFFFF if (x & 0x7FFFFFFF) > 0x7F800000 else r


@inline
def f64_to_f16_bits(v):
    return f32_to_f16_bits(f64_to_f32_odd(v))


@inline
def f64_to_bf16_bits(v):
    return f32_to_bf16_bits(f64_to_f32_odd(v))


@inline
def is_finite(v):
    return abs(v) <= 1.7976931348623157e308  # False for Inf and NaN


# Array forms (tests, and callers converting whole arrays) ---------------------------------


@kernel
def f16_bits_to_f64(src, out):
    for i in range(src.size):
        out[i] = f16_to_f64(src[i])


@kernel
def f16_bits_to_f64_soft(src, out):
    for i in range(src.size):
        out[i] = f16_to_f64_soft(src[i])


@kernel
def bf16_bits_to_f64(src, out):
    for i in range(src.size):
        out[i] = bf16_to_f64(src[i])


@kernel
def bf16_bits_to_f64_soft(src, out):
    for i in range(src.size):
        out[i] = bf16_to_f64_soft(src[i])


@kernel
def f64_to_f16(src, out):
    for i in range(src.size):
        out[i] = f64_to_f16_bits(src[i])


@kernel
def f64_to_bf16(src, out):
    for i in range(src.size):
        out[i] = f64_to_bf16_bits(src[i])


@kernel
def f32_to_f16(src, out):
    for i in range(src.size):
        out[i] = f32_to_f16_bits(src[i])


@kernel
def f32_to_f16_soft(src, out):
    for i in range(src.size):
        out[i] = f32_to_f16_bits_soft(src[i])


@kernel
def f32_to_bf16(src, out):
    for i in range(src.size):
        out[i] = f32_to_bf16_bits(src[i])


@kernel
def widen(kind, in16, in32, in64, offset, out):
    """``out.size`` elements of a source (kind 0 fp16, 1 bf16, 2 fp32, 3 fp64, at element
    ``offset`` of the matching view) as float64, exactly: the first step of any per-element
    method that works on fp64 blocks."""
    m = out.size
    if kind == 0:
        src16 = in16[offset:offset + m]
        for i in range(m):
            out[i] = f16_to_f64(src16[i])
    elif kind == 1:
        src16 = in16[offset:offset + m]
        for i in range(m):
            out[i] = bf16_to_f64(src16[i])
    elif kind == 2:
        src32 = in32[offset:offset + m]
        for i in range(m):
            out[i] = np.float64(src32[i])
    else:
        out[:] = in64[offset:offset + m]
