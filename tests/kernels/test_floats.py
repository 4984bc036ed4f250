"""The kernels' float conversions against torch, bit for bit: exhaustive over every fp16 and
bf16 pattern, and over the rounding cases (every midpoint between neighbouring 16-bit values,
one step either side of it, subnormals, overflow) of fp32 and fp64 narrowing; both the CPU's
fp16 instructions and the integer fallback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from merge_support import round_exact

from engine.kernels import floats as F
from engine.merge.arithmetic import Kernel

ALL16 = np.arange(1 << 16, dtype=np.uint16)
TORCH16 = {"F16": torch.float16, "BF16": torch.bfloat16}


def _as(bits: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(bits.astype(np.int16)).view(dtype)


def _same(ours: np.ndarray, theirs: np.ndarray, floats: np.ndarray) -> None:
    """Equal bits where the value is a number; NaN where torch has NaN (a merge never writes a
    NaN: the non-finite check discards it, so its payload is not part of the contract)."""
    nan = np.isnan(floats)
    assert np.array_equal(ours[~nan], theirs[~nan]), np.flatnonzero((ours != theirs) & ~nan)[:5]


def _bits16(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy().view(np.uint16)


@pytest.mark.parametrize("decode", [F.f16_bits_to_f64, F.f16_bits_to_f64_soft])
def test_fp16_decode_is_exact_for_all_65536_patterns(decode):
    out = np.empty(len(ALL16))
    decode(ALL16, out)
    ref = _as(ALL16, torch.float16).to(torch.float64).numpy()
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(out), nan)
    assert np.array_equal(out[~nan].view(np.int64), ref[~nan].view(np.int64))  # -0.0 and subnormals too


@pytest.mark.parametrize("decode", [F.bf16_bits_to_f64, F.bf16_bits_to_f64_soft])
def test_bf16_decode_is_exact_for_all_65536_patterns(decode):
    out = np.empty(len(ALL16))
    decode(ALL16, out)
    ref = _as(ALL16, torch.bfloat16).to(torch.float64).numpy()
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(out), nan)
    assert np.array_equal(out[~nan].view(np.int64), ref[~nan].view(np.int64))


def _rounding_cases(dtype: torch.dtype) -> np.ndarray:
    """fp64 values at and around every rounding decision of ``dtype``: each value, each
    midpoint between neighbours (a tie), the fp64 values one step either side of the tie, and
    points a little off it at fp32 precision and below (where rounding to odd matters)."""
    vals = _as(ALL16, dtype).to(torch.float64).numpy()
    vals = vals[np.isfinite(vals)]
    pos = np.unique(np.abs(vals))
    top = {torch.float16: 65504.0, torch.bfloat16: float(torch.finfo(torch.bfloat16).max)}[dtype]
    pos = np.append(pos, top + (pos[-1] - pos[-2]))  # the overflow threshold's other side
    mid = (pos[:-1] + pos[1:]) / 2  # exact in fp64
    step = pos[1:] - pos[:-1]
    cases = [pos, mid, np.nextafter(mid, 0), np.nextafter(mid, np.inf), mid + step * 2.0**-30,
             mid - step * 2.0**-30, mid + step * 2.0**-40, mid - step * 2.0**-25]
    x = np.concatenate(cases)
    return np.concatenate([x, -x, [np.inf, -np.inf, np.nan, 3e38, -3e38, 1e39, 1e-39, 1e-45, 2.0**-149 * 1.5]])


def _random_f64(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 1 << 63, n, dtype=np.int64) | (rng.integers(0, 2, n, dtype=np.int64) << 63)
    x = bits.view(np.float64)
    # most of them where 16-bit results are neither zero nor infinite
    return np.concatenate([x, rng.standard_normal(n) * 0.05, rng.standard_normal(n) * 2.0**-130,
                           rng.standard_normal(n) * 2.0**-20, rng.standard_normal(n) * 6e4])


@pytest.mark.parametrize("name", ["F16", "BF16"])
def test_fp64_narrowing_matches_the_torch_kernel(name):
    dtype = TORCH16[name]
    x = np.concatenate([_rounding_cases(dtype), _random_f64(200_000, 1)])
    ours = np.empty(len(x), np.uint16)
    (F.f64_to_f16 if name == "F16" else F.f64_to_bf16)(x, ours)
    theirs = torch.empty(len(x), dtype=dtype)
    Kernel(torch.device("cpu"), len(x)).narrow(torch.from_numpy(x), theirs)
    _same(ours, _bits16(theirs), x)


@pytest.mark.parametrize("name", ["F16", "BF16"])
def test_fp64_narrowing_is_one_correct_rounding(name):
    """Against the suite's fp64 reference (nearest, ties to even, by exact distance), where
    the torch engine's recipe is a single rounding: everywhere but bf16 below 2**-126."""
    dtype = TORCH16[name]
    x = np.concatenate([_rounding_cases(dtype), _random_f64(100_000, 2)])
    x = x[np.isfinite(x) & ((np.abs(x) >= 2.0**-126) | (np.abs(x) == 0) | (name == "F16"))]
    # round_exact picks the nearest finite value: compare below the overflow threshold
    x = x[np.abs(x) < {"F16": 65520.0, "BF16": 3.3e38}[name]]
    ours = np.empty(len(x), np.uint16)
    (F.f64_to_f16 if name == "F16" else F.f64_to_bf16)(x, ours)
    ref = round_exact(torch.from_numpy(x), dtype)
    _same(ours, _bits16(ref), x)


def _f32_cases(dtype: torch.dtype) -> np.ndarray:
    x = _rounding_cases(dtype)
    x = x[~(np.abs(x) > 3.4e38)].astype(np.float32)  # ties are exact in fp32 (they need <= 12 bits)
    rng = np.random.default_rng(3)
    rand = rng.integers(0, 1 << 32, 1_000_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    his = (ALL16.astype(np.uint32) << 16)
    lows = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], np.uint32)
    bf = (his[:, None] | lows[None, :]).reshape(-1).view(np.float32)
    return np.concatenate([x, np.nextafter(x, np.float32(0)), np.nextafter(x, np.float32(np.inf)), rand, bf])


@pytest.mark.parametrize("convert", [F.f32_to_f16, F.f32_to_f16_soft])
def test_fp32_to_fp16_matches_torch(convert):
    x = _f32_cases(torch.float16)
    ours = np.empty(len(x), np.uint16)
    convert(x, ours)
    _same(ours, _bits16(torch.from_numpy(x).to(torch.float16)), x)


def test_fp32_to_bf16_matches_torch():
    x = _f32_cases(torch.bfloat16)
    ours = np.empty(len(x), np.uint16)
    F.f32_to_bf16(x, ours)
    _same(ours, _bits16(torch.from_numpy(x).to(torch.bfloat16)), x)
