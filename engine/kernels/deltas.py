"""The deltas a comparison adds to its Gram matrices, in one pass over the read buffer: each
model's stored values widened to fp64 and the reference subtracted, the reference being a
reference model's values or, without one, the mean of the models per element.

Before this kernel the compare pass converted every row with numpy (fp16 -> fp32 -> fp64, two
passes), summed the rows, divided and subtracted: five passes over a buffer larger than the
cache, a third of a comparison's time. Here the work goes tile by tile (``TILE`` elements of
every row, in L1/L2), and the arithmetic is the same as numpy's: the exact widening, the mean
as the models' values added in row order and divided once by their number, one fp64
subtraction per element; so the deltas have the same bits as before, whatever the tiling or
the range a thread is given.

Arguments follow ``engine.kernels.mean``: the read buffer as three flat dtype views (uint16 for
fp16 and bf16, float32, float64), each row as a kind code and an element offset into its view.
"""

from __future__ import annotations

from engine.kernels.jit import kernel
from engine.kernels.methods import widen

TILE = 2048  # elements of every row at a time: 16 KB of fp64 a row


@kernel
def deltas(xs, kinds, offs, in16, in32, in64, n, with_ref, j0, j1):
    """Elements ``j0 .. j1`` of ``xs`` (float64[n + 1, m]): rows ``0 .. n - 1`` the deltas of
    the ``n`` models, row ``n`` the reference (read row ``n`` when ``with_ref``, else the
    models' mean). ``kinds``/``offs`` give, per read row, its dtype code and where element 0 of
    this block starts in that dtype's view."""
    for t0 in range(j0, j1, TILE):
        t1 = min(j1, t0 + TILE)
        ref = xs[n, t0:t1]
        if with_ref:
            widen(ref, kinds[n], offs[n] + t0, in16, in32, in64)
        for r in range(n):
            widen(xs[r, t0:t1], kinds[r], offs[r] + t0, in16, in32, in64)
        if not with_ref:
            first = xs[0, t0:t1]
            for i in range(t1 - t0):
                ref[i] = first[i]
            for r in range(1, n):
                row = xs[r, t0:t1]
                for i in range(t1 - t0):
                    ref[i] = ref[i] + row[i]
            for i in range(t1 - t0):
                ref[i] = ref[i] / n
        for r in range(n):
            row = xs[r, t0:t1]
            for i in range(t1 - t0):
                row[i] = row[i] - ref[i]
