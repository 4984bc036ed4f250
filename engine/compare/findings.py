"""Findings from one group's statistics: which models are unchanged, identical, near
duplicates, combinations of others, outliers, and which form families.

- ``unchanged``: delta zero (the component is the reference's).
- ``identical``: the same component hash in the catalog (exact, over the stored bytes) where
  both are known, else zero distance between the two deltas (``basis`` says which); later steps
  keep the first of each set of identical models (grid order) and drop the others.
- ``near_duplicate``: cosine at or above ``near``.
- ``combination``: a least-squares fit of the delta on the Gram matrix of 2 (else 3) others,
  every weight at least ``min_weight`` (a mix has positive weights; this keeps "a = 2 mix - b"
  and "a = 1.0 b + 0.0 c" out), relative residual under ``residual``. Candidates are the
  ``candidates`` models most aligned with it, which bounds the work for large N.
- ``outlier``: robust z-score (median, 1.4826 MAD) of the log norm or of the consensus cosine
  beyond ``z``, the spread floored (``log_norm_floor``, ``consensus_floor``) so that exact
  mixes and clones of ordinary models, which make the MAD tiny, are not outliers.
- ``family``: average-linkage clustering on 1 - cosine, cut at 1 - ``family`` cosine.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np

from engine.compare.stats import GroupStats


@dataclass(frozen=True)
class Thresholds:
    near: float = 0.98
    residual: float = 0.05
    min_weight: float = 0.05
    candidates: int = 10
    z: float = 3.0
    log_norm_floor: float = 0.25
    consensus_floor: float = 0.1
    family: float = 0.3
    identical: float = 1e-18  # squared distance relative to the larger squared norm

    def to_dict(self) -> dict:
        return asdict(self)


def group_findings(stats: GroupStats, models: list[str], th: Thresholds,
                   hashes: list[str | None] | None = None) -> list[dict]:
    """``hashes``: each model's exact hash of this component from the catalog, where known."""
    n = len(models)
    hashes = hashes or [None] * n
    g = stats.gram
    out: list[dict] = []
    unchanged = [i for i in range(n) if stats.cosine[i][i] is None]
    if unchanged:
        out.append({"code": "unchanged", "models": [models[i] for i in unchanged]})
    live = [i for i in range(n) if i not in set(unchanged)]
    # identical: union of equal hashes and zero distances, the first in grid order represents the set
    rep = {i: i for i in live}
    for a, b in itertools.combinations(live, 2):
        if rep[b] != b or rep[a] != a:
            continue
        if hashes[a] is not None and hashes[a] == hashes[b]:
            rep[b] = a
            continue
        d2 = g[a, a] + g[b, b] - 2.0 * g[a, b]
        if d2 <= th.identical * max(g[a, a], g[b, b]):
            rep[b] = a
    for r in sorted(set(rep.values())):
        same = [i for i in live if rep[i] == r]
        if len(same) > 1:
            by_hash = hashes[r] is not None and all(hashes[i] == hashes[r] for i in same)
            out.append({"code": "identical", "models": [models[i] for i in same], "distance": 0.0,
                        "basis": "hashes" if by_hash else "distance"})
    reps = [i for i in live if rep[i] == i]
    cos = stats.cosine
    for a, b in itertools.combinations(reps, 2):
        if cos[a][b] is not None and cos[a][b] >= th.near:
            out.append({"code": "near_duplicate", "models": [models[a], models[b]], "cosine": cos[a][b]})
    for i in reps:
        fit = _combination(i, reps, g, cos, th)
        if fit is not None:
            parts, weights, residual = fit
            out.append({"code": "combination", "models": [models[i], *(models[p] for p in parts)],
                        "weights": weights, "residual": residual})
    out.extend(_outliers(live, stats, models, th))
    for fam in _families(reps, cos, th.family):
        members = [i for i in live if rep[i] in fam]
        out.append({"code": "family", "models": [models[i] for i in members]})
    return out


def _combination(i: int, reps: list[int], g: np.ndarray, cos, th: Thresholds):
    others = [j for j in reps if j != i and cos[i][j] is not None and cos[i][j] > 0]
    others.sort(key=lambda j: (-cos[i][j], j))
    others = others[: th.candidates]
    for size in (2, 3):
        best = None
        for subset in itertools.combinations(sorted(others), size):
            s = list(subset)
            gs = g[np.ix_(s, s)]
            rhs = g[s, i]
            try:
                w = np.linalg.solve(gs, rhs)
            except np.linalg.LinAlgError:
                continue
            if not np.all(np.isfinite(w)) or np.any(w < th.min_weight):
                continue
            res2 = max(float(g[i, i] - w @ rhs), 0.0)
            residual = math.sqrt(res2 / g[i, i])
            if residual < th.residual and (best is None or residual < best[2]):
                best = (s, [float(x) for x in w], residual)
        if best is not None:
            return best
    return None


def _robust_z(values: list[float], floor: float) -> list[float]:
    v = np.asarray(values, np.float64)
    med = float(np.median(v))
    spread = max(1.4826 * float(np.median(np.abs(v - med))), floor)
    return [(x - med) / spread for x in values]


def _outliers(live: list[int], stats: GroupStats, models: list[str], th: Thresholds) -> list[dict]:
    if len(live) < 4:  # a median of three says nothing about which one is odd
        return []
    out = []
    logs = [math.log(stats.norm[i]) for i in live]
    for i, z in zip(live, _robust_z(logs, th.log_norm_floor)):
        if abs(z) > th.z:
            out.append({"code": "outlier", "models": [models[i]], "measure": "norm", "z": z,
                        "value": stats.norm[i]})
    have = [i for i in live if stats.consensus[i] is not None]
    if len(have) >= 4:
        for i, z in zip(have, _robust_z([stats.consensus[i] for i in have], th.consensus_floor)):
            if abs(z) > th.z:
                out.append({"code": "outlier", "models": [models[i]], "measure": "consensus", "z": z,
                            "value": stats.consensus[i]})
    return out


def linkage(dist: np.ndarray) -> list[tuple[int, int, float, int]]:
    """Average linkage (UPGMA, Lance-Williams updates) on a k x k distance matrix: the k - 1
    merges as (cluster, cluster, height, size), clusters numbered as scipy numbers them (the
    leaves 0..k-1, the merge of step s is k + s). Ties go to the first pair in order, so the
    result depends on nothing but the numbers. The families and the ``--png`` dendrogram are
    both cut from this one tree."""
    k = dist.shape[0]
    d = np.array(dist, dtype=np.float64, copy=True)
    np.fill_diagonal(d, np.inf)
    label = list(range(k))
    size = [1] * k
    alive = list(range(k))
    merges: list[tuple[int, int, float, int]] = []
    while len(alive) > 1:
        sub = d[np.ix_(alive, alive)]
        flat = int(np.argmin(sub))
        p, q = alive[flat // len(alive)], alive[flat % len(alive)]
        p, q = min(p, q), max(p, q)
        sp, sq = size[p], size[q]
        merges.append((label[p], label[q], float(sub.flat[flat]), sp + sq))
        d[p, :] = (sp * d[p, :] + sq * d[q, :]) / (sp + sq)
        d[:, p] = d[p, :]
        d[p, p] = np.inf
        label[p], size[p] = k + len(merges) - 1, sp + sq
        alive.remove(q)
    return merges


def cosine_distances(cos, idx: list[int]) -> np.ndarray:
    """1 - cosine between the models ``idx`` (no cosine, a zero delta: distance 1)."""
    return np.array([[1.0 - (cos[a][b] if cos[a][b] is not None else 0.0) for b in idx] for a in idx])


def _families(reps: list[int], cos, family: float) -> list[set[int]]:
    """The clusters of the linkage tree below the cut at 1 - ``family`` (average linkage is
    monotone, so these are the merges made before the first one at or above the cut); clusters
    of two or more are families, in the order of their first member."""
    k = len(reps)
    if k < 2:
        return []
    members: dict[int, list[int]] = {i: [reps[i]] for i in range(k)}
    cut = 1.0 - family
    for step, (a, b, height, _size) in enumerate(linkage(cosine_distances(cos, reps))):
        if height >= cut:
            break
        members[k + step] = sorted(members.pop(a) + members.pop(b))
    return sorted((set(m) for m in members.values() if len(m) > 1), key=min)
