"""Whole-tensor statistics that some methods need before their element-wise pass over a key:
the trim threshold of each model's delta, DELLA's rank-dependent keep masks, model stock's
interpolation factor ``t``.

The streamed merge computes every element from the sources' values at that element only; these
three depend on a whole tensor (a k-th smallest magnitude, the rank of each magnitude, cosines
of flattened deltas). So before the first slice of such a key is handed to a backend, its
sources are read once more, whole, straight from the files, and these are computed here (on
their own thread, one key ahead of the merge: ``engine.methods.stats_feed``):

- trim: for each model, after its drop, the ``max(int((1 - trim) * n), 1)``-th smallest |tau|
  (``engine.kernels.select``, exact, from the fp64 bits; no sort): one number per model;
- DELLA: for each model, the rank r of each |tau| (1 for the smallest, ties by element order),
  the keep probability ``p = 1 - drop + drop_eps * (r / n - (n + 1) / (2 n))`` clamped to
  [0, 1], and the element kept when ``u >= 1 - p`` (``u`` the same counter-based uniform as
  DARE's): one bit per element and model, packed;
- model stock: the fp64 Gram matrix of the deltas (``engine.kernels.gram``, a fixed summation
  order whatever the chunking), ``c`` the mean over pairs of their cosines (0 for a zero delta),
  ``t = N c / (1 + (N - 1) c)`` clamped to [0, 1] (0 where the denominator is <= 0).

Everything is computed on the CPU in fp64 from the files' bytes, whatever the backend, so CPU
and CUDA merges use the same numbers and write the same bytes. Memory: one model's delta and
the base at a time (16 bytes per element of the key) for trim and DELLA, a fixed-size block of
all models for model stock, plus DELLA's masks (n / 8 bytes per model, held until the key is
done: the one cost that grows with N, 8 MB per model for the largest SDXL tensor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from engine.kernels.hashing import uniform_numpy
from engine.methods.whole_reads import WholeReads
from engine.plan.model import Source

# Elements of all the models read at once for model stock's Gram matrix (bytes / 8 / N each):
# small enough to stay in the L3 cache between the widening and the Gram.
STOCK_BLOCK_BYTES = 8 << 20


def needs_stats(params) -> bool:
    """Whether a method needs a look at whole tensors before its element-wise pass."""
    return params.trim < 1 or params.drop_eps != 0 or params.combine in ("stock", "median")


@dataclass
class TensorStats:
    """A method node's whole-tensor numbers, for the sources it was computed from (keyed by
    ``(file, stored key)``, so a slice finds its model's whatever the order or exclusions)."""

    thresholds: dict[tuple[int, str], float] = field(default_factory=dict)  # trim: keep |tau| >= this
    keep_bits: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)  # DELLA: packed keep masks
    stock_t: float | None = None
    stock_raw: float | None = None  # t before the clamp (None when not clamped)
    median: np.ndarray | None = None  # combine = "median": the key's median (engine.methods.median)
    iterations: int = 0
    median_in_memory: bool = False
    nonfinite: list[tuple[int, str]] = field(default_factory=list)  # a median's sources with NaN/Inf values

    def keep_mask(self, src: tuple[int, str], start: int, n: int) -> np.ndarray | None:
        """DELLA's keep decisions of elements ``start .. start + n`` of one model (bool)."""
        bits = self.keep_bits.get(src)
        if bits is None:
            return None
        a, b = start // 8, (start + n + 7) // 8
        return np.unpackbits(bits[a:b])[start - 8 * a: start - 8 * a + n].astype(bool)


def compute_stats(params, key: str, base: Source | None, models: list[Source], shas: list[str | None],
                  read: Callable[..., torch.Tensor], check_cancel: Callable[[], None],
                  mask_key: Callable[[int, str, str], int], budget: int = 1 << 62,
                  report: Callable[[str | None], None] = lambda detail: None,
                  whole: WholeReads | None = None, read_raw: Callable | None = None, device=None) -> TensorStats:
    """The statistics of one method node over its base (None: a median of the models
    themselves) and (kept) model sources; ``read(src, start, stop, minus=None, out=None)`` as
    ``widening.read_f64``; ``budget``: the bytes a median may hold; ``report(detail)``: what is being
    computed (None once done), for the progress; ``whole``: the calling thread's whole-tensor
    reads (trim and DELLA read whole tensors: required for them); ``read_raw(src, start, stop,
    view)``: elements ``start .. stop`` of a source's stored bytes (the median reads those);
    ``device``: a CUDA merge's ``median_device.DeviceMedian`` for its medians (None: the CPU)."""
    n = math.prod(models[0].shape)
    stats = TensorStats()
    try:
        if params.combine == "stock":
            report(f"model stock: cosines of {len(models)} deltas")
            _stock(stats, base, models, n, read, check_cancel)
            return stats
        if params.trim < 1 or params.drop_eps != 0:
            report("DELLA ranks" if params.drop_eps != 0 else "trim thresholds")
            _per_model(stats, params, key, base, models, shas, n, whole, check_cancel, mask_key)
        if params.combine == "median":
            from engine.methods.median import geometric_median

            found = geometric_median(params, key, base, models, shas, [s.weight for s in models], stats, read_raw,
                                     check_cancel, mask_key, budget, report=report, device=device)
            stats.median, stats.iterations, stats.median_in_memory = found.delta, found.iterations, found.in_memory
            stats.nonfinite = found.nonfinite
        return stats
    finally:
        report(None)


def _per_model(stats: TensorStats, params, key, base, models, shas, n, whole: WholeReads, check_cancel,
               mask_key) -> None:
    """Trim thresholds and DELLA masks, one model's whole delta at a time (the next one read
    while this one is worked on)."""
    b = whole.f64(base, None, "base", models[0])
    k = max(int((1 - params.trim) * n), 1)
    for i, (src, sha) in enumerate(zip(models, shas)):
        check_cancel()
        tau = whole.f64(src, b, "tau", models[i + 1] if i + 1 < len(models) else None)
        ident = (src.file, src.key)
        if params.drop_eps != 0:
            keep = della_keep(tau, params.drop, params.drop_eps, uniform_numpy(mask_key(params.seed, sha, key), 0, n))
            stats.keep_bits[ident] = np.packbits(keep)
            tau.masked_fill_(torch.from_numpy(~keep), 0.0)
        elif params.drop > 0:
            u = torch.from_numpy(uniform_numpy(mask_key(params.seed, sha, key), 0, n))
            tau.masked_fill_(u < params.drop, 0.0)
        if params.trim < 1:
            stats.thresholds[ident] = kth_magnitude(tau, k)
        del tau


def kth_magnitude(tau: torch.Tensor, k: int) -> float:
    """The k-th smallest |tau| (k from 1), exactly, from the fp64 bits."""
    from engine.kernels.select import kth_smallest_magnitude64

    bits = kth_smallest_magnitude64(tau.numpy().view(np.int64), k)
    return float(np.array([bits], np.int64).view(np.float64)[0])


def della_keep(tau: torch.Tensor, drop: float, eps: float, u: np.ndarray) -> np.ndarray:
    """DELLA's keep decision of each element: ranks of |tau| (1 = smallest, ties by element
    order), keep probability ``1 - drop + eps * (r / n - (n + 1) / (2 n))`` clamped to [0, 1],
    kept where ``u >= 1 - p``."""
    from engine.kernels.select import magnitude_ranks

    n = tau.numel()
    ranks = np.empty(n, np.float64)
    magnitude_ranks(tau.numpy().view(np.int64), ranks)  # |x| sorts like its bits (NaN last)
    p = 1.0 - drop + eps * (ranks / n - (n + 1) / (2 * n))
    np.clip(p, 0.0, 1.0, out=p)
    return u >= 1.0 - p


def _stock(stats: TensorStats, base: Source, models: list[Source], n: int, read, check_cancel) -> None:
    from engine.kernels.gram import LANES, gram_add, gram_finish

    count = len(models)
    if count < 2:  # no pair (a model left out for NaN): the base
        stats.stock_t = 0.0
        return
    block = max(4096, STOCK_BLOCK_BYTES // 8 // count)
    lanes = np.zeros((count, count, LANES), np.float64)
    for a in range(0, n, block):
        check_cancel()
        b = min(n, a + block)
        base_part = read(base, a, b)
        taus = torch.empty((count, b - a), dtype=torch.float64)
        for i, s in enumerate(models):
            read(s, a, b, base_part, taus[i])
        gram_add(lanes, taus.numpy(), a)
    stats.stock_t, stats.stock_raw = stock_factor(gram_finish(lanes))


def stock_factor(gram: np.ndarray) -> tuple[float, float | None]:
    """(t, the raw t when it was clamped, else None) from the deltas' Gram matrix."""
    count = gram.shape[0]
    cosines = []
    for i in range(count):
        for j in range(i + 1, count):
            d = math.sqrt(gram[i, i]) * math.sqrt(gram[j, j])
            cosines.append(gram[i, j] / d if d > 0 else 0.0)
    c = math.fsum(cosines) / len(cosines)
    denom = 1 + (count - 1) * c
    if not math.isfinite(c):
        return c, None  # a NaN/Inf source: the element pass flags it for the NaN policy
    if denom <= 0:
        return 0.0, -math.inf
    t = count * c / denom
    if 0.0 <= t <= 1.0:
        return t, None
    return min(1.0, max(0.0, t)), t
