"""The element types a median's held points are kept in (``engine.methods.median``): fp64,
fp32, or fp16 kept as its bits (uint16; numba has no float16 on the CPU).

The points are held in the narrowest of these that holds every value exactly, so the kernels
do the same fp64 arithmetic on the same values whatever the type: fp16 for a median of the
models themselves when every model is stored in fp16 (the points are the stored values), fp32
for most deltas of two 16-bit values, fp64 otherwise. Each step of the iteration reads every
held point once, so a narrower type is that much less memory traffic: the held points of a
large key are far past the caches.

``point_value`` and ``to_held`` are typed by numba from the array's element type (numba
overloads), so one kernel body serves all three types.
"""

from __future__ import annotations

import numpy as np
from numba import types
from numba.extending import overload

from engine.kernels.floats import f16_to_f64, f64_to_f16_bits

F16_BITS = np.uint16  # the held dtype of fp16 points (numpy's float16 is not numba's)


def point_value(x):
    """A held element as float64, exactly (fp16 bits decoded)."""
    if isinstance(x, np.uint16):
        return float(np.array(x, np.uint16).view(np.float16))
    return float(x)


@overload(point_value)
def _point_value(x):
    if isinstance(x, types.Integer):  # fp16 bits
        return lambda x: f16_to_f64(x)
    return lambda x: np.float64(x)


def to_held(v, held):
    """The float64 ``v`` in the element type of the array ``held`` (rounded; the caller checks
    it was exact with ``point_value``)."""
    if held.dtype == F16_BITS:
        return np.array(v, np.float16).view(np.uint16)[()]
    return held.dtype.type(v)


@overload(to_held)
def _to_held(v, held):
    if held.dtype == types.uint16:
        return lambda v, held: np.uint16(f64_to_f16_bits(v))
    if held.dtype == types.float32:
        return lambda v, held: np.float32(v)
    return lambda v, held: np.float64(v)
