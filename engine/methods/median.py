"""The geometric median of a key's points by Weiszfeld's iteration, in memory bounded by the
recipe's budget, whatever the number of models (``combine = "median"``).

The points are the models' tensors, flattened (without a base), or their filtered deltas: drop
(DARE's hash or DELLA's ranks), trim, and with a vote the entries whose sign disagrees with the
elected one (or where the vote is tied) set to 0, exactly as the other methods filter them
(sd-mecha's ``apply_median``). The weights of the recipe weight the deltas in the vote and are
Weiszfeld weights in the median; the points themselves stay unweighted.

Iteration (sd-mecha 1.1.8's ``geometric_median``, in fp64): start at the weighted mean; then
``w_i' = w_i / max(d_i, eps)``, ``m = sum w_i' p_i / sum w_i'``, with ``d_i = ||p_i - m||``
over the whole tensor, until ``|obj_prev - obj| <= ftol * obj`` (obj = the mean of ``w_i d_i``)
or ``maxiter`` steps. Each step is one pass over the points in fixed blocks of ``BLOCK``
elements (``engine.kernels.weiszfeld``: the new iterate and the distances to it together, a
summation order fixed by element index), so the two memory modes agree to the bit:

- the N points held in memory (fp64, ``8 N n`` bytes) when that fits the budget;
- else every step reads the sources again and filters them anew, block by block (the page
  cache usually serves them): memory is one block of the N points, the iterate and the base.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from engine.kernels.hashing import uniform_numpy

BLOCK = 1 << 16


@dataclass
class MedianResult:
    delta: np.ndarray  # float64[n]: the median (of the deltas, or of the models without a base)
    iterations: int
    in_memory: bool


def geometric_median(params, key: str, base, models: list, shas: list, weights: list[float], stats,
                     read: Callable, check_cancel: Callable[[], None], mask_key: Callable,
                     budget: int) -> MedianResult:
    """The median of one key's points (``base``: a Source or None; ``models``: Sources;
    ``stats``: the key's TensorStats for trim thresholds and DELLA masks)."""
    n = math.prod(models[0].shape)
    w = np.array(weights, np.float64)
    count = len(models)
    held = 8 * count * n + 16 * n <= budget

    def block(a: int, b: int) -> np.ndarray:
        return _points(params, key, base, models, shas, w, stats, read, mask_key, a, b)

    cached = np.empty((count, n), np.float64) if held else None
    if held:
        for a in range(0, n, BLOCK):
            check_cancel()
            cached[:, a:min(n, a + BLOCK)] = block(a, min(n, a + BLOCK))

    def points(a: int, b: int) -> np.ndarray:
        return cached[:, a:b] if held else block(a, b)

    from engine.kernels.weiszfeld import LANES, finish, step

    m = np.empty(n, np.float64)

    def sweep(coef: np.ndarray) -> np.ndarray:
        lanes = np.zeros((count, LANES), np.float64)
        total = math.fsum(coef)
        for a in range(0, n, BLOCK):
            check_cancel()
            b = min(n, a + BLOCK)
            step(np.ascontiguousarray(points(a, b)), coef, total, a, m[a:b], lanes)
        return np.sqrt(finish(lanes))

    d = sweep(w)  # the weighted mean, and the distances to it
    obj = math.fsum(w * d) / count
    iterations = 0
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        while iterations < params.maxiter and math.isfinite(obj):
            iterations += 1
            prev = obj
            d = sweep(w / np.maximum(d, params.eps))
            obj = math.fsum(w * d) / count
            if abs(prev - obj) <= params.ftol * obj:
                break
    return MedianResult(m, iterations, held)


def _points(params, key, base, models, shas, w, stats, read, mask_key, a: int, b: int) -> np.ndarray:
    """Elements ``a .. b`` of every point, filtered (float64[N, b - a])."""
    bb = read(base, a, b) if base is not None else None
    rows = []
    for src, sha in zip(models, shas):
        t = read(src, a, b) if bb is None else read(src, a, b, bb)
        ident = (src.file, src.key)
        if params.drop_eps != 0:
            t.masked_fill_(torch.from_numpy(~stats.keep_mask(ident, a, b - a)), 0.0)
        elif params.drop > 0:
            u = torch.from_numpy(uniform_numpy(mask_key(params.seed, sha, key), a, b - a))
            t.masked_fill_(u < params.drop, 0.0)
        if params.trim < 1:
            t.masked_fill_(t.abs() < stats.thresholds[ident], 0.0)
        rows.append(t)
    p = torch.stack(rows)
    if params.vote != "none":
        ws = torch.from_numpy(w).view(-1, 1)
        elect = torch.zeros(b - a, dtype=torch.float64)
        for i in range(len(rows)):  # in model order: the sum's rounding is fixed
            elect.add_(p[i] * ws[i] if params.vote == "sum" else torch.sign(p[i]) * ws[i])
        sign = torch.sign(elect)
        p = torch.where((torch.sign(p) == sign) & (sign != 0), p, 0.0)
    return p.numpy()
