"""Per-model numbers from one group's Gram matrix of deltas (reference in the last row): norms,
norms relative to the reference's, pairwise cosines, the cosine to the mean delta (consensus)
and leave-one-out influence. Everything is fp64 arithmetic on the exact dot products.

Influence is how far the mean of the models moves when one is left out, relative to the mean
model's norm: ``||tau_i - mean|| / (n - 1) / ||reference + mean||``. Consensus is undefined
(None) when the mean delta is zero, which it is against the mean of the models (there the
mean model is the reference, so influence is relative to the reference's norm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ZERO = 1e-24  # squared norms below ZERO * (the largest squared norm) count as zero


@dataclass
class GroupStats:
    norm: list[float]
    relative_norm: list[float | None]
    cosine: list[list[float | None]]
    consensus: list[float | None]
    influence: list[float | None]
    gram: np.ndarray  # the deltas' Gram matrix, n x n

    def to_dict(self, models: list[str]) -> dict:
        return {"models": list(models), "cosine": self.cosine, "norm": self.norm,
                "relative_norm": self.relative_norm, "consensus": self.consensus, "influence": self.influence}


def _clean(x: float) -> float | None:
    return None if not math.isfinite(x) else float(x)


def group_stats(g: np.ndarray, mean_reference: bool = False) -> GroupStats:
    """``mean_reference``: the reference is the mean of these models, so the mean delta is zero
    by construction (the Gram entries would only give it as rounding noise)."""
    n = g.shape[0] - 1
    t = g[:n, :n]
    ref_sq = float(g[n, n])
    diag = np.diag(t).copy()
    scale = max(float(diag.max()) if n else 0.0, ref_sq, 1e-300)
    zero = diag <= ZERO * scale
    norm = [float(math.sqrt(max(d, 0.0))) for d in diag]
    ref_norm = math.sqrt(max(ref_sq, 0.0))
    relative = [(v / ref_norm if ref_norm > 0 else None) for v in norm]
    cosine: list[list[float | None]] = []
    for i in range(n):
        row: list[float | None] = []
        for j in range(n):
            if zero[i] or zero[j]:
                row.append(None)
            elif i == j:
                row.append(1.0)
            else:
                c = float(t[i, j]) / (norm[i] * norm[j])
                row.append(max(-1.0, min(1.0, c)))
        cosine.append(row)
    dot_mean = t.sum(axis=1) / n  # <tau_i, mean delta>
    mean_sq = float(t.sum()) / (n * n)
    if mean_reference:
        dot_mean[:] = 0.0
        mean_sq = 0.0
    consensus: list[float | None] = []
    mean_is_zero = mean_reference or mean_sq <= ZERO * scale
    for i in range(n):
        if zero[i] or mean_is_zero:
            consensus.append(None)
        else:
            consensus.append(max(-1.0, min(1.0, float(dot_mean[i]) / (norm[i] * math.sqrt(mean_sq)))))
    model_sq = ref_sq + 2.0 * float(g[n, :n].sum()) / n + mean_sq  # ||reference + mean delta||^2
    influence: list[float | None] = []
    for i in range(n):
        if n < 2 or model_sq <= 0:
            influence.append(None)
            continue
        moved = max(float(diag[i]) - 2.0 * float(dot_mean[i]) + mean_sq, 0.0)
        influence.append(_clean(math.sqrt(moved) / (n - 1) / math.sqrt(model_sq)))
    return GroupStats(norm, relative, cosine, consensus, influence, t.copy())
