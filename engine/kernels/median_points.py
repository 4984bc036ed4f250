"""The geometric median's points over one span of a key, from the stored bytes, in one pass
(``engine.methods.median``).

Before, a span's points were made in several passes over an fp64 block of N x 65,536 elements
(8 MB at N = 16, far past the L2 cache): each model widened into its row, the filters, then the
narrowing into the held fp32 points, the centring and the Gram matrix, each a pass of its own
over memory, into arrays allocated anew for every span (the first touch of fresh pages cost
more than the arithmetic on this machine). Here the span goes tile by tile (``tile``: a few
hundred elements of every point, in the L2 cache), and each tile goes through every stage
before the next is read:

- each model's stored values widened to fp64, less the base's (a delta, exact for 16-bit
  sources), or as they are without a base; every value that is not finite counted, per model
  and for the base (``bad``), before any filter could hide it;
- DELLA's keep bits, or DARE's drop, then the trim (``engine.kernels.methods``' own kernels),
  then the TIES vote (``engine.kernels.weiszfeld.vote_filter``);
- then by ``mode``: ``ROWS`` copies the points into ``rows`` (fp64: the re-read mode's block,
  or points held in fp64), ``HOLD`` narrows them into ``held`` (fp32 or fp16 bits,
  ``engine.kernels.held``; False is returned when a value is not exact in that type), ``GRAM``
  narrows them into ``held`` when it is not empty, then
  centres them and adds their Gram matrix to ``lanes`` (``engine.kernels.median_gram.center``,
  ``engine.kernels.gram.gram_add_part``).

Every stage is per element, or sums in lanes fixed by the element's index in its key, so the
tiles change no bit: the points, the held values and the Gram matrix are those of the
separate passes.
"""

from __future__ import annotations

import numba
import numpy as np

from engine.kernels.floats import bf16_to_f64, f16_to_f64, is_finite
from engine.kernels.gram import gram_add_part
from engine.kernels.jit import kernel, stack_f64
from engine.kernels.mean import BF16, F16, F32
from engine.kernels.median_gram import center
from engine.kernels.methods import filter_delta
from engine.kernels.weiszfeld import narrow_exactly, vote_filter

ROWS, HOLD, GRAM = 0, 1, 2
TILE_MAX = 2048  # elements of a tile at most (the base's tile lives on the stack)
TILE_BYTES = 256 << 10  # a tile of every point: in the L2 cache (1 MB a core here)


def tile_elements(count: int) -> int:
    """Elements of a tile for ``count`` points: ``TILE_BYTES`` of fp64 points, a multiple of 8."""
    return max(8, min(TILE_MAX, TILE_BYTES // 8 // max(1, count)) // 8 * 8)


@kernel
def span_points(in16, in32, in64, base_kind, base_off, kinds, offsets, n, first, weights, drop, keys, has_drop,
                keep, keep_bit0, has_keep, thresholds, has_trim, vote, tile, bad, mode, rows, held, col, lanes):
    """Elements ``first .. first + n`` of a key's points (see the module docstring). The stored
    values: ``in16`` / ``in32`` / ``in64`` views of one byte buffer, each source a kind code
    (``engine.kernels.mean.KIND``) and an element offset into its view (``base_kind`` -1: no
    base). Filters: DARE's stream ``keys`` and ``drop``; DELLA's packed ``keep`` rows, bit
    ``keep_bit0`` being the span's first element; trim ``thresholds``; ``vote`` 0 none, 1 sum,
    2 count, with the recipe's ``weights``. ``tile``: float64 scratch of ``count * T`` for
    tiles of ``T`` elements; ``bad``: int64[count + 1], non-finite values added per model, the
    base's last. ``rows`` / ``held`` receive columns ``col ..``. Returns False when ``held``
    was written and some value was not exact in its type."""
    count = kinds.size
    width = min(TILE_MAX, tile.size // count)
    base = numba.carray(stack_f64(2048), 2048)
    exact = True
    for a in range(0, n, width):
        m = min(width, n - a)
        pts = tile[:count * m].reshape((count, m))
        b = base[:m]
        if base_kind >= 0:
            bad[count] += _widen(b, base_kind, base_off + a, in16, in32, in64)
        for j in range(count):
            x = pts[j]
            bad[j] += _widen(x, kinds[j], offsets[j] + a, in16, in32, in64)
            if base_kind >= 0:
                for i in range(np.uint64(m)):
                    x[i] = x[i] - b[i]
            filter_delta(x, has_keep, keep[j], keep_bit0 + a, has_drop, keys[j], first + a, drop, has_trim,
                         thresholds[j])
        if vote != 0:
            vote_filter(pts, weights, vote == 1)
        if mode == ROWS:
            for j in range(count):
                dst = rows[j]
                src = pts[j]
                c0 = np.uint64(col + a)
                for i in range(np.uint64(m)):
                    dst[c0 + i] = src[i]
        elif held.shape[1] > 0:
            exact &= narrow_exactly(pts, held, col + a)
        if mode == GRAM:
            center(pts)
            gram_add_part(lanes, pts, first + a, 0, 1)
    return exact


@numba.njit(inline="always", error_model="numpy")
def _widen(dst, kind, off, in16, in32, in64):
    """``dst`` = a source's elements from ``off`` widened to fp64 (exact); returns how many are
    not finite."""
    m = np.uint64(dst.size)
    o = np.uint64(off)
    bad = 0
    if kind == F16:
        for i in range(m):
            v = f16_to_f64(in16[o + i])
            dst[i] = v
            bad += not is_finite(v)
    elif kind == BF16:
        for i in range(m):
            v = bf16_to_f64(in16[o + i])
            dst[i] = v
            bad += not is_finite(v)
    elif kind == F32:
        for i in range(m):
            v = np.float64(in32[o + i])
            dst[i] = v
            bad += not is_finite(v)
    else:
        for i in range(m):
            v = in64[o + i]
            dst[i] = v
            bad += not is_finite(v)
    return bad
