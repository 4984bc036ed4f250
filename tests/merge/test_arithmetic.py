"""engine.merge.arithmetic (the torch Kernel, the arithmetic of the CUDA path): a weighted
mean in fp64 with integer factors, divided once and rounded once, equals the correctly
rounded exact mean, computed here with Python fractions."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from engine.merge.arithmetic import Kernel, arange_values

DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


def _round_exact(values: list[Fraction], dtype: torch.dtype) -> torch.Tensor:
    """Correct rounding of exact rationals: of a candidate and its two neighbours in ``dtype``
    (found by stepping the bit pattern), the nearest, ties to the even pattern."""
    ints = torch.int16 if dtype in (torch.float16, torch.bfloat16) else torch.int32
    out = []
    for q in values:
        guess = torch.tensor(float(q), dtype=torch.float64).to(dtype)
        bits = int(guess.view(ints))
        candidates = []
        for b in (bits - 1, bits, bits + 1):
            c = torch.tensor(b, dtype=ints).view(dtype)
            if torch.isfinite(c):
                candidates.append((abs(Fraction(c.item()) - q), b % 2, b, c))
        out.append(min(candidates, key=lambda t: (t[0], t[1]))[3])
    return torch.stack(out)


@pytest.mark.parametrize("out_dtype", ["F16", "BF16", "F32"])
@pytest.mark.parametrize("factors", [(1.0, 1.0, 1.0), (3.0, 17.0, 50.0), (1.0, 2.0)])
def test_mean_is_the_correctly_rounded_exact_mean(out_dtype, factors):
    gen = torch.Generator().manual_seed(len(factors) * 7 + len(out_dtype))
    n = 4000
    views = [torch.randn(n, generator=gen).to(torch.float16) for _ in factors]
    # near-ties: the same value nudged by one fp16 ulp in one source
    views[-1][:500] = views[0][:500]
    views[-1][500:1000] = torch.nextafter(views[0][500:1000].float(), torch.tensor(float("inf"))).half()
    dt = DTYPES[out_dtype]
    out = torch.empty(n, dtype=dt)
    kernel = Kernel(torch.device("cpu"), n)
    finite = kernel.mean(views, list(factors), [out])
    assert bool(finite)
    total = sum(Fraction(f) for f in factors)
    exact = [sum(Fraction(f) * Fraction(v[i].item()) for f, v in zip(factors, views)) / total for i in range(n)]
    expected = _round_exact(exact[:1200], dt)  # the first 1200 hold the near-ties and enough random values
    assert torch.equal(out[:1200].view(torch.uint8), expected.view(torch.uint8))


def test_round_to_odd_then_narrowing_is_one_correct_rounding():
    kernel = Kernel(torch.device("cpu"), 1 << 12)
    # fp64 values just around fp16 ties: m + 0.5 ulp +- tiny
    base = torch.arange(1, 1 << 10, dtype=torch.float64) * 2.0 ** -10 + 1.0
    half_ulp = 2.0 ** -11
    src = torch.cat([base + half_ulp, base + half_ulp + 2.0 ** -40, base + half_ulp - 2.0 ** -40])
    out = torch.empty(src.numel(), dtype=torch.float16)
    kernel.narrow(src, out)
    expected = _round_exact([Fraction(x) for x in src.tolist()], torch.float16)
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))


def test_a_nan_source_makes_the_flag_false():
    kernel = Kernel(torch.device("cpu"), 8)
    a = torch.ones(8, dtype=torch.float16)
    b = a.clone()
    b[3] = float("nan")
    assert not bool(kernel.mean([a, b], [1.0, 1.0], [torch.empty(8, dtype=torch.float16)]))
    assert kernel.finite(a) and not kernel.finite(b)


def test_copy_is_bit_exact_for_the_same_dtype_and_narrows_otherwise():
    kernel = Kernel(torch.device("cpu"), 64)
    src = torch.from_numpy(np.frombuffer(np.random.default_rng(1).bytes(128), dtype=np.float16).copy())
    src[torch.isnan(src)] = 0
    same = torch.empty(64, dtype=torch.float16)
    kernel.copy(src, [same], check=False)
    assert torch.equal(same.view(torch.int16), src.view(torch.int16))
    wide = torch.empty(64, dtype=torch.float32)
    kernel.copy(src, [wide], check=False)
    assert torch.equal(wide, src.float())


def test_arange_values_are_exact_integers():
    assert arange_values("F32", 77).tolist() == list(range(77))
    assert arange_values("I64", 5).dtype == torch.int64
