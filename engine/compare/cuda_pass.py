"""The compare pass's reduction on a CUDA GPU: each chunk's rows go up from pinned read
buffers, are widened to fp64, centred and added to the Gram matrix by one fp64 matrix product
(``G += X X^T``) per chunk, all on one stream.

Why it is built this way:

- The host reads (the reader thread of ``engine.compare.gather``) while the GPU reduces: a read
  buffer is pinned, its upload is asynchronous, and it goes back to the reader only once an
  event recorded after its upload has completed; ``DEPTH`` chunks are in flight, so the reader
  always has buffers to fill. One stream orders the uploads, the deltas and the products, so
  the device buffers need no events of their own.
- Chunks are larger than on the CPU (``DEFAULT_BUDGET``: a chunk is launch overhead plus one
  pass of the card's bandwidth, no cache to stay within) and the whole device footprint is
  checked against the card's free memory before anything is allocated; an out-of-memory error
  becomes a CompareError that says what was free and what was needed.
- The arithmetic is the CPU pass's definition (the exact widening, deltas in fp64, the mean of
  the models as their sum over n, fp64 products) in another order of additions: the matrices
  agree with the CPU's to fp64 rounding, not bit for bit, and each device's reruns give the
  same bits (cuBLAS's fp64 products and torch's reductions are deterministic for fixed shapes).
  The product's two triangles are made equal on the host, so cosines are symmetric.

Every stream, event and allocation goes through a runtime (``engine.merge.backends.cuda``'s
``CudaRuntime`` on a GPU); the tests run this class over the CPU test double of that runtime,
which defers each stream's work and so shows a buffer given back before its upload ran.
"""

from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from typing import Callable

import numpy as np
import torch

from engine.compare.buffers import ReadBuffers
from engine.compare.events import CompareError
from engine.kernels.mean import BF16, F16, F32, F64

DEFAULT_BUDGET = 256 << 20  # bytes of the pinned read buffers and the device's fp64 deltas
DEPTH = 2  # chunks whose upload may still be running; the other read buffers are the reader's
BLOCKS = 22  # Gram matrices one component may need at most (20 UNet blocks, keys outside, VAE)
_MARGIN = 64 << 20  # cuBLAS's workspace and the allocator's rounding
_TORCH = {F16: (torch.float16, 2), BF16: (torch.bfloat16, 2), F32: (torch.float32, 4), F64: (torch.float64, 8)}


@contextmanager
def _device_errors(runtime, what: str):
    """An out-of-memory error of the card as a CompareError a user can act on."""
    try:
        yield
    except torch.OutOfMemoryError:
        free, total = runtime.mem_get_info()
        raise CompareError(f"the GPU ran out of memory while {what} ({free / 1e9:.2f} GB free of "
                           f"{total / 1e9:.2f} GB); close other programs that use it, or use --device cpu") from None


def device_bytes(rows: int, chunk: int) -> int:
    """Device memory one component's pass needs: the uploaded rows, their fp64 deltas, the
    Gram matrices and a margin."""
    return rows * chunk * 8 + rows * chunk * 8 + BLOCKS * rows * rows * 8 + _MARGIN


class CudaPass:
    """Deltas and Gram matrices of one component at a time on a GPU (see the module docstring);
    ``runtime``: ``CudaRuntime(device)``, or the tests' double."""

    budget = DEFAULT_BUDGET

    def __init__(self, runtime, name: str):
        self.rt = runtime
        self.name = name
        with _device_errors(runtime, "starting the comparison"):
            self.stream = runtime.stream()
            self.events = [runtime.event() for _ in range(DEPTH + 1)]
        self._next_event = 0
        self.inflight: deque = deque()
        self.grams: dict[str | None, torch.Tensor] = {}
        self.staging = self.xs = None

    def buffers(self, rows: int, chunk: int, count: int) -> list:
        out = []
        for _ in range(count):
            try:
                pinned = self.rt.pinned(rows * chunk * 8)
            except RuntimeError as e:  # cudaHostAlloc refused: the host's pinned memory is spent
                raise CompareError(f"cannot pin {rows * chunk * 8 / 1e6:.0f} MB of host memory for the GPU's "
                                   f"read buffers ({e}); use --device cpu") from None
            slot = ReadBuffers(rows, chunk, raw=pinned.numpy().reshape(rows, chunk * 8))
            slot.pinned = pinned.view(rows, chunk * 8)
            out.append(slot)
        return out

    def start(self, n: int, with_ref: bool, chunk: int) -> None:
        """Begin a component of ``n`` models (and the reference row, read or the mean); the
        card's free memory is checked before anything is allocated on it."""
        self.n, self.with_ref, self.chunk = n, with_ref, chunk
        rows = n + 1
        free, total = self.rt.mem_get_info()
        need = device_bytes(rows, chunk)
        if need > free:
            raise CompareError(f"the GPU has not enough free memory for this comparison: {free / 1e9:.2f} GB free "
                               f"of {total / 1e9:.2f} GB, about {need / 1e9:.2f} GB needed; close other programs "
                               "that use it, or use --device cpu")
        with _device_errors(self.rt, "allocating the comparison's buffers"):
            self.staging = self.rt.empty(rows * chunk * 8).view(rows, chunk * 8)
            self.xs = self.rt.empty(rows * chunk, torch.float64).view(rows, chunk)
        self.grams = {}

    def add(self, slot, block: str | None, layout: tuple[np.ndarray, np.ndarray], start: int, m: int,
            give_back: Callable[[object], None]) -> None:
        """Queue the chunk in ``slot`` (``m`` elements of a tensor of ``block``); give back the
        read buffers whose uploads have run, keeping ``DEPTH`` in flight."""
        n, with_ref = self.n, self.with_ref
        kinds = [int(k) for k in layout[0]]
        rows = len(kinds)  # n models, plus the reference when one is read
        with _device_errors(self.rt, "comparing"):
            g = self.grams.get(block)
            if g is None:
                g = self.grams[block] = self.rt.empty((n + 1) * (n + 1), torch.float64).view(n + 1, n + 1)
                self.rt.run(self.stream, g.zero_)
            staging, xs, pinned = self.staging, self.xs, slot.pinned

            def work() -> None:
                for r in range(rows):
                    dtype, size = _TORCH[kinds[r]]
                    row = staging[r, : m * size]
                    row.copy_(pinned[r, : m * size], non_blocking=True)
                    xs[r, :m].copy_(row.view(dtype))  # the exact widening
                x = xs[:, :m]
                if not with_ref:
                    torch.sum(x[:n], dim=0, out=xs[n, :m])
                    xs[n, :m].div_(n)
                x[:n].sub_(x[n])
                g.addmm_(x, x.t())

            self.rt.run(self.stream, work)
            event = self.events[self._next_event]
            self._next_event = (self._next_event + 1) % len(self.events)
            self.rt.record(event, self.stream)
        self.inflight.append((event, slot))
        while len(self.inflight) > DEPTH:
            self._retire(give_back)

    def _retire(self, give_back: Callable[[object], None]) -> None:
        event, slot = self.inflight.popleft()
        self.rt.host_wait(event)  # its upload has run: the reader may overwrite it
        give_back(slot)

    def drain(self, give_back: Callable[[object], None]) -> None:
        """Wait for every chunk in flight and give its read buffer back."""
        while self.inflight:
            self._retire(give_back)

    def finish(self) -> dict[str | None, np.ndarray]:
        """The component's Gram matrices on the host, symmetric (upper triangle mirrored)."""
        with _device_errors(self.rt, "finishing the comparison"):
            self.rt.synchronize()
            out = {}
            for block, g in self.grams.items():
                upper = np.triu(g.cpu().numpy().astype(np.float64, copy=True))
                out[block] = upper + np.triu(upper, 1).T
        self.grams, self.staging, self.xs = {}, None, None
        self.rt.release()
        return out

    def close(self) -> None:
        try:
            self.rt.synchronize()  # nothing of ours still reads a pinned buffer or a device buffer
        except Exception:
            pass
        self.grams, self.staging, self.xs = {}, None, None
