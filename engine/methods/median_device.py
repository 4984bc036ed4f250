"""The geometric median's iteration on a CUDA device (``engine.methods.median`` in a CUDA merge):
the key's points live in the GPU's memory when they fit its budget, and the steps run there, in
four small kernels compiled at run time (NVRTC, through the merge's runtime), with the CPU
route's arithmetic in the CPU route's order, so the bytes are those of a CPU merge.

Why the bits are the same: every floating-point operation in the kernels is an IEEE operation
rounded to nearest and named explicitly (``__dadd_rn``, ``__dsub_rn``, ``__dmul_rn``,
``__ddiv_rn``, ``__fma_rn``: the compiler may neither fuse nor reorder them), and each thread
does the work of one of the CPU's accumulators, in its order:

- ``iterate``: one element's iterate, ``sum_i c_i p_i`` from 0 (a product, then an add) in
  point order, divided by the total (``engine.kernels.weiszfeld._iterate_tile``);
- ``distances``: one point's squared distance in one lane of one span: ``(p - m)^2`` added by
  FMA over the span's elements of that lane in index order (``weiszfeld.step``'s lanes);
- ``center``: one element's mean of the points, added from 0 in point order, divided by N
  (``engine.kernels.median_gram.center``);
- ``gram``: one pair's product of centred points in one lane of one span, by FMA in index order
  (``engine.kernels.gram.gram_add_part``).

The spans' lanes come back to the host, where the CPU route's own code adds them (``finish``,
``gram_finish``, the spans in order), and the N x N iteration of the Gram route runs on the
host as before. The points are formed on the CPU (``median._Points.fill``: the widening, the
deltas, the filters, the vote, the exactness of the held type), a span at a time into a pinned
block that goes up into the device's array while the next span is formed: the host holds two
spans, the device the key. A key whose points do not fit the device's budget (``memory`` of
the recipe, at most 80% of the memory the card has free when the key starts) goes to the CPU
route, which keeps them in RAM or reads them again, as on a CPU merge.

Kernel arguments follow what the runtime passes: tensors as device pointers, Python ints as C
``int`` (element counts up to 2**31 - 1; products of them are formed in ``long long``), floats
as ``double``. The fp16 points are decoded from their bits with integer operations (exact). A
key with a NaN or Inf value never reaches the kernels: its points are counted while they are
formed and no median is formed for it.
"""

from __future__ import annotations

import math
import threading
from typing import Callable

import numpy as np
import torch

BLOCK = 256  # threads a block
FREE_SHARE = 0.8  # of the card's free memory a key's points and work arrays may take

SOURCE = r"""
typedef unsigned short u16;

__device__ __forceinline__ double point(const u16* p, long long k) {
    /* fp16 bits to double, exactly (NaN and Inf never reach the kernels) */
    int b = p[k];
    int e = (b >> 10) & 31;
    int m = b & 1023;
    double v = e == 0 ? ldexp((double)m, -24) : ldexp((double)(m | 1024), e - 25);
    return (b & 32768) ? -v : v;
}
__device__ __forceinline__ double point(const float* p, long long k) { return (double)p[k]; }
__device__ __forceinline__ double point(const double* p, long long k) { return p[k]; }

__device__ __forceinline__ long long thread_index() {
    return (long long)blockIdx.x * (long long)blockDim.x + (long long)threadIdx.x;
}

template <typename T>
__device__ __forceinline__ void iterate_t(const T* pts, int n_pts, int n, const double* coef, double total,
                                          double* out) {
    long long e = thread_index();
    if (e >= n) return;
    double v = 0.0;
    for (int i = 0; i < n_pts; i++) v = __dadd_rn(v, __dmul_rn(coef[i], point(pts, (long long)i * n + e)));
    out[e] = __ddiv_rn(v, total);
}

/* A thread of a lanes kernel: thread t is lane t % 8 of row (t / 8) % rows (a point, a pair) of
   span (t / 8) / rows; its elements are those of the span with that lane, from `first` to `end`
   by 8, in index order. False past the last span. */
__device__ __forceinline__ bool lane_of(long long t, long long rows, int n, int span, long long* row,
                                        long long* first, long long* end) {
    long long spans = ((long long)n + span - 1) / span;
    if (t >= spans * rows * 8) return false;
    long long lane = t % 8;
    long long a = t / 8 / rows * span;
    *row = t / 8 % rows;
    *first = a + (lane - a % 8 + 8) % 8;
    *end = a + span < n ? a + span : n;
    return true;
}

template <typename T>
__device__ __forceinline__ void distances_t(const T* pts, int n_pts, int n, const double* m, int span,
                                            double* parts) {
    long long t = thread_index(), i, first, end;
    if (!lane_of(t, n_pts, n, span, &i, &first, &end)) return;
    double acc = 0.0;
    for (long long e = first; e < end; e += 8) {
        double d = __dsub_rn(point(pts, i * n + e), m[e]);
        acc = __fma_rn(d, d, acc);
    }
    parts[t] = acc;
}

template <typename T>
__device__ __forceinline__ void center_t(const T* pts, int n_pts, int n, double* mean) {
    long long e = thread_index();
    if (e >= n) return;
    double v = 0.0;
    for (int i = 0; i < n_pts; i++) v = __dadd_rn(v, point(pts, (long long)i * n + e));
    mean[e] = __ddiv_rn(v, (double)n_pts);
}

template <typename T>
__device__ __forceinline__ void gram_t(const T* pts, int n_pts, int n, const double* mean, int span,
                                       const int* pair_a, const int* pair_b, int pairs, double* parts) {
    long long t = thread_index(), p, first, end;
    if (!lane_of(t, pairs, n, span, &p, &first, &end)) return;
    long long ra = (long long)pair_a[p] * n;
    long long rb = (long long)pair_b[p] * n;
    double acc = 0.0;
    for (long long e = first; e < end; e += 8) {
        double c = mean[e];
        acc = __fma_rn(__dsub_rn(point(pts, ra + e), c), __dsub_rn(point(pts, rb + e), c), acc);
    }
    parts[t] = acc;
}

"""

# each template's parameters and arguments; a kernel per held type, named <template>_<type>
_ENTRY = {
    "iterate": ("const T* pts, int n_pts, int n, const double* coef, double total, double* out",
                "pts, n_pts, n, coef, total, out"),
    "distances": ("const T* pts, int n_pts, int n, const double* m, int span, double* parts",
                  "pts, n_pts, n, m, span, parts"),
    "center": ("const T* pts, int n_pts, int n, double* mean", "pts, n_pts, n, mean"),
    "gram": ("const T* pts, int n_pts, int n, const double* mean, int span, const int* pair_a, const int* pair_b, "
             "int pairs, double* parts", "pts, n_pts, n, mean, span, pair_a, pair_b, pairs, parts"),
}
_C_TYPES = {"f16": "u16", "f32": "float", "f64": "double"}
SOURCE += "".join(f'extern "C" __global__ void {k}_{t}({params.replace("T*", c + "*")}) {{ {k}_t({args}); }}\n'
                  for k, (params, args) in _ENTRY.items() for t, c in _C_TYPES.items())
KERNELS = [f"{k}_{t}" for k in _ENTRY for t in _C_TYPES]
_SUFFIX = {np.dtype(np.uint16): "f16", np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}
_TORCH = {np.dtype(np.uint16): torch.int16, np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


class DeviceMedian:
    """The CUDA device of one pass's medians: its runtime (``engine.merge.backends.cuda.CudaRuntime``
    or the tests' double), a stream of their own, the kernels (compiled once a process), and the
    budget: ``limit`` bytes (the recipe's ``memory``; None: FREE_SHARE of what is free)."""

    def __init__(self, runtime, limit: int | None = None):
        self.rt = runtime
        self.limit = limit
        self._stream = None
        self._kernels: dict | None = None
        self._broken = False
        self.why = ""  # why the kernels are not available
        self._lock = threading.Lock()

    def room(self) -> int:
        """Bytes a key may take on the device now."""
        free, _ = self.rt.mem_get_info()
        room = int(free * FREE_SHARE)
        return room if self.limit is None else min(room, self.limit)

    def usable(self) -> bool:
        """The kernels are compiled (once; False for good when torch or the driver cannot:
        the medians then stay on the CPU)."""
        with self._lock:
            if self._kernels is None and not self._broken:
                try:
                    self.rt.bind()  # this thread (the statistics') works on the merge's device
                    self._kernels = self.rt.compile(SOURCE, KERNELS)
                    self._stream = self.rt.stream()
                except Exception as e:  # no NVRTC, an old torch: the CPU route, same bytes
                    self._broken = True
                    self.why = f"{type(e).__name__}: {e}"
            return self._kernels is not None

    def kernels(self) -> dict:
        if not self.usable():
            raise RuntimeError(f"the median's CUDA kernels are not available ({self.why})")
        return self._kernels

    # ------------------------------------------------------------------------------ a key

    def hold(self, fill: Callable, spans: list, count: int, n: int, dtype, check_cancel: Callable[[], None]):
        """The key's points on the device in ``dtype`` (fp16 bits, fp32 or fp64), formed span by
        span on the host by ``fill(block, a, b)`` (False: a value is not exact in ``dtype``);
        None when one is not. Two pinned blocks take turns: a block is filled only once its
        last upload has run."""
        self.kernels()
        rt = self.rt
        width = max(b - a for a, b in spans)
        held = rt.empty(count * n, _TORCH[np.dtype(dtype)]).view(count, n)
        blocks = [_pinned(rt, count * width, _TORCH[np.dtype(dtype)]) for _ in range(2)]
        sent = [rt.event() for _ in range(2)]
        used = [False, False]
        try:
            return self._send(fill, spans, count, dtype, check_cancel, held, blocks, sent, used)
        except BaseException:
            rt.synchronize()  # (a cancel) no upload may outlive the pinned block it reads
            raise

    def _send(self, fill, spans, count, dtype, check_cancel, held, blocks, sent, used):
        rt, stream = self.rt, self._stream
        for s, (a, b) in enumerate(spans):
            check_cancel()
            j = s % 2
            if used[j]:
                rt.host_wait(sent[j])  # its previous upload has read it
            block = blocks[j][:count * (b - a)].view(count, b - a)  # C-contiguous, as the CPU route's arrays
            if not fill(block.numpy().view(dtype), a, b):
                rt.synchronize()
                return None

            def up(block=block, a=a, b=b):
                held[:, a:b].copy_(block, non_blocking=True)

            rt.run(stream, up)
            rt.record(sent[j], stream)
            used[j] = True
        for j in range(2):
            if used[j]:
                rt.host_wait(sent[j])
        return held

    def sweep(self, held, coef: np.ndarray, total: float, span: int, m, parts: np.ndarray) -> None:
        """One Weiszfeld sweep: the iterate of ``coef`` into ``m`` (device, n fp64) and each
        span's squared distances to it into ``parts`` (host, [spans, N, 8])."""
        count, n = held.shape
        k, rt, stream = self.kernels(), self.rt, self._stream
        suffix = _suffix(held)
        dev_coef = self._upload(coef)
        out = rt.empty(parts.size, torch.float64)

        def work():
            k["iterate_" + suffix](grid=(_blocks(n), 1, 1), block=(BLOCK, 1, 1),
                                   args=[held, count, n, dev_coef, float(total), m])
            k["distances_" + suffix](grid=(_blocks(parts.size), 1, 1), block=(BLOCK, 1, 1),
                                     args=[held, count, n, m, span, out])

        rt.run(stream, work)
        self._download(out, parts)

    def iterate(self, held, coef: np.ndarray, total: float, m) -> None:
        """The iterate of ``coef`` into ``m`` (device, n fp64)."""
        count, n = held.shape
        k, rt, stream = self.kernels(), self.rt, self._stream
        dev_coef = self._upload(coef)
        rt.run(stream, lambda: k["iterate_" + _suffix(held)](grid=(_blocks(n), 1, 1), block=(BLOCK, 1, 1),
                                                             args=[held, count, n, dev_coef, float(total), m]))

    def gram_parts(self, held, span: int) -> np.ndarray:
        """Each span's lanes of the centred points' Gram matrix: float64[spans, N, N, 8] (upper
        triangle, the lanes as ``gram.gram_add_part`` leaves them)."""
        count, n = held.shape
        k, rt, stream = self.kernels(), self.rt, self._stream
        suffix = _suffix(held)
        spans = -(-n // span)
        ia, ib = np.triu_indices(count)
        pair_a, pair_b = self._upload(ia.astype(np.int32)), self._upload(ib.astype(np.int32))
        mean = rt.empty(n, torch.float64)
        out = rt.empty(spans * len(ia) * 8, torch.float64)

        def work():
            k["center_" + suffix](grid=(_blocks(n), 1, 1), block=(BLOCK, 1, 1), args=[held, count, n, mean])
            k["gram_" + suffix](grid=(_blocks(out.numel()), 1, 1), block=(BLOCK, 1, 1),
                                args=[held, count, n, mean, span, pair_a, pair_b, len(ia), out])

        rt.run(stream, work)
        flat = np.empty((spans, len(ia), 8), np.float64)
        self._download(out, flat)
        lanes = np.zeros((spans, count, count, 8), np.float64)
        lanes[:, ia, ib, :] = flat
        return lanes

    def result(self, m, host: np.ndarray) -> None:
        """``m`` (device) into ``host``, once the work before it has run."""
        self._download(m, host)

    # ------------------------------------------------------------------------------ transfers

    def _upload(self, values: np.ndarray):
        """A small host array on the device (its pinned copy is the stream's until the upload ran)."""
        rt, stream = self.rt, self._stream
        dtype = torch.from_numpy(values[:0]).dtype
        pinned = _pinned(rt, values.size, dtype)
        pinned.numpy()[:] = values
        dev = rt.empty(values.size, dtype)
        done = rt.event()
        rt.run(stream, lambda: dev.copy_(pinned, non_blocking=True))
        rt.record(done, stream)
        rt.host_wait(done)  # (a few bytes: the pinned copy may then go)
        return dev

    def _download(self, dev, host: np.ndarray) -> None:
        rt, stream = self.rt, self._stream
        pinned = _pinned(rt, host.size, torch.float64)
        done = rt.event()
        rt.run(stream, lambda: pinned.copy_(dev.reshape(-1)[:host.size], non_blocking=True))
        rt.record(done, stream)
        rt.host_wait(done)
        host.reshape(-1)[:] = pinned.numpy()

    def points_bytes(self, count: int, n: int, dtype, route_gram: bool) -> int:
        """Device bytes of a key's work: the points, the iterate, and the Gram route's mean and
        lanes or the sweeps' lanes."""
        spans = -(-n // (1 << 16))
        lanes = spans * (count * (count + 1) // 2 if route_gram else count) * 8 * 8
        return np.dtype(dtype).itemsize * count * n + 8 * n * (2 if route_gram else 1) + lanes


def _pinned(rt, n: int, dtype: torch.dtype) -> torch.Tensor:
    """``n`` elements of pinned host memory (the runtime counts pinned memory in bytes)."""
    return rt.pinned(n * torch.empty((), dtype=dtype).element_size()).view(dtype)


def _suffix(held) -> str:
    return {torch.int16: "f16", torch.float32: "f32", torch.float64: "f64"}[held.dtype]


def _blocks(threads: int) -> int:
    return max(1, math.ceil(threads / BLOCK))
