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
TILE = 1024  # elements of a tile (a multiple of LANES): 8 KB a source, N of them in L1/L2


@kernel
def gram_add(lanes, xs, start):
    """Add the block ``xs`` (float64[N, m]: m elements of N sources, the first being element
    ``start`` of the tensor) to ``lanes`` (float64[N, N, LANES], upper triangle used).

    The block is taken in tiles of ``TILE`` elements, every pair within a tile (each source's
    tile is read from the cache N times instead of from memory), four pairs a loop (the FMA
    latency, not the memory, bounds one pair's chain); each lane still sums its elements in
    index order, so the bits do not depend on the tiling."""
    n_src, m = xs.shape
    head = min(m, (LANES - start % LANES) % LANES)
    body = head + (m - head) // LANES * LANES
    for a in range(n_src):
        for b in range(a, n_src):
            acc = lanes[a, b]
            for i in range(head):
                lane = (start + i) % LANES
                acc[lane] = fma(xs[a, i], xs[b, i], acc[lane])
    for t0 in range(head, body, TILE):
        t1 = min(body, t0 + TILE)
        for a in range(n_src):
            xa = xs[a]
            b = a
            while b + 4 <= n_src:  # four pairs at once: four independent FMA chains per lane
                x1, x2, x3, x4 = xs[b], xs[b + 1], xs[b + 2], xs[b + 3]
                c1, c2, c3, c4 = lanes[a, b], lanes[a, b + 1], lanes[a, b + 2], lanes[a, b + 3]
                for g in range(t0, t1, LANES):
                    for lane in range(LANES):
                        v = xa[g + lane]
                        c1[lane] = fma(v, x1[g + lane], c1[lane])
                        c2[lane] = fma(v, x2[g + lane], c2[lane])
                        c3[lane] = fma(v, x3[g + lane], c3[lane])
                        c4[lane] = fma(v, x4[g + lane], c4[lane])
                b += 4
            while b < n_src:
                xb, acc = xs[b], lanes[a, b]
                for g in range(t0, t1, LANES):
                    for lane in range(LANES):
                        acc[lane] = fma(xa[g + lane], xb[g + lane], acc[lane])
                b += 1
    for a in range(n_src):
        for b in range(a, n_src):
            acc = lanes[a, b]
            for i in range(body, m):
                lane = (start + i) % LANES
                acc[lane] = fma(xs[a, i], xs[b, i], acc[lane])


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
