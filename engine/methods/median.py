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

- the N points held in memory when that fits the budget, in the narrowest type that holds
  every value exactly (``engine.kernels.held``; the kernel then does the same fp64 arithmetic
  on the same values with less memory traffic): fp16 (``2 N n`` bytes) for a median of the
  models themselves when all are stored in fp16, else fp32 (``4 N n``) when every filtered
  value is exactly an fp32 (a delta of two nearby fp16 values usually is), else fp64 (``8 N n``);
- else every step reads the sources again and filters them anew, span by span (the page cache
  usually serves them): memory is a span of the N points per thread (as many threads as 1 GB
  of spans allows), the iterate and the base.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor, TimeoutError
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from engine.checkpoint.format import DTYPES
from engine.methods.result_ring import ResultRing

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
# span_points' arguments where a mode has no use for them
_NO_ROWS = np.zeros((1, 0), np.float64)
_NO_HELD = np.zeros((1, 0), np.float32)
_NO_LANES = np.zeros((1, 1, 8), np.float64)
_NO_KEEP = np.zeros((1, 1), np.uint8)


@dataclass
class MedianResult:
    delta: np.ndarray | None  # float64[n]: the median (of the deltas, or of the models without a base);
    # None when a source holds NaN/Inf values (``nonfinite``): the element pass reports them
    iterations: int
    in_memory: bool
    nonfinite: list = field(default_factory=list)  # (file, stored key) of the sources with NaN/Inf values


def geometric_median(params, key: str, base, models: list, shas: list, weights: list[float], stats,
                     read_raw: Callable, check_cancel: Callable[[], None], mask_key: Callable,
                     budget: int, report: Callable[[str | None], None] = lambda detail: None,
                     device=None) -> MedianResult:
    """The median of one key's points (``base``: a Source or None; ``models``: Sources;
    ``stats``: the key's TensorStats for trim thresholds and DELLA masks; ``read_raw(src,
    start, stop, view)``: elements ``start .. stop`` of a source's stored bytes into ``view``;
    ``report``: told each iteration, for the progress; ``device``: a CUDA merge's
    ``median_device.DeviceMedian``, which iterates on the points held in the GPU's memory when
    they fit its budget (the same bytes; else the CPU route below)."""
    from engine.kernels.weiszfeld import LANES, finish, step

    n = math.prod(models[0].shape)
    w = np.array(weights, np.float64)
    count = len(models)
    spans = [(a, min(n, a + SPAN)) for a in range(0, n, SPAN)]
    points = _Points(params, key, base, models, shas, w, stats, read_raw, mask_key)
    reading = max(1, READ_BYTES // (SPAN_BYTES_PER_ELEMENT * count * SPAN))  # spans filtered at once
    if device is not None:
        found = _on_device(device, params, spans, points, n, w, check_cancel, report)
        if found is not None:
            return found
    if count <= GRAM_MAX:
        return _by_gram(params, spans, points, n, w, check_cancel, reading, report, budget)
    with _lend("held") as kept:  # the held points' buffer, kept from key to key
        held = _hold(points, spans, count, n, budget, check_cancel, reading, kept)
        if points.bad.any():  # the merge stops here or leaves those sources out: no median to form
            return MedianResult(None, 0, held is not None, points.nonfinite())
        m = RESULTS.take(n)
        parts = np.zeros((len(spans), count, LANES), np.float64)

        def sweep(coef: np.ndarray) -> np.ndarray:
            total = math.fsum(coef)

            def one(s: int) -> None:
                a, b = spans[s]
                parts[s] = 0.0
                if held is not None:
                    step(held, a, a, b - a, coef, total, m[a:b], parts[s])
                else:
                    with _lend() as mine:
                        step(points.block(mine, a, b), 0, a, b - a, coef, total, m[a:b], parts[s])

            _each(one, len(spans), check_cancel, len(spans) if held is not None else reading)
            lanes = np.zeros((count, LANES), np.float64)
            for part in parts:  # in span order
                lanes += part
            return np.sqrt(finish(lanes))

        d = sweep(w)  # the weighted mean, and the distances to it
        if points.bad.any():  # (the re-read mode's first look at the values)
            return MedianResult(None, 0, False, points.nonfinite())
        iterations = _weiszfeld(sweep, w, d, params, report, "" if held is not None else " (re-reading the files)")
        return MedianResult(m, iterations, held is not None, points.nonfinite())


def _weiszfeld(sweep: Callable[[np.ndarray], np.ndarray], w: np.ndarray, d: np.ndarray, params,
               report: Callable[[str | None], None], where: str) -> int:
    """Weiszfeld's iterations of a route that sweeps the points (on the CPU, or held on a GPU):
    ``d`` are the points' distances to the weighted mean, ``sweep(coef)`` forms the next iterate
    from the points' coefficients and returns the distances to it. The stop rule, the objective
    (its fp64 sum correctly rounded: the same whatever the route) and the reports are one for
    both routes; returns the iterations run."""
    count = len(w)
    obj = math.fsum(w * d) / count
    iterations = 0
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        while iterations < params.maxiter and math.isfinite(obj):
            iterations += 1
            report(f"median, iteration {iterations} of at most {params.maxiter}{where}")
            prev = obj
            d = sweep(w / np.maximum(d, params.eps))
            obj = math.fsum(w * d) / count
            if abs(prev - obj) <= params.ftol * obj:
                break
    return iterations


def _by_gram(params, spans: list, points: "_Points", n: int, w: np.ndarray, check_cancel: Callable[[], None],
             reading: int, report: Callable[[str | None], None], budget: int) -> MedianResult:
    """The same iteration in the coefficients of the points (``engine.kernels.median_gram``):
    one pass for the fp64 Gram matrix of the centred points (each span's on its own, in lanes
    fixed by the element index, the spans' added in span order: the bits depend neither on the
    threads nor on the buffers), the iterations on the N x N matrix, one pass for the iterate of
    the last coefficients (``engine.kernels.weiszfeld.step``'s arithmetic, as a sweep forms it,
    without the distances).
    The first pass also keeps the points (fp16 or fp32: ``_Points.narrow``) when they fit the
    budget and every value is exact in that type, so the second reads no file; else the second
    reads and filters them again (the same values: the same bytes either way)."""
    from engine.kernels.gram import LANES as GRAM_LANES
    from engine.kernels.gram import gram_finish
    from engine.kernels.median_gram import iterate
    from engine.kernels.median_points import GRAM
    from engine.kernels.weiszfeld import iterate_only

    count = len(w)
    parts = np.zeros((len(spans), count, count), np.float64)
    with _lend("held") as kept:  # the held points' buffer, kept from key to key
        narrow = points.narrow
        held = kept.get_sole(f"held {narrow.__name__}", count * n, narrow).reshape(count, n) \
            if np.dtype(narrow).itemsize * count * n + 16 * n <= budget else None
        exact = np.ones(len(spans), bool)

        def gram(s: int) -> None:
            a, b = spans[s]
            lanes = np.zeros((count, count, GRAM_LANES), np.float64)
            with _lend() as mine:
                exact[s] = points.fill(mine, a, b, GRAM, held=_NO_HELD if held is None else held, col=a, lanes=lanes)
            parts[s] = gram_finish(lanes)

        report(f"median: the Gram matrix of {count} points")
        _each(gram, len(spans), check_cancel, reading)
        if points.bad.any():  # the merge stops here or leaves those sources out: no median to form
            return MedianResult(None, 0, held is not None, points.nonfinite())
        if held is not None and not exact.all():
            held = None  # a value not exact in the held type (a NaN, a delta of distant values): read again
        g = np.zeros((count, count), np.float64)
        for part in parts:  # in span order
            g += part
        coef = np.empty(count, np.float64)
        iterations = int(iterate(g, w, float(params.eps), int(params.maxiter), float(params.ftol), coef))
        m = RESULTS.take(n)
        total = 0.0
        for c in coef:  # in point order, as the kernel sums them
            total += float(c)

        def combine(s: int) -> None:
            a, b = spans[s]
            if held is not None:
                iterate_only(held, a, b - a, coef, total, m[a:b])
            else:
                with _lend() as mine:
                    iterate_only(points.block(mine, a, b), 0, b - a, coef, total, m[a:b])

        report(f"median: the iterate after {iterations} iterations")
        _each(combine, len(spans), check_cancel, len(spans) if held is not None else reading)
        return MedianResult(m, iterations, held is not None, points.nonfinite())


def _on_device(device, params, spans: list, points: "_Points", n: int, w: np.ndarray,
               check_cancel: Callable[[], None], report: Callable[[str | None], None]) -> MedianResult | None:
    """The median with the points on the device (``median_device``): the same routes and the
    same arithmetic as on the CPU, each span's lanes added on the host by the CPU route's code;
    None when the points do not fit the device's room or the kernels are not available (the
    CPU route then)."""
    count = len(w)
    gram = count <= GRAM_MAX
    if not device.usable():
        return None
    try:
        return _iterate_on_device(device, params, spans, points, n, w, count, gram, check_cancel, report)
    except torch.OutOfMemoryError:  # the card's memory went to someone else meanwhile: the CPU route
        return None


def _iterate_on_device(device, params, spans, points, n, w, count, gram, check_cancel, report):
    from engine.kernels.gram import gram_finish
    from engine.kernels.median_gram import iterate
    from engine.kernels.weiszfeld import LANES, finish

    held = None
    for dtype in (points.narrow, np.float64):  # the narrowest type that holds every value exactly
        if device.points_bytes(count, n, dtype, gram) > device.room():
            return None
        report(f"median: {count} points to the GPU")
        held = device.hold(lambda block, a, b, dtype=dtype: _fill(points, block, a, b, dtype), spans, count, n,
                           dtype, check_cancel)
        if points.bad.any():  # the merge stops here or leaves those sources out: no median to form
            return MedianResult(None, 0, True, points.nonfinite())
        if held is not None:
            break
    m_dev = device.rt.empty(n, torch.float64)
    if gram:
        report(f"median: the Gram matrix of {count} points on the GPU")
        lanes = device.gram_parts(held, SPAN)
        g = np.zeros((count, count), np.float64)
        for part in lanes:  # in span order, each span's lanes added as the CPU route adds them
            g += gram_finish(part)
        coef = np.empty(count, np.float64)
        iterations = int(iterate(g, w, float(params.eps), int(params.maxiter), float(params.ftol), coef))
        total = 0.0
        for c in coef:  # in point order, as the kernel sums them
            total += float(c)
        report(f"median: the iterate after {iterations} iterations on the GPU")
        device.iterate(held, coef, total, m_dev)
    else:
        parts = np.zeros((len(spans), count, LANES), np.float64)

        def sweep(coef: np.ndarray) -> np.ndarray:
            check_cancel()
            device.sweep(held, coef, math.fsum(coef), SPAN, m_dev, parts)
            lanes = np.zeros((count, LANES), np.float64)
            for part in parts:  # in span order
                lanes += part
            return np.sqrt(finish(lanes))

        iterations = _weiszfeld(sweep, w, sweep(w), params, report, " on the GPU")
    m = RESULTS.take(n)
    device.result(m_dev, m)
    return MedianResult(m, iterations, True, points.nonfinite())


def _fill(points: "_Points", block: np.ndarray, a: int, b: int, dtype) -> bool:
    """Elements ``a .. b`` of the points into ``block`` (float64[N, b - a], or fp32 / fp16 bits
    where exact: False when a value is not)."""
    from engine.kernels.median_points import HOLD, ROWS

    with _lend() as mine:
        if np.dtype(dtype) == np.float64:
            points.fill(mine, a, b, ROWS, rows=block, col=0)
            return True
        return points.fill(mine, a, b, HOLD, held=block, col=0)


def _hold(points: "_Points", spans: list, count: int, n: int, budget: int, check_cancel: Callable[[], None],
          at_once: int, kept: "_Buffers") -> np.ndarray | None:
    """The key's filtered points in memory, in ``points.narrow`` (fp16 or fp32) if every value
    is exact in it, else fp64 (read again: rare, a delta of two distant values or a NaN); None
    when they do not fit the budget (the re-read mode)."""
    for dtype in (points.narrow, np.float64):
        if np.dtype(dtype).itemsize * count * n + 16 * n > budget:
            return None
        held = _load(points, spans, kept.get_sole(f"held {dtype.__name__}", count * n, dtype).reshape(count, n),
                     check_cancel, at_once)
        if held is not None or points.bad.any():  # (NaN/Inf: no median is formed, so none is held)
            return held
    return None


def _load(points: "_Points", spans: list, held: np.ndarray, check_cancel: Callable[[], None],
          at_once: int) -> np.ndarray | None:
    """Every span's points into ``held``; None when ``held`` is fp16 or fp32 and some value is
    not exact in it (NaN never equals itself: such a key is held in fp64)."""
    from engine.kernels.median_points import HOLD, ROWS

    inexact = threading.Event()

    def load(s: int) -> None:
        if inexact.is_set():
            return
        a, b = spans[s]
        with _lend() as mine:
            if held.dtype == np.float64:
                points.fill(mine, a, b, ROWS, rows=held, col=a)
            elif not points.fill(mine, a, b, HOLD, held=held, col=a):
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


class _Points:
    """A key's filtered points span by span (``engine.kernels.median_points.span_points``: one
    pass over a span, tile by tile in the L2 cache), each span's stored bytes read into the
    buffers the span borrowed (``_lend``); counts the values that are not finite, per source,
    over every span read (``bad``, the base last)."""

    def __init__(self, params, key: str, base, models: list, shas: list, w: np.ndarray, stats,
                 read_raw: Callable, mask_key: Callable):
        from engine.kernels.hashing import _signed
        from engine.kernels.held import F16_BITS
        from engine.kernels.mean import F64, KIND
        from engine.kernels.median_points import tile_elements
        from engine.merge.layout import align  # each source's slot 64-byte aligned, as in the read buffers

        self.params, self.base, self.models, self.stats, self.read_raw = params, base, models, stats, read_raw
        self.srcs = ([base] if base is not None else []) + list(models)
        # fp8 and other stored types the kernel does not read are widened here, read as F64
        self.wide = [s.dtype not in KIND for s in self.srcs]
        self.slot = align(SPAN * max(8 if wide else DTYPES[s.dtype].itemsize for s, wide in zip(self.srcs, self.wide)))
        kinds = [F64 if wide else KIND[s.dtype] for s, wide in zip(self.srcs, self.wide)]
        offsets = [j * self.slot // (8 if wide else DTYPES[s.dtype].itemsize)
                   for j, (s, wide) in enumerate(zip(self.srcs, self.wide))]
        lead = 1 if base is not None else 0
        self.base_kind, self.base_off = (kinds[0], offsets[0]) if base is not None else (-1, 0)
        self.kinds = np.array(kinds[lead:], np.int64)
        self.offsets = np.array(offsets[lead:], np.int64)
        self.w = w
        count = len(models)
        self.della = params.drop_eps != 0
        self.dare = params.drop > 0 and not self.della
        self.keys = np.array([_signed(mask_key(params.seed, sha, key)) if self.dare else 0 for sha in shas], np.int64)
        self.trim = params.trim < 1
        self.thresholds = np.array([stats.thresholds[(s.file, s.key)] if self.trim else 0.0 for s in models],
                                   np.float64)
        self.vote = 0 if params.vote == "none" else 1 if params.vote == "sum" else 2
        self.tile = tile_elements(count)
        # the type the points are held in where exact: without a base the points are the stored
        # values (no filter is allowed then), so fp16 models give fp16 points
        self.narrow = F16_BITS if base is None and all(s.dtype == "F16" for s in models) else np.float32
        self.bad = np.zeros(count + 1, np.int64)
        self._lock = threading.Lock()

    def fill(self, mine: "_Buffers", a: int, b: int, mode: int, rows: np.ndarray = _NO_ROWS,
             held: np.ndarray = _NO_HELD, col: int = 0, lanes: np.ndarray = _NO_LANES) -> bool:
        """Elements ``a .. b`` of the points through ``span_points`` in ``mode``; False when
        ``held`` was written and a value was not exact in its type; the buffers: ``mine``."""
        from engine.kernels.median_points import span_points
        from engine.methods.widening import widen_raw

        count = len(self.models)
        raw = mine.get("raw", len(self.srcs) * self.slot, np.uint8)
        tile = mine.get("tile", count * self.tile, np.float64)
        data = memoryview(raw)
        for j, (src, wide) in enumerate(zip(self.srcs, self.wide)):
            at = j * self.slot
            if wide:
                size = DTYPES[src.dtype].itemsize
                stored = mine.get("stored", (b - a) * size, np.uint8)
                self.read_raw(src, a, b, memoryview(stored)[:(b - a) * size])
                widen_raw(torch.from_numpy(stored[:(b - a) * size]), src, None,
                          torch.from_numpy(raw[at:at + 8 * (b - a)].view(np.float64)))
            else:
                self.read_raw(src, a, b, data[at:at + (b - a) * DTYPES[src.dtype].itemsize])
        if self.della:  # each model's packed keep bits of the span, one row each
            lo, hi = a // 8, (b + 7) // 8
            keep = np.stack([self.stats.keep_bits[(s.file, s.key)][lo:hi] for s in self.models])
            bit0 = a - 8 * lo
        else:
            keep, bit0 = _NO_KEEP, 0
        bad = np.zeros(count + 1, np.int64)
        in16, in32, in64 = raw.view(np.uint16), raw.view(np.float32), raw.view(np.float64)
        exact = span_points(in16, in32, in64, self.base_kind, self.base_off, self.kinds, self.offsets, b - a, a,
                            self.w, float(self.params.drop), self.keys, self.dare, keep, bit0, self.della,
                            self.thresholds, self.trim, self.vote, tile, bad, mode, rows, held, col, lanes)
        with self._lock:
            self.bad += bad
        return bool(exact)

    def block(self, mine: "_Buffers", a: int, b: int) -> np.ndarray:
        """The points of elements ``a .. b`` (float64[N, b - a], in ``mine``: used before
        ``mine`` fills another)."""
        from engine.kernels.median_points import ROWS

        rows = mine.get("rows", len(self.models) * (b - a), np.float64).reshape(len(self.models), b - a)
        self.fill(mine, a, b, ROWS, rows=rows)
        return rows

    def nonfinite(self) -> list[tuple[int, str]]:
        """The sources (file, stored key) with a value that is not finite in the spans read."""
        srcs = self.models + ([self.base] if self.base is not None else [])
        return [(s.file, s.key) for s, n in zip(srcs, self.bad) if n]


class _Buffers:
    """Arrays a span's work uses, kept from span to span and key to key and grown as needed: a
    fresh large array costs the first touch of every page (on this project's machine more than
    the arithmetic done on it). Each running span borrows a set (``_lend``), so the sets number
    the spans that ran at once, as many as held their arrays before; ``release_buffers`` drops
    them at the end of a pass."""

    def __init__(self):
        self.arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, size: int, dtype) -> np.ndarray:
        have = self.arrays.get(name)
        if have is None or have.size < size or have.dtype != dtype:
            have = np.empty(max(size, 1), dtype)
            self.arrays[name] = have
        return have[:size]

    def get_sole(self, name: str, size: int, dtype) -> np.ndarray:
        """``get``, the other arrays dropped first unless it is already kept: the held points,
        one array at a time, as the budget counts them."""
        if name not in self.arrays:
            self.arrays.clear()
        return self.get(name, size, dtype)


_FREE_BUFFERS: dict[str, list[_Buffers]] = {}
_FREE_LOCK = threading.Lock()


@contextmanager
def _lend(kind: str = "span"):
    """A set of buffers for a span's work (``span``) or a key's held points (``held``)."""
    with _FREE_LOCK:
        free = _FREE_BUFFERS.setdefault(kind, [])
        mine = free.pop() if free else _Buffers()
    try:
        yield mine
    finally:
        with _FREE_LOCK:
            _FREE_BUFFERS.setdefault(kind, []).append(mine)


RESULTS = ResultRing()  # the keys' medians, from one array reused as a ring (result_ring)


def release_buffers() -> None:
    """Drop the kept buffers and the results' ring (at the end of a pass: a long-lived process
    does not keep them after its merge; results still in use keep their own array alive)."""
    with _FREE_LOCK:
        _FREE_BUFFERS.clear()
    RESULTS.reserve(0)
