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
or ``maxiter`` steps. Up to ``GRAM_MAX`` points the steps run on the points' Gram matrix
(``_by_gram``: every iterate is a combination of the points, so its distances follow from the
N x N matrix; the points are held, as below, for the iterate's pass, or read a second time).
Beyond, each step is one pass over the points (``engine.kernels.weiszfeld``: the new iterate
and the distances to it together). The tensor is cut into spans of ``SPAN`` elements, fixed: each
span's squared distances (or Gram matrix) are summed on their own (in lanes fixed by the element
index), then the spans' sums are added in span order. So the spans can run on several cores at
once, and the bits depend on neither the number of threads nor the memory mode. The sweeps'
memory modes:

- the N points held in memory when that fits the budget: in fp32 (``4 N n`` bytes) when every
  filtered value is exactly an fp32 (a delta of two nearby fp16 values usually is; the kernel
  then does the same fp64 arithmetic on the same values with half the memory traffic), else
  in fp64 (``8 N n``);
- else every step reads the sources again and filters them anew, span by span (the page cache
  usually serves them): memory is a span of the N points per thread (as many threads as 1 GB
  of spans allows), the iterate and the base.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor, TimeoutError
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

SPAN = 1 << 16
# Points up to which the iteration runs on their Gram matrix (``_by_gram``: N (N + 1) / 2
# products per element, once) rather than in sweeps over them (N per element per sweep, up to
# ``maxiter`` sweeps); 16 is where the two were measured (docs/benchmarks.md).
GRAM_MAX = 16
# Filtering a span of N points holds about this many bytes per point element (its fp64 points,
# each model's bytes as read, with room to spare); spans filtered at once: READ_BYTES in all.
SPAN_BYTES_PER_ELEMENT = 16
READ_BYTES = 1 << 30
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


@dataclass
class MedianResult:
    delta: np.ndarray  # float64[n]: the median (of the deltas, or of the models without a base)
    iterations: int
    in_memory: bool


def geometric_median(params, key: str, base, models: list, shas: list, weights: list[float], stats,
                     read: Callable, check_cancel: Callable[[], None], mask_key: Callable,
                     budget: int, report: Callable[[str | None], None] = lambda detail: None) -> MedianResult:
    """The median of one key's points (``base``: a Source or None; ``models``: Sources;
    ``stats``: the key's TensorStats for trim thresholds and DELLA masks; ``report``: told
    each iteration, for the progress)."""
    from engine.kernels.weiszfeld import LANES, finish, step

    n = math.prod(models[0].shape)
    w = np.array(weights, np.float64)
    count = len(models)
    spans = [(a, min(n, a + SPAN)) for a in range(0, n, SPAN)]

    def block(a: int, b: int) -> np.ndarray:
        return _points(params, key, base, models, shas, w, stats, read, mask_key, a, b)

    reading = max(1, READ_BYTES // (SPAN_BYTES_PER_ELEMENT * count * SPAN))  # spans filtered at once
    if count <= GRAM_MAX:
        return _by_gram(params, spans, block, n, w, check_cancel, reading, report, budget)
    held = _hold(block, spans, count, n, budget, check_cancel, reading)
    m = np.empty(n, np.float64)
    parts = np.zeros((len(spans), count, LANES), np.float64)

    def sweep(coef: np.ndarray) -> np.ndarray:
        total = math.fsum(coef)

        def one(s: int) -> None:
            a, b = spans[s]
            parts[s] = 0.0
            if held is not None:
                step(held, a, a, b - a, coef, total, m[a:b], parts[s])
            else:
                step(block(a, b), 0, a, b - a, coef, total, m[a:b], parts[s])

        _each(one, len(spans), check_cancel, len(spans) if held is not None else reading)
        lanes = np.zeros((count, LANES), np.float64)
        for part in parts:  # in span order
            lanes += part
        return np.sqrt(finish(lanes))

    d = sweep(w)  # the weighted mean, and the distances to it
    obj = math.fsum(w * d) / count
    iterations = 0
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        while iterations < params.maxiter and math.isfinite(obj):
            iterations += 1
            report(f"median, iteration {iterations} of at most {params.maxiter}"
                   f"{'' if held is not None else ' (re-reading the files)'}")
            prev = obj
            d = sweep(w / np.maximum(d, params.eps))
            obj = math.fsum(w * d) / count
            if abs(prev - obj) <= params.ftol * obj:
                break
    return MedianResult(m, iterations, held is not None)


def _by_gram(params, spans: list, block: Callable, n: int, w: np.ndarray, check_cancel: Callable[[], None],
             reading: int, report: Callable[[str | None], None], budget: int) -> MedianResult:
    """The same iteration in the coefficients of the points (``engine.kernels.median_gram``):
    one pass for the fp64 Gram matrix of the centred points (each span's on its own, in lanes
    fixed by the element index, the spans' added in span order: the bits depend neither on the
    threads nor on the buffers), the iterations on the N x N matrix, one pass for the iterate of
    the last coefficients (``engine.kernels.weiszfeld.step``'s arithmetic, as a sweep forms it).
    The first pass also keeps the points in fp32 when they fit the budget and every value is
    exactly an fp32, so the second reads no file; else the second reads and filters them again
    (the same values: the same bytes either way)."""
    from engine.kernels.gram import LANES as GRAM_LANES
    from engine.kernels.gram import gram_add, gram_finish
    from engine.kernels.median_gram import center, iterate
    from engine.kernels.weiszfeld import LANES, narrow_exactly, step

    count = len(w)
    parts = np.zeros((len(spans), count, count), np.float64)
    held = np.empty((count, n), np.float32) if 4 * count * n + 16 * n <= budget else None
    exact = np.ones(len(spans), bool)

    def gram(s: int) -> None:
        a, b = spans[s]
        points = block(a, b)
        if held is not None:
            exact[s] = narrow_exactly(points, held, a)
        center(points)
        lanes = np.zeros((count, count, GRAM_LANES), np.float64)
        gram_add(lanes, points, a)
        parts[s] = gram_finish(lanes)

    report(f"median: the Gram matrix of {count} points")
    _each(gram, len(spans), check_cancel, reading)
    if held is not None and not exact.all():
        held = None  # a value that is not an fp32 (a NaN, a delta of distant values): read again
    g = np.zeros((count, count), np.float64)
    for part in parts:  # in span order
        g += part
    coef = np.empty(count, np.float64)
    iterations = int(iterate(g, w, float(params.eps), int(params.maxiter), float(params.ftol), coef))
    m = np.empty(n, np.float64)
    total = 0.0
    for c in coef:  # in point order, as the kernel sums them
        total += float(c)

    def combine(s: int) -> None:
        a, b = spans[s]
        lanes = np.zeros((count, LANES), np.float64)
        if held is not None:
            step(held, a, a, b - a, coef, total, m[a:b], lanes)
        else:
            step(block(a, b), 0, a, b - a, coef, total, m[a:b], lanes)

    report(f"median: the iterate after {iterations} iterations")
    _each(combine, len(spans), check_cancel, len(spans) if held is not None else reading)
    return MedianResult(m, iterations, held is not None)


def _hold(block: Callable, spans: list, count: int, n: int, budget: int, check_cancel: Callable[[], None],
          at_once: int) -> np.ndarray | None:
    """The key's filtered points in memory, fp32 if every value is exactly an fp32, else fp64
    (read again: rare, a delta of two distant values or a NaN); None when they do not fit the
    budget (the re-read mode)."""
    for dtype in (np.float32, np.float64):
        if np.dtype(dtype).itemsize * count * n + 16 * n > budget:
            return None
        held = _load(block, spans, np.empty((count, n), dtype), check_cancel, at_once)
        if held is not None:
            return held
    return None


def _load(block: Callable, spans: list, held: np.ndarray, check_cancel: Callable[[], None],
          at_once: int) -> np.ndarray | None:
    """Every span's points into ``held``; None when ``held`` is fp32 and some value is not
    exactly an fp32 (NaN never equals itself: such a key is held in fp64)."""
    from engine.kernels.weiszfeld import narrow_exactly

    inexact = threading.Event()

    def load(s: int) -> None:
        if inexact.is_set():
            return
        a, b = spans[s]
        p = block(a, b)
        if held.dtype == np.float64:
            held[:, a:b] = p
        elif not narrow_exactly(p, held, a):
            inexact.set()

    _each(load, len(spans), check_cancel, at_once)
    return None if inexact.is_set() else held


def _each(fn: Callable[[int], None], count: int, check_cancel: Callable[[], None], at_once: int = 1 << 30) -> None:
    """``fn(0) .. fn(count - 1)``, on the pool's threads when there are several (the kernels
    and torch release the GIL), at most ``at_once`` of them submitted at a time (each holds a
    span's points while it runs); ``check_cancel`` is called on this thread while they run,
    and on a cancel or an error nothing is left running when this returns."""
    if count == 1:
        check_cancel()
        fn(0)
        return
    window: deque = deque()
    submitted = 0
    try:
        while submitted < count or window:
            while submitted < count and len(window) < at_once:
                window.append(_pool().submit(fn, submitted))
                submitted += 1
            while True:
                try:
                    window[0].result(timeout=0.2)
                    break
                except TimeoutError:
                    check_cancel()
            window.popleft()
        check_cancel()
    except BaseException:
        for f in window:
            f.cancel()
        for f in window:
            if not f.cancelled():
                try:
                    f.result()
                except BaseException:
                    pass
        raise


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            from engine.merge.backends.cpu import MAX_WORKERS, cpu_count

            _POOL = ThreadPoolExecutor(min(cpu_count(), MAX_WORKERS), thread_name_prefix="astolfo-median")
        return _POOL


def _points(params, key, base, models, shas, w, stats, read, mask_key, a: int, b: int) -> np.ndarray:
    """Elements ``a .. b`` of every point, filtered (float64[N, b - a]): each model's delta read
    straight into its row, then the merge methods' own kernels (DELLA's keep bits, DARE's hash,
    the trim) and the vote, in place."""
    from engine.kernels.hashing import _signed
    from engine.kernels.methods import _drop, _keep, _trim
    from engine.kernels.weiszfeld import vote_filter

    bb = read(base, a, b) if base is not None else None
    p = torch.empty((len(models), b - a), dtype=torch.float64)
    rows = p.numpy()
    for i, (src, sha) in enumerate(zip(models, shas)):
        read(src, a, b, bb, p[i])
        ident = (src.file, src.key)
        if params.drop_eps != 0:
            _keep(rows[i], stats.keep_bits[ident], a)
        elif params.drop > 0:
            _drop(rows[i], _signed(mask_key(params.seed, sha, key)), a, params.drop)
        if params.trim < 1:
            _trim(rows[i], stats.thresholds[ident])
    if params.vote != "none":
        vote_filter(rows, w, params.vote == "sum")
    return rows
