"""Stored float values widened exactly to fp64, for the whole-tensor statistics and the
medians (``tensor_stats``, ``median``, ``stats_feed``): from a file range, or from bytes already
read, less a base when given, in one fused pass (numba) where the kernels read the dtype."""

from __future__ import annotations

import numpy as np
import torch

from engine.checkpoint.format import DTYPES
from engine.checkpoint.reader import pread_exact
from engine.kernels.mean import KIND
from engine.kernels.methods import widen, widen_minus
from engine.plan.model import Source

_NO16, _NO32, _NO64 = np.zeros(0, np.uint16), np.zeros(0, np.float32), np.zeros(0, np.float64)


def read_f64(fd: int, src: Source, path, start: int, stop: int, minus: torch.Tensor | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """Elements ``start .. stop`` of a stored float tensor, widened exactly to fp64, less
    ``minus`` (fp64, same length) when given; into ``out`` (fp64, contiguous) when given."""
    itemsize = DTYPES[src.dtype].itemsize
    raw = torch.empty((stop - start) * itemsize, dtype=torch.uint8)
    pread_exact(fd, memoryview(raw.numpy()), src.offset + start * itemsize, path)
    return widen_raw(raw, src, minus, out)


def widen_raw(raw: torch.Tensor, src: Source, minus: torch.Tensor | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """The stored bytes ``raw`` (uint8) of elements of ``src``, widened exactly to fp64, less
    ``minus`` when given, into ``out`` when given."""
    spec = DTYPES[src.dtype]
    n = raw.numel() // spec.itemsize
    if src.dtype in KIND:  # one fused pass (numba), not torch's two conversions and a subtraction
        out = torch.empty(n, dtype=torch.float64) if out is None else out
        data = raw.numpy()
        views = (data.view(np.uint16) if spec.itemsize == 2 else _NO16,
                 data.view(np.float32) if spec.itemsize == 4 else _NO32,
                 data.view(np.float64) if spec.itemsize == 8 else _NO64)
        if minus is None:
            widen(out.numpy(), KIND[src.dtype], 0, *views)
        else:
            widen_minus(out.numpy(), KIND[src.dtype], *views, minus.numpy())
        return out
    values = raw.view(spec.torch_dtype)
    if values.dtype not in (torch.float32, torch.float64):
        values = values.to(torch.float32)  # fp16/bf16 -> fp32 is exact
    values = values.to(torch.float64)
    if minus is not None:
        values.sub_(minus)
    return values if out is None else out.copy_(values)
