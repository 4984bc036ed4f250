"""Dot products of every pair of sources, in fp64, chunk by chunk (geometric median,
compare): a Gram matrix accumulated in a fixed order, so the result has the same bits whatever
the chunk sizes, the thread or the run.

Element ``i`` of the tensor goes to lane ``i % LANES`` of each pair's accumulator, each lane
summing its elements in index order with a fused multiply-add; ``gram_finish`` adds the lanes in
lane order. The lanes let the loop vectorise without reassociating anything, and because the
lane is fixed by the element's index in the whole tensor, cutting the tensor differently does
not change a single addition.
"""

from __future__ import annotations

import numpy as np

from engine.kernels.jit import fma, kernel

LANES = 8


@kernel
def gram_add(lanes, xs, start):
    """Add the block ``xs`` (float64[N, m]: m elements of N sources, the first being element
    ``start`` of the tensor) to ``lanes`` (float64[N, N, LANES], upper triangle used)."""
    n_src, m = xs.shape
    head = min(m, (LANES - start % LANES) % LANES)
    body = head + (m - head) // LANES * LANES
    for a in range(n_src):
        for b in range(a, n_src):
            acc = lanes[a, b]
            xa = xs[a]
            xb = xs[b]
            for i in range(head):
                lane = (start + i) % LANES
                acc[lane] = fma(xa[i], xb[i], acc[lane])
            for g in range(head, body, LANES):
                for lane in range(LANES):
                    acc[lane] = fma(xa[g + lane], xb[g + lane], acc[lane])
            for i in range(body, m):
                lane = (start + i) % LANES
                acc[lane] = fma(xa[i], xb[i], acc[lane])


@kernel
def gram_finish(lanes):
    """The symmetric N x N matrix of dot products: each pair's lanes added in order."""
    n_src = lanes.shape[0]
    out = np.zeros((n_src, n_src), np.float64)
    for a in range(n_src):
        for b in range(a, n_src):
            s = 0.0
            for lane in range(LANES):
                s += lanes[a, b, lane]
            out[a, b] = s
            out[b, a] = s
    return out
