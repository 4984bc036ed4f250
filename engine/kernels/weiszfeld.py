"""One Weiszfeld step over a block of points: the new iterate of each element and each point's
squared distance to it, in one pass, in a fixed order (the geometric median of
``engine.methods.median``).

``m[e] = sum_i w_i p[i, e] / W`` (products then sums, in point order, no fused multiply-add, so
it is the same arithmetic as numpy's), then ``(p[i, e] - m[e])**2`` goes to lane
``e % LANES`` of point i's accumulator, each lane adding in element order with a fused
multiply-add. The lane is fixed by the element's index in the whole tensor, so how the tensor is
cut into blocks never changes an addition: the in-memory and the re-read modes, and every block
size, give the same bits.
"""

from __future__ import annotations

import numpy as np

from engine.kernels.jit import fma, kernel

LANES = 8


@kernel
def step(points, weights, total, start, out, lanes):
    """``points``: float64[N, m], elements ``start ..`` of the tensor; ``weights``: float64[N]
    summing to ``total``; ``out``: float64[m], the new iterate; ``lanes``: float64[N, LANES],
    the squared distances added to."""
    n_pts, m = points.shape
    for e in range(m):
        s = 0.0
        for i in range(n_pts):
            s += weights[i] * points[i, e]
        v = s / total
        out[e] = v
        lane = (start + e) % LANES
        for i in range(n_pts):
            d = points[i, e] - v
            lanes[i, lane] = fma(d, d, lanes[i, lane])


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
