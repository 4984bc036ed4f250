"""The compare pass's read buffers: one row of bytes per file read, enough for a chunk of
fp64, with the dtype views the deltas kernel takes; and where each row's element 0 is in them.
Shared by the reader (``engine.compare.gather``) and both passes."""

from __future__ import annotations

import numpy as np


class ReadBuffers:
    """A read buffer for one chunk: ``raw`` (a row of ``8 * chunk`` bytes for each file read,
    enough for fp64) and its three dtype views, flat, as ``engine.kernels.deltas`` takes them."""

    def __init__(self, rows: int, chunk: int, raw: np.ndarray | None = None):
        self.raw = np.empty((rows, chunk * 8), np.uint8) if raw is None else raw
        flat = self.raw.reshape(-1)
        self.in16, self.in32, self.in64 = flat.view(np.uint16), flat.view(np.float32), flat.view(np.float64)


def row_layout(dtypes: list[str], chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Each read row's kind code and where its element 0 is in that kind's view of a
    ``ReadBuffers`` of ``chunk`` (rows of a dtype the kernel does not widen are widened into their
    row as fp64 when read)."""
    from engine.kernels.mean import BF16, F16, F32, F64, KIND

    kinds = np.array([KIND.get(d, F64) for d in dtypes], np.int64)
    per_row = {F16: 4 * chunk, BF16: 4 * chunk, F32: 2 * chunk, F64: chunk}
    offs = np.array([r * per_row[int(k)] for r, k in enumerate(kinds)], np.int64)
    return kinds, offs
