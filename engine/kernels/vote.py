"""Per-element accumulators for the merge methods that keep or drop each source's value
element by element (TIES' trim and sign election, DARE's and DELLA's drop masks).

They work on fp64 blocks (``floats.widen`` of a source slice) like ``mean``: each call adds one
source, in source order, with a fused multiply-add, so the sums round exactly as the mean's do
(exactly, for integer factors and 16-bit sources). Nothing here allocates; the caller keeps the
accumulators of a block for as many sources as there are.

- ``masked_add``: ``sum += w * x`` and ``weight += w`` where ``keep`` is set (a drop mask, or the
  elements above a magnitude threshold).
- ``sign_vote_add`` / ``sign_vote_finish``: TIES' election in one pass over the sources: values
  whose magnitude is at least the source's threshold are summed by sign; the elected sign is
  that of the total (positive on a tie, as TIES does) and the result is the weighted mean of the
  values of that sign (0 where none was kept).
"""

from __future__ import annotations

from engine.kernels.jit import fma, kernel


@kernel
def masked_add(acc, weight, x, w, keep):
    for i in range(acc.size):
        k = keep[i] != 0
        acc[i] = fma(x[i], w, acc[i]) if k else acc[i]
        weight[i] = weight[i] + w if k else weight[i]


@kernel
def sign_vote_add(pos_sum, pos_w, neg_sum, neg_w, x, w, threshold):
    """One source's block ``x`` (weight ``w``) into the sign accumulators, keeping the values
    with ``|x| >= threshold`` (zeros vote for neither sign)."""
    for i in range(x.size):
        v = x[i]
        kept = abs(v) >= threshold
        up = kept and v > 0
        down = kept and v < 0
        pos_sum[i] = fma(v, w, pos_sum[i]) if up else pos_sum[i]
        pos_w[i] = pos_w[i] + w if up else pos_w[i]
        neg_sum[i] = fma(v, w, neg_sum[i]) if down else neg_sum[i]
        neg_w[i] = neg_w[i] + w if down else neg_w[i]


@kernel
def sign_vote_finish(pos_sum, pos_w, neg_sum, neg_w, out):
    """The elected sign's weighted mean per element (true division), 0.0 where nothing of that
    sign was kept."""
    for i in range(out.size):
        up = pos_sum[i] + neg_sum[i] >= 0.0
        s = pos_sum[i] if up else neg_sum[i]
        w = pos_w[i] if up else neg_w[i]
        out[i] = s / w if w != 0.0 else 0.0
