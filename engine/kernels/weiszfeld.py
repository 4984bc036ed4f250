"""One Weiszfeld step over a block of points: the new iterate of each element and each point's
squared distance to it, in one pass, in a fixed order (the geometric median of
``engine.methods.median``).

``m[e] = sum_i w_i p[i, e] / W`` (products then sums, in point order, no fused multiply-add, so
it is the same arithmetic as numpy's), then ``(p[i, e] - m[e])**2`` goes to lane
``e % LANES`` of point i's accumulator, each lane adding in element order with a fused
multiply-add. The lane is fixed by the element's index in the whole tensor, so how the tensor is
cut into blocks never changes an addition: the in-memory and the re-read modes, and every block
size, give the same bits.

The pass goes tile by tile (``TILE`` elements of every point, in the L2 cache): the tile's
iterate first (point by point, each element's sum still in point order), then the distances,
eight points at a time (eight FMA chains, their accumulators on the stack so the loop vectorises).
"""

from __future__ import annotations

import numba
import numpy as np

from engine.kernels.held import point_value, to_held
from engine.kernels.jit import fma, kernel, stack_f64

LANES = 8
TILE = 2048  # elements of every point per tile: 8 KB a point in fp32, N of them in the L2 cache


@kernel
def step(points, col, start, count, weights, total, out, lanes):
    """Columns ``col .. col + count`` of ``points`` (float64, float32 or fp16 bits [N, *],
    C-contiguous: ``engine.kernels.held``),
    which are elements ``start ..`` of the tensor; ``weights``: float64[N] summing to ``total``;
    ``out``: float64[count], the new iterate; ``lanes``: float64[N, LANES], the squared
    distances added to. Indices are unsigned inside the tiles (numba checks signed ones for
    negative values, which turns vector loads into gathers); the distances go eight points at
    a time (with fewer accumulators LLVM keeps them in scalar registers and does not
    vectorise), points past the last clamped to it and not stored."""
    n_pts = points.shape[0]
    head = min(count, (LANES - start % LANES) % LANES)
    body = head + (count - head) // LANES * LANES
    _one_by_one(points, col, start, 0, head, weights, total, out, lanes)
    v = numba.carray(stack_f64(TILE), TILE)
    acc = numba.carray(stack_f64(64), (8, LANES))  # 8 points x LANES
    last = n_pts - 1
    for t0 in range(head, body, TILE):
        width = np.uint64(min(body, t0 + TILE) - t0)
        c0 = np.uint64(col + t0)
        _iterate_tile(points, c0, width, weights, total, v)
        for e in range(width):
            out[np.uint64(t0) + e] = v[e]
        for i0 in range(0, n_pts, 8):
            rows = (i0, min(i0 + 1, last), min(i0 + 2, last), min(i0 + 3, last),
                    min(i0 + 4, last), min(i0 + 5, last), min(i0 + 6, last), min(i0 + 7, last))
            for p in range(8):
                for lane in range(LANES):
                    acc[p, lane] = lanes[rows[p], lane]
            r0, r1, r2, r3 = points[rows[0]], points[rows[1]], points[rows[2]], points[rows[3]]
            r4, r5, r6, r7 = points[rows[4]], points[rows[5]], points[rows[6]], points[rows[7]]
            for g in range(width // np.uint64(LANES)):
                ge = g * np.uint64(LANES)
                for lane in range(LANES):
                    e = ge + np.uint64(lane)
                    k = c0 + e
                    x = v[e]
                    d0, d1 = point_value(r0[k]) - x, point_value(r1[k]) - x
                    d2, d3 = point_value(r2[k]) - x, point_value(r3[k]) - x
                    d4, d5 = point_value(r4[k]) - x, point_value(r5[k]) - x
                    d6, d7 = point_value(r6[k]) - x, point_value(r7[k]) - x
                    acc[0, lane] = fma(d0, d0, acc[0, lane])
                    acc[1, lane] = fma(d1, d1, acc[1, lane])
                    acc[2, lane] = fma(d2, d2, acc[2, lane])
                    acc[3, lane] = fma(d3, d3, acc[3, lane])
                    acc[4, lane] = fma(d4, d4, acc[4, lane])
                    acc[5, lane] = fma(d5, d5, acc[5, lane])
                    acc[6, lane] = fma(d6, d6, acc[6, lane])
                    acc[7, lane] = fma(d7, d7, acc[7, lane])
            for p in range(8):
                if i0 + p <= last:
                    for lane in range(LANES):
                        lanes[i0 + p, lane] = acc[p, lane]
    _one_by_one(points, col, start, body, count, weights, total, out, lanes)


@kernel
def iterate_only(points, col, count, weights, total, out):
    """``step``'s new iterate alone, the same operations in the same order (so the same bits),
    without the distances: the Gram route's last pass forms the iterate of coefficients whose
    distances it already knows."""
    v = numba.carray(stack_f64(TILE), TILE)
    for t0 in range(0, count, TILE):
        width = np.uint64(min(count, t0 + TILE) - t0)
        _iterate_tile(points, np.uint64(col + t0), width, weights, total, v)
        for e in range(width):
            out[np.uint64(t0) + e] = v[e]


@numba.njit(inline="always", error_model="numpy")
def _iterate_tile(points, c0, width, weights, total, v):
    """``v[:width]`` = the iterate of columns ``c0 ..``: ``sum_i w_i p_i`` (a product, then an
    add, in point order) over ``total``."""
    for e in range(width):
        v[e] = 0.0
    for i in range(points.shape[0]):
        wi = weights[i]
        row = points[i]
        for e in range(width):
            v[e] += wi * point_value(row[c0 + e])
    for e in range(width):
        v[e] = v[e] / total


@numba.njit(inline="always", error_model="numpy")
def _one_by_one(points, col, start, e0, e1, weights, total, out, lanes):
    """Elements ``e0 .. e1`` one at a time (those before the first whole group of LANES and
    after the last)."""
    n_pts = points.shape[0]
    for e in range(e0, e1):
        s = 0.0
        for i in range(n_pts):
            s += weights[i] * point_value(points[i, col + e])
        x = s / total
        out[e] = x
        lane = (start + e) % LANES
        for i in range(n_pts):
            d = point_value(points[i, col + e]) - x
            lanes[i, lane] = fma(d, d, lanes[i, lane])


@kernel
def vote_filter(points, weights, by_sum):
    """The TIES vote over a block of filtered deltas (float64[N, m], in place): per element the
    elected sign of ``sum_i w_i p_i`` (``by_sum``) or ``sum_i w_i sign(p_i)``, added in point
    order (a multiply, then an add), and every entry whose sign is not the elected one, or
    where the election is tied, set to 0 (torch.sign gives 0 for NaN: such entries become 0). The same operations in
    the same order as ``torch.where((sign(p) == sign(elect)) & (sign(elect) != 0), p, 0)``."""
    n_pts, m = points.shape
    elect = np.zeros(m, np.float64)
    for i in range(n_pts):  # row by row (contiguous); each element's sum still in point order
        row = points[i]
        wi = weights[i]
        for e in range(np.uint64(m)):
            x = row[e]
            elect[e] = elect[e] + (x if by_sum else _sign(x)) * wi
    for e in range(np.uint64(m)):
        elect[e] = _sign(elect[e])
    for i in range(n_pts):
        row = points[i]
        for e in range(np.uint64(m)):
            x = row[e]
            s = elect[e]
            row[e] = x if (_sign(x) == s and s != 0.0) else 0.0


@numba.njit(inline="always", error_model="numpy")
def _sign(x):
    """torch.sign on the CPU: 1, -1, and 0 for zeros and for NaN."""
    if x > 0.0:
        return 1.0
    if x < 0.0:
        return -1.0
    return 0.0


@kernel
def narrow_exactly(block, held, col):
    """``held[:, col:col + m] = block`` (float64[N, m] into fp32 or fp16 bits [N, *],
    ``engine.kernels.held``); False when some value is not exact in that type (then ``held``
    must not be used; NaN is never equal)."""
    n_pts, m = block.shape
    exact = True
    for i in range(n_pts):
        src = block[i]
        dst = held[i]
        c0 = np.uint64(col)
        for e in range(np.uint64(m)):
            f = to_held(src[e], dst)
            dst[c0 + e] = f
            exact &= point_value(f) == src[e]
    return exact


@kernel
def finish(lanes):
    """Each point's squared distance: its lanes added in lane order."""
    n_pts = lanes.shape[0]
    out = np.zeros(n_pts, np.float64)
    for i in range(n_pts):
        s = 0.0
        for lane in range(LANES):
            s += lanes[i, lane]
        out[i] = s
    return out
