"""The fused weighted mean against the torch ``Kernel`` (byte for byte) and against exact
rational arithmetic: random sources of every float dtype, integer and binary weights,
values at 16-bit ties, subnormals, huge finite values, NaN and Inf, several outputs at once."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.kernels import mean as M
from engine.merge.arithmetic import Kernel
from engine.plan.build import exact_factors
from engine.plan.model import Source

TORCH = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
SIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}


def fused(sources: list[torch.Tensor], factors, outs: list[str], check: bool = True):
    """Run the kernel the way the CPU backend does: every source packed at 64-byte aligned
    offsets in one byte buffer, every output likewise in another."""
    n = sources[0].numel()

    def pack(sizes):
        offsets, at = [], 0
        for s in sizes:
            offsets.append(at)
            at += (n * s + 63) // 64 * 64
        return offsets, np.zeros(max(at, 8) // 8 * 8 + 8, np.uint8)

    names = [next(k for k, v in TORCH.items() if v == s.dtype) for s in sources]
    in_offs, inbuf = pack([SIZE[d] for d in names])
    for s, off in zip(sources, in_offs):
        raw = s.contiguous().view(torch.uint8).numpy()
        inbuf[off:off + raw.size] = raw
    out_offs, outbuf = pack([SIZE[d] for d in outs])
    views = lambda b: (b[: b.size // 2 * 2].view(np.uint16), b[: b.size // 4 * 4].view(np.float32),  # noqa: E731
                       b[: b.size // 8 * 8].view(np.float64))
    bad = M.weighted_mean(*views(inbuf), np.array([M.KIND[d] for d in names], np.int64),
                          np.array([o // SIZE[d] for o, d in zip(in_offs, names)], np.int64),
                          np.array(factors, np.float64), math.fsum(factors), n, *views(outbuf),
                          np.array([M.KIND[d] for d in outs], np.int64),
                          np.array([o // SIZE[d] for o, d in zip(out_offs, outs)], np.int64), check)
    results = [torch.from_numpy(outbuf[o:o + n * SIZE[d]].copy()).view(TORCH[d]) for o, d in zip(out_offs, outs)]
    return bad, results


def torch_kernel(sources, factors, outs):
    k = Kernel(torch.device("cpu"), sources[0].numel())
    results = [torch.empty(sources[0].numel(), dtype=TORCH[d]) for d in outs]
    finite = k.mean(sources, list(factors), results)
    return bool(finite), results


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _values(draw_seed: int, n: int, dtype: torch.dtype, style: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(draw_seed)
    if style == "weights":
        x = torch.randn(n, generator=g, dtype=torch.float64) * 0.05
    elif style == "ties":  # 16-bit values and their midpoints: means land on ties often
        x = torch.randn(n, generator=g, dtype=torch.float64).to(torch.float16).to(torch.float64)
        x = x + torch.randint(0, 2, (n,), generator=g) * x.abs() * 2.0**-11
    elif style == "tiny":  # subnormal in fp16, in bf16/fp32 too
        x = torch.randn(n, generator=g, dtype=torch.float64) * torch.tensor([2.0**-20, 2.0**-130])[
            torch.randint(0, 2, (n,), generator=g)]
    else:  # "huge": finite values near the top of fp32 (and fp16)
        x = torch.randn(n, generator=g, dtype=torch.float64) * torch.tensor([3e38, 6e4, 1.0])[
            torch.randint(0, 3, (n,), generator=g)]
        x = x.clamp(-3.4e38, 3.4e38)
    return x.to(dtype)


DTYPES = st.sampled_from(["F16", "BF16", "F32", "F64"])
WEIGHTS = st.lists(st.sampled_from([1.0, 0.5, 0.3, 1.7, 5.0, 2.0, 0.123, 1 / 3]), min_size=1, max_size=6)


@settings(max_examples=120, deadline=None)
@given(srcs=st.lists(DTYPES, min_size=1, max_size=6), weights=WEIGHTS, outs=st.lists(DTYPES, min_size=1, max_size=3),
       style=st.sampled_from(["weights", "ties", "tiny", "huge"]), n=st.integers(1, 5000), seed=st.integers(0, 2**31))
def test_fused_mean_is_byte_identical_to_the_torch_kernel(srcs, weights, outs, style, n, seed):
    weights = (weights * len(srcs))[: len(srcs)]
    sources = [_values(seed + i, n, TORCH[d], style) for i, d in enumerate(srcs)]
    plan_sources = [Source(0, f"k{i}", d, (n,), 0, w) for i, (d, w) in enumerate(zip(srcs, weights))]
    factors = exact_factors(plan_sources)
    finite, theirs = torch_kernel(sources, factors, outs)
    bad, ours = fused(sources, factors, outs)
    assert (bad < 0) == finite
    if finite:
        for d, a, b in zip(outs, ours, theirs):
            assert bits(a) == bits(b), d


def test_huge_finite_fp32_values_are_not_flagged():
    x = torch.full((1000,), 3e38, dtype=torch.float32)
    out = torch.empty(1000, dtype=torch.float16)
    assert bool(Kernel(torch.device("cpu"), 1000).copy(x, [out], True))  # the torch kernel: fp32 sum overflowed
    bad, (out,) = fused([x, x, -x], [1.0, 1.0, 1.0], ["F32"])
    assert bad == -1 and bool((out == x / 3).all())
    bad, (out,) = fused([x], [1.0], ["F16"])  # a checked copy that overflows fp16: finite sources
    assert bad == -1 and bool(out.isinf().all())


@pytest.mark.parametrize("special", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", ["F16", "BF16", "F32", "F64"])
def test_first_non_finite_element_is_reported(special, dtype):
    n = 10_000
    a = _values(1, n, TORCH[dtype], "weights")
    b = _values(2, n, TORCH[dtype], "weights")
    b[7777] = special
    b[9000] = special
    bad, _ = fused([a, b], [1.0, 3.0], ["F16"])
    assert bad == 7777
    bad, _ = fused([b], [1.0], ["F16"], check=False)  # an unchecked copy computes everything
    assert bad == -1


def test_mean_equals_the_exact_rational_mean_correctly_rounded():
    """3a + 17b + 50c over 70, rounded to fp16 from the exact rational value (no fp64 at all)."""
    n = 4000
    srcs = [_values(10 + i, n, torch.float16, "ties") for i in range(3)]
    factors = [3.0, 17.0, 50.0]
    _, (ours,) = fused(srcs, factors, ["F16"])
    vals = [s.to(torch.float64).tolist() for s in srcs]
    for i in range(n):
        exact = sum(Fraction(f) * Fraction(v[i]) for f, v in zip(factors, vals)) / 70
        got = Fraction(ours[i].item())
        # the nearest fp16 to ``exact``: neighbours of ``got`` must be no closer, ties to even
        bits_i = int(ours[i].view(torch.int16).item()) & 0xFFFF
        for nb in (bits_i - 1, bits_i + 1):
            other = torch.tensor([nb & 0xFFFF], dtype=torch.int32).to(torch.int16).view(torch.float16).item()
            if math.isfinite(other):
                d_got, d_other = abs(got - exact), abs(Fraction(other) - exact)
                assert d_got < d_other or (d_got == d_other and bits_i % 2 == 0), i


@pytest.mark.parametrize("factors", [[1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.25, 0.25], [3.0, 5.0], [1.0, 1.0, 1.0]])
def test_power_of_two_totals_multiply_with_the_same_bytes(factors):
    """A power-of-two total is applied as a product by its reciprocal: the same bytes as the
    torch kernel's division, fp64 subnormals included."""
    g = torch.Generator().manual_seed(3)
    scales = torch.tensor([1.0, 1e-310, 1e300], dtype=torch.float64)
    srcs = [torch.randn(5000, generator=g, dtype=torch.float64) * scales[torch.randint(0, 3, (5000,), generator=g)]
            for _ in factors]
    finite, theirs = torch_kernel(srcs, factors, ["F64", "F32", "F16"])
    bad, ours = fused(srcs, factors, ["F64", "F32", "F16"])
    assert finite and bad == -1
    assert [bits(t) for t in ours] == [bits(t) for t in theirs]
