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

import numba
import numpy as np

from engine.kernels.jit import fma, kernel, stack_f64

LANES = 8
TILE = 2048  # elements of a tile (a multiple of LANES): a block's accumulators loaded and stored once a tile
BLOCK = 4  # sources on each side of a block of pairs: 16 accumulators of LANES, in registers


@kernel
def gram_add(lanes, xs, start):
    """Add the block ``xs`` (float64[N, m]: m elements of N sources, the first being element
    ``start`` of the tensor) to ``lanes`` (float64[N, N, LANES], upper triangle used)."""
    gram_add_part(lanes, xs, start, 0, 1)


@numba.njit(inline="always")
def _block_index(i, j, blocks):
    """The place of block (i, j), i <= j, in row-major order of the upper triangle of blocks."""
    return i * blocks - i * (i - 1) // 2 + (j - i)


@kernel
def gram_add_part(lanes, xs, start, part, parts):
    """``gram_add`` for the blocks of pairs numbered ``part`` modulo ``parts`` only, so that
    ``parts`` threads can add the same block of elements at once: each pair's lanes belong to
    one block, hence to one thread, and are added to in the same order as by ``gram_add``,
    so the bits do not depend on the number of threads.

    The block is taken in tiles of ``TILE`` elements and, within a tile, in blocks of 4 x 4
    pairs: eight sources loaded, sixteen FMA chains advanced (the loads, not the FMAs, would
    bound one pair at a time). The block's accumulators live on the stack (``stack_f64``) and
    the element indices are unsigned (numba checks signed ones for negative values, which
    turns each vector load into a gather), so each lane step is one AVX-512 FMA per pair.
    Sources past the last are clamped to it and their pairs, like those below the diagonal,
    are computed but not stored. Each lane still sums its elements in index order, so the bits
    depend on neither the tiling nor the blocking."""
    n_src, m = xs.shape
    head = min(m, (LANES - start % LANES) % LANES)
    body = head + (m - head) // LANES * LANES
    blocks = (n_src + BLOCK - 1) // BLOCK
    _edge(lanes, xs, start, 0, head, part, parts, blocks)
    acc = numba.carray(stack_f64(128), (BLOCK * BLOCK, LANES))
    strip = numba.carray(stack_f64(32), (BLOCK, LANES))
    last = n_src - 1
    for t0 in range(head, body, TILE):
        steps = (min(body, t0 + TILE) - t0) // LANES
        for a0 in range(0, n_src, BLOCK):
            rows = (a0, min(a0 + 1, last), min(a0 + 2, last), min(a0 + 3, last))
            for b0 in range(a0, n_src, BLOCK):
                if _block_index(a0 // BLOCK, b0 // BLOCK, blocks) % parts != part:
                    continue
                if b0 == last:  # a last block of one source (N = 4k + 1, e.g. 8 models and the reference)
                    _strip(lanes, xs, strip, a0, rows, b0, t0, steps)
                    continue
                cols = (b0, min(b0 + 1, last), min(b0 + 2, last), min(b0 + 3, last))
                for p in range(BLOCK):
                    for q in range(BLOCK):
                        for lane in range(LANES):
                            acc[p * BLOCK + q, lane] = lanes[rows[p], cols[q], lane]
                xa0, xa1, xa2, xa3 = xs[rows[0]], xs[rows[1]], xs[rows[2]], xs[rows[3]]
                xb0, xb1, xb2, xb3 = xs[cols[0]], xs[cols[1]], xs[cols[2]], xs[cols[3]]
                for step in range(steps):
                    g = np.uint64(t0 + step * LANES)
                    for lane in range(LANES):
                        k = g + np.uint64(lane)
                        u0, u1, u2, u3 = xa0[k], xa1[k], xa2[k], xa3[k]
                        w0, w1, w2, w3 = xb0[k], xb1[k], xb2[k], xb3[k]
                        acc[0, lane] = fma(u0, w0, acc[0, lane])
                        acc[1, lane] = fma(u0, w1, acc[1, lane])
                        acc[2, lane] = fma(u0, w2, acc[2, lane])
                        acc[3, lane] = fma(u0, w3, acc[3, lane])
                        acc[4, lane] = fma(u1, w0, acc[4, lane])
                        acc[5, lane] = fma(u1, w1, acc[5, lane])
                        acc[6, lane] = fma(u1, w2, acc[6, lane])
                        acc[7, lane] = fma(u1, w3, acc[7, lane])
                        acc[8, lane] = fma(u2, w0, acc[8, lane])
                        acc[9, lane] = fma(u2, w1, acc[9, lane])
                        acc[10, lane] = fma(u2, w2, acc[10, lane])
                        acc[11, lane] = fma(u2, w3, acc[11, lane])
                        acc[12, lane] = fma(u3, w0, acc[12, lane])
                        acc[13, lane] = fma(u3, w1, acc[13, lane])
                        acc[14, lane] = fma(u3, w2, acc[14, lane])
                        acc[15, lane] = fma(u3, w3, acc[15, lane])
                for p in range(BLOCK):
                    for q in range(BLOCK):
                        a, b = a0 + p, b0 + q
                        if a <= b <= last:
                            for lane in range(LANES):
                                lanes[a, b, lane] = acc[p * BLOCK + q, lane]
    _edge(lanes, xs, start, body, m, part, parts, blocks)


@numba.njit(inline="always", error_model="numpy")
def _strip(lanes, xs, acc, a0, rows, b, t0, steps):
    """The pairs of four sources with one, for a tile: four FMA chains where the 4 x 4 block
    would run sixteen, twelve of them discarded. The same additions in the same order."""
    for p in range(BLOCK):
        for lane in range(LANES):
            acc[p, lane] = lanes[rows[p], b, lane]
    xa0, xa1, xa2, xa3 = xs[rows[0]], xs[rows[1]], xs[rows[2]], xs[rows[3]]
    xb = xs[b]
    for step in range(steps):
        g = np.uint64(t0 + step * LANES)
        for lane in range(LANES):
            k = g + np.uint64(lane)
            w = xb[k]
            acc[0, lane] = fma(xa0[k], w, acc[0, lane])
            acc[1, lane] = fma(xa1[k], w, acc[1, lane])
            acc[2, lane] = fma(xa2[k], w, acc[2, lane])
            acc[3, lane] = fma(xa3[k], w, acc[3, lane])
    for p in range(BLOCK):
        if a0 + p <= b:
            for lane in range(LANES):
                lanes[a0 + p, b, lane] = acc[p, lane]


@numba.njit(inline="always", error_model="numpy")
def _edge(lanes, xs, start, i0, i1, part, parts, blocks):
    """Elements ``i0 .. i1`` of the block one at a time, each into its own lane (the few
    before the first whole group of LANES and after the last), for this part's pairs."""
    n_src = xs.shape[0]
    for a in range(n_src):
        for b in range(a, n_src):
            if _block_index(a // BLOCK, b // BLOCK, blocks) % parts != part:
                continue
            acc = lanes[a, b]
            for i in range(i0, i1):
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
