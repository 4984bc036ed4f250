"""The primitives for the merge methods: masked sums and the sign vote against plain numpy
references, the k-th smallest magnitude against torch.kthvalue, the counter-based hash's numba
kernel against its torch twin (bit for bit) and its uniformity, and the Gram matrix against an
exact reference and under different chunkings."""

from __future__ import annotations

import math
from fractions import Fraction

import numba
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.kernels import floats, gram, hashing, select, vote
from engine.kernels.jit import fma


def _bits(x: torch.Tensor) -> np.ndarray:
    view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    return x.view(view).numpy()


def test_widen_reads_every_kind_exactly():
    x = torch.randn(1000, dtype=torch.float64)
    for dt, kind in ((torch.float16, 0), (torch.bfloat16, 1), (torch.float32, 2), (torch.float64, 3)):
        t = x.to(dt)
        raw = np.concatenate([np.zeros(8, np.uint8), t.view(torch.uint8).numpy()])
        views = (raw.view(np.uint16), raw[: raw.size // 4 * 4].view(np.float32),
                 raw[: raw.size // 8 * 8].view(np.float64))
        out = np.empty(1000)
        floats.widen(kind, *views, 8 // t.element_size(), out)
        assert np.array_equal(out, t.to(torch.float64).numpy())


def test_masked_add_and_sign_vote_against_numpy():
    rng = np.random.default_rng(5)
    xs = rng.standard_normal((4, 3000)).astype(np.float16).astype(np.float64)
    xs[:, :10] = 0.0
    ws = [3.0, 17.0, 50.0, 2.0]
    keep = rng.random((4, 3000)) < 0.7
    acc, weight = np.zeros(3000), np.zeros(3000)
    for x, w, k in zip(xs, ws, keep):
        vote.masked_add(acc, weight, x, w, k.astype(np.uint8))
    assert np.array_equal(acc, sum(np.where(k, w * x, 0.0) for x, w, k in zip(xs, ws, keep)))  # exact sums
    assert np.array_equal(weight, sum(np.where(k, w, 0.0) for w, k in zip(ws, keep)))

    thresholds = [0.5, 0.1, 1.0, 0.0]
    sums = [np.zeros(3000) for _ in range(4)]
    for x, w, t in zip(xs, ws, thresholds):
        vote.sign_vote_add(*sums, x, w, t)
    out = np.empty(3000)
    vote.sign_vote_finish(*sums, out)
    kept = [np.where(np.abs(x) >= t, x, 0.0) for x, t in zip(xs, thresholds)]
    elected = np.where(sum(w * k for w, k in zip(ws, kept)) >= 0, 1.0, -1.0)
    agree = [(np.sign(k) == elected) & (k != 0) for k in kept]
    num = sum(np.where(a, w * k, 0.0) for a, w, k in zip(agree, ws, kept))
    den = sum(np.where(a, w, 0.0) for a, w in zip(agree, ws))
    ref = np.where(den != 0, num / np.where(den != 0, den, 1.0), 0.0)
    assert np.array_equal(out, ref)
    assert np.all(out[:10] == 0.0)


def _tensor(kind: str, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    x = x * torch.tensor([1.0, 2.0**-20, 2.0**-140, 1e30])[torch.randint(0, 4, (n,), generator=g)]
    x[torch.randint(0, n, (n // 10,), generator=g)] = 0.0  # ties at zero, and -0.0
    x[torch.randint(0, n, (n // 20,), generator=g)] *= -0.0
    dup = torch.randint(0, n, (n // 5,), generator=g)
    x[dup] = x[torch.randint(0, n, (n // 5,), generator=g)]
    if n > 3:
        x[0], x[1] = math.inf, -math.inf
    return x.to({"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}[kind])


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(["F16", "BF16", "F32", "F64"]), n=st.integers(1, 20000), seed=st.integers(0, 2**31),
       frac=st.floats(0, 1), pieces=st.integers(1, 4))
def test_kth_smallest_magnitude_equals_torch_kthvalue(kind, n, seed, frac, pieces):
    x = _tensor(kind, n, seed)
    k = 1 + int(frac * (n - 1))
    bits = _bits(x)
    cuts = np.linspace(0, n, pieces + 1).astype(int)
    chunks = [bits[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    width = x.element_size() * 8
    got = select.kth_smallest_magnitude_bits(chunks, width, k)
    view = {16: torch.int16, 32: torch.int32, 64: torch.int64}[width]
    value = torch.tensor([got - (1 << width) if got >= 1 << (width - 1) else got], dtype=view).view(x.dtype)
    want = torch.kthvalue(x.abs().to(torch.float64), k).values
    assert value.to(torch.float64).item() == want.item()


def test_kth_beyond_the_count_is_an_error():
    with pytest.raises(ValueError):
        select.kth_smallest_magnitude_bits([np.zeros(5, np.int16)], 16, 6)


@pytest.mark.parametrize("seed, model, key", [(0, 0, 0), (1, 2**64 - 1, 12345), (2**63, 7, hashing.key_hash("a.w"))])
def test_hash_kernel_and_torch_twin_agree_bit_for_bit(seed, model, key):
    k = hashing.stream_key(seed, model, key)
    for start in (0, 1, 2**40 + 3):
        a = hashing.uniform_numpy(k, start, 100_000)
        b = hashing.uniform_torch(k, start, 100_000).numpy()
        assert np.array_equal(a.view(np.int64), b.view(np.int64))
    # chunk-independent: element i is the same number whatever range it is computed in
    whole = hashing.uniform_numpy(k, 0, 5000)
    assert np.array_equal(whole[1234:2000], hashing.uniform_numpy(k, 1234, 766))


def test_hash_is_uniform_and_streams_differ():
    u = hashing.uniform_numpy(hashing.stream_key(42, 1, hashing.key_hash("k")), 0, 1_000_000)
    assert u.min() >= 0.0 and u.max() < 1.0
    counts = np.histogram(u, bins=100, range=(0, 1))[0]
    chi2 = ((counts - 10_000) ** 2 / 10_000).sum()
    assert chi2 < 200  # 99 degrees of freedom: p < 1e-8 above this
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.01
    other = hashing.uniform_numpy(hashing.stream_key(42, 2, hashing.key_hash("k")), 0, 1_000_000)
    assert abs(np.corrcoef(u, other)[0, 1]) < 0.01 and not np.array_equal(u[:100], other[:100])
    assert hashing.stream_key(1, 2, 3) != hashing.stream_key(1, 3, 2)


@numba.njit(cache=False)
def _gram_by_definition(lanes, xs, start):
    """Each pair's lane ``(start + i) % LANES`` takes element i by a fused multiply-add, in
    element order: the kernel's definition, one pair and one element at a time."""
    for a in range(xs.shape[0]):
        for b in range(a, xs.shape[0]):
            for i in range(xs.shape[1]):
                lane = (start + i) % gram.LANES
                lanes[a, b, lane] = fma(xs[a, i], xs[b, i], lanes[a, b, lane])


@pytest.mark.parametrize("n_src", [1, 2, 5, 8, 9, 13, 17])
def test_gram_has_the_bits_of_its_definition_whatever_the_blocking(n_src):
    """The 4 x 4 blocks, the one-source strips (N = 4k + 1) and the edges add the same
    products in the same order as the definition."""
    rng = np.random.default_rng(n_src)
    xs = rng.standard_normal((n_src, 3_333))
    fast, slow = np.zeros((n_src, n_src, gram.LANES)), np.zeros((n_src, n_src, gram.LANES))
    for a, b in ((0, 5), (5, 2_100), (2_100, 3_333)):
        gram.gram_add(fast, xs[:, a:b], a)
        _gram_by_definition(slow, np.ascontiguousarray(xs[:, a:b]), a)
    upper = np.triu(np.ones((n_src, n_src), bool))
    assert np.array_equal(fast[upper].view(np.int64), slow[upper].view(np.int64))


@pytest.mark.parametrize("n_src", [1, 4, 9, 17])
@pytest.mark.parametrize("parts", [2, 3, 5])
def test_gram_parts_together_give_the_whole_bits(n_src, parts):
    """The compare pass's threads each add the pairs of their part: every pair is added by one
    part only, in the same order as the whole kernel, so the lanes have the same bits."""
    rng = np.random.default_rng(n_src * 10 + parts)
    xs = rng.standard_normal((n_src, 4_101))
    whole = np.zeros((n_src, n_src, gram.LANES))
    split = np.zeros_like(whole)
    for a, b in ((0, 1_003), (1_003, 4_101)):
        gram.gram_add(whole, xs[:, a:b], a)
        for part in range(parts):
            gram.gram_add_part(split, xs[:, a:b], a, part, parts)
    assert np.array_equal(whole.view(np.int64), split.view(np.int64))
    if n_src > gram.BLOCK:  # more than one block of pairs: part 0 alone leaves some to the others
        alone = np.zeros_like(whole)
        gram.gram_add_part(alone, xs, 0, 0, parts)
        touched = np.triu(np.any(alone != 0, axis=2)).sum()
        assert 0 < touched < n_src * (n_src + 1) // 2


def test_gram_is_exact_to_rounding_and_independent_of_chunks():
    rng = np.random.default_rng(9)
    xs = rng.standard_normal((5, 10_007)).astype(np.float16).astype(np.float64)

    def run(cuts):
        lanes = np.zeros((5, 5, gram.LANES))
        for a, b in zip(cuts[:-1], cuts[1:]):
            gram.gram_add(lanes, np.ascontiguousarray(xs[:, a:b]), a)
        return gram.gram_finish(lanes)

    one = run([0, 10_007])
    for cuts in ([0, 3, 10, 4099, 10_007], [0, 1, 2, 5000, 5001, 10_007], list(range(0, 10_007, 999)) + [10_007]):
        assert np.array_equal(run(cuts).view(np.int64), one.view(np.int64))
    assert np.array_equal(one, one.T)
    for a in range(5):
        for b in range(5):
            exact = sum(Fraction(p) * Fraction(q) for p, q in zip(xs[a], xs[b]))
            assert abs(Fraction(one[a, b]) - exact) <= Fraction(10_007 * 2.0**-50) * sum(abs(xs[a] * xs[b]))
