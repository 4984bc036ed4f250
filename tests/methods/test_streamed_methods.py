"""The streamed merge methods against fp64 references written here from the methods issue's
definitions (not from the engine): add-difference, the TIES sum and count votes (trim 1), DARE
(one model and several), weights, a key the base lacks, position_ids, byte-identical reruns over
buffer sizes, model order and the CUDA backend (over its CPU test double), and the drop masks'
kept fraction."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from cuda_double import backend_factory
from merge_support import (
    drop_uniform,
    load,
    method_table,
    recipe_text,
    reference_mean,
    round_exact,
    sdxl_output,
)

from engine.merge import run as merge_run
from engine.merge.run import execute
from engine.merge.tuning import Tuning
from engine.plan.model import METHOD
from engine.plan.planner import build_plan
from engine.recipe.toml_file import parse_recipe
from engine.synth.checkpoints import SynthSpec, write_checkpoint

POS = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"
SMALL = Tuning(buffer_bytes=256 << 10, sub_elems=4096, read_buffers=3, out_buffers=2)
LARGE = Tuning(buffer_bytes=8 << 20, sub_elems=1 << 20, read_buffers=2, out_buffers=2)
PRUNED = "conditioner.embedders.0.transformer.text_model.encoder.layers.11."


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A base ``o`` (its te0 last layer pruned: keys the base lacks) and models a, b, c."""
    folder = tmp_path_factory.mktemp("method-models")
    write_checkpoint(folder / "o.safetensors", SynthSpec(seed=11, scale=64, deviations=("pruned_te0_last_layer",)))
    for i, mid in enumerate("abc"):
        write_checkpoint(folder / f"{mid}.safetensors", SynthSpec(seed=21 + i, scale=64))
    return folder


def _recipe(models: Path, tmp_path: Path, method: dict, select=("a", "b", "c"), weights=None, name="out"):
    ids = {m: str(models / f"{m}.safetensors") for m in "oabc"}
    text = recipe_text(ids, {"all": list(select)}, [sdxl_output(str(tmp_path / f"{name}.safetensors"), "all")],
                       weights)
    text += method_table("all", method)
    return parse_recipe(text, tmp_path)


def _merge(recipe, tuning=SMALL) -> Path:
    plan = build_plan(recipe)
    assert any(n.kind == METHOD for n in plan.nodes)
    execute(plan, tuning=tuning)
    return plan.outputs[0].path


# --------------------------------------------------------------------------- the reference


def reference(base: torch.Tensor, xs: list[torch.Tensor], ws: list[float], p: dict, key: str, paths: list[Path],
              dtype: torch.dtype) -> torch.Tensor:
    """The issue's definition, in fp64, element by element over whole tensors, rounded once."""
    b = base.to(torch.float64).reshape(-1)
    n = b.numel()
    drop, vote, combine = p.get("drop", 0.0), p.get("vote", "none"), p.get("combine", "mean")
    eps, trim = p.get("drop_eps", 0.0), p.get("trim", 1.0)
    deltas = []
    for x, w, path in zip(xs, ws, paths):
        tau = x.to(torch.float64).reshape(-1) - b
        if eps != 0:  # DELLA: rank 1 for the smallest |tau|, ties by element order
            ranks = torch.empty(n, dtype=torch.float64)
            ranks[torch.sort(tau.abs(), stable=True).indices] = torch.arange(1, n + 1, dtype=torch.float64)
            keep = (1.0 - drop + eps * (ranks / n - (n + 1) / (2 * n))).clamp(0.0, 1.0)
            tau = torch.where(drop_uniform(p.get("seed", 0), path, key, n) >= 1.0 - keep, tau, torch.zeros_like(tau))
        elif drop > 0:  # kept where u >= drop
            tau = torch.where(drop_uniform(p.get("seed", 0), path, key, n) >= drop, tau, torch.zeros_like(tau))
        if trim < 1:  # the k-th smallest |tau| of the dropped delta, kept at and above it
            threshold = torch.kthvalue(tau.abs(), max(int((1 - trim) * n), 1)).values
            tau = torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))
        deltas.append(tau * w)
    if combine == "stock":
        cosines = []
        for i in range(len(deltas)):
            for j in range(i + 1, len(deltas)):
                d = deltas[i].norm() * deltas[j].norm()
                cosines.append(float(deltas[i] @ deltas[j] / d) if d > 0 else 0.0)
        c = sum(cosines) / len(cosines)
        t = len(deltas) * c / (1 + (len(deltas) - 1) * c) if 1 + (len(deltas) - 1) * c > 0 else 0.0
        combined = torch.zeros(n, dtype=torch.float64)
        for d in deltas:
            combined = combined + d
        combined = combined / len(deltas) * min(1.0, max(0.0, t))
    elif vote == "none":
        combined = torch.zeros(n, dtype=torch.float64)
        for d in deltas:
            combined = combined + d
        if combine == "mean":
            combined = combined / sum(ws)
    else:
        elect = torch.zeros(n, dtype=torch.float64)
        for d, w in zip(deltas, ws):
            elect = elect + (d if vote == "sum" else torch.sign(d) * w)
        sign = torch.sign(elect)
        num = torch.zeros(n, dtype=torch.float64)
        den = torch.zeros(n, dtype=torch.float64)
        for d, w in zip(deltas, ws):
            agree = (torch.sign(d) == sign) & (sign != 0)
            num = num + torch.where(agree, d, 0.0)
            den = den + torch.where(agree, w, 0.0)
        combined = torch.where(den > 0, num / den, 0.0)
    if p.get("rescale", True) and drop > 0:
        combined = combined / (1.0 - drop)
    alpha = p.get("alpha", 1.0)
    if alpha != 1.0:
        combined = combined * alpha
    return round_exact((combined + b).reshape(base.shape), dtype)


def _check(models: Path, out_path: Path, p: dict, select, ws, exact: bool) -> None:
    """Every output key against the reference: the method where the base has the key, the
    selection's weighted mean where it does not, arange for position_ids. ``exact``: no element
    may differ; else at most 0.1% of the elements, by 1 ulp."""
    out = load(out_path)
    base = load(models / "o.safetensors")
    srcs = [load(models / f"{m}.safetensors") for m in select]
    paths = [models / f"{m}.safetensors" for m in select]
    assert torch.equal(out[POS], torch.arange(77.0).reshape(1, 77).to(out[POS].dtype))
    differ = total = lacked = 0
    for key, got in out.items():
        if key == POS:
            continue
        assert key in srcs[0], key
        if key in base:
            want = reference(base[key], [s[key] for s in srcs], ws, p, key, paths, got.dtype)
        else:
            lacked += 1
            assert key.startswith(PRUNED), key
            want = reference_mean([s[key] for s in srcs], ws, got.dtype)
        assert got.dtype == want.dtype and got.shape == want.shape, key
        bits = (got.reshape(-1).view(torch.int16).to(torch.int32) - want.reshape(-1).view(torch.int16).to(torch.int32))
        off = bits != 0
        if off.any():
            assert exact is False, f"{key}: {int(off.sum())} elements differ from the reference"
            assert int(bits.abs().max()) <= 1, f"{key}: more than 1 ulp from the reference"
        differ += int(off.sum())
        total += got.numel()
    assert lacked > 0  # the pruned layer was merged as the mean
    assert differ <= total // 1000, f"{differ} of {total} elements differ by 1 ulp"
    assert len(out) == len(srcs[0]) - 0, "no key dropped"


# --------------------------------------------------------------------------- the methods


def test_add_difference_with_dyadic_weights_is_exact(models, tmp_path):
    p = {"method": "add_difference", "base": "o"}
    path = _merge(_recipe(models, tmp_path, p, weights={"a": 2.0, "b": 0.5, "c": 3.0}))
    _check(models, path, {"combine": "sum"}, "abc", [2.0, 0.5, 3.0], exact=True)


def test_add_difference_with_alpha_and_decimal_weights(models, tmp_path):
    p = {"method": "add_difference", "base": "o", "alpha": 0.7}
    path = _merge(_recipe(models, tmp_path, p, weights={"a": 0.3, "b": 1.7, "c": 5.0}))
    _check(models, path, {"combine": "sum", "alpha": 0.7}, "abc", [0.3, 1.7, 5.0], exact=False)


def test_ties_soup_count_vote(models, tmp_path):
    path = _merge(_recipe(models, tmp_path, {"method": "ties_soup", "base": "o"}))
    _check(models, path, {"vote": "count"}, "abc", [1.0, 1.0, 1.0], exact=True)


def test_ties_soup_with_weights(models, tmp_path):
    path = _merge(_recipe(models, tmp_path, {"method": "ties_soup", "base": "o"}, weights={"a": 1.0, "b": 2.0,
                                                                                           "c": 3.0}))
    _check(models, path, {"vote": "count"}, "abc", [1.0, 2.0, 3.0], exact=True)


def test_sum_vote_without_trim(models, tmp_path):
    path = _merge(_recipe(models, tmp_path, {"method": "ties", "base": "o", "trim": 1.0}, weights={"b": 0.5}))
    _check(models, path, {"vote": "sum"}, "abc", [1.0, 0.5, 1.0], exact=True)


def test_dare_over_one_model_against_a_base(models, tmp_path):
    p = {"method": "dare", "base": "o", "drop": 0.25, "seed": 7}
    path = _merge(_recipe(models, tmp_path, p, select=("b",)))
    _check(models, path, p, "b", [1.0], exact=True)  # 1 / 0.75 is not dyadic, but x / 0.75 is one rounding


def test_dare_mean_of_three_with_alpha(models, tmp_path):
    p = {"method": "dare", "base": "o", "drop": 0.1, "seed": 114514, "alpha": 0.5}
    path = _merge(_recipe(models, tmp_path, p))
    _check(models, path, p, "abc", [1.0, 1.0, 1.0], exact=False)


def test_dare_with_a_vote(models, tmp_path):
    p = {"method": "dare", "base": "o", "drop": 0.3, "vote": "count", "rescale": False}
    path = _merge(_recipe(models, tmp_path, p))
    _check(models, path, p, "abc", [1.0, 1.0, 1.0], exact=True)


def test_ties_with_the_default_trim(models, tmp_path):
    path = _merge(_recipe(models, tmp_path, {"method": "ties", "base": "o"}))
    _check(models, path, {"vote": "sum", "trim": 0.2}, "abc", [1.0, 1.0, 1.0], exact=True)


def test_trim_with_the_count_vote_and_weights(models, tmp_path):
    p = {"method": "ties", "base": "o", "trim": 0.5, "vote": "count"}
    path = _merge(_recipe(models, tmp_path, p, weights={"a": 2.0, "b": 1.0, "c": 0.25}))
    _check(models, path, p, "abc", [2.0, 1.0, 0.25], exact=True)


def test_trim_keeps_everything_at_trim_one_and_on_tiny_tensors(models, tmp_path):
    """trim 0.999: k = max(int(0.001 n), 1) is 1 on every tensor under 2000 elements (all kept)."""
    p = {"method": "ties", "base": "o", "trim": 0.999}
    path = _merge(_recipe(models, tmp_path, p))
    _check(models, path, {"vote": "sum", "trim": 0.999}, "abc", [1.0, 1.0, 1.0], exact=True)


def test_dare_then_trim(models, tmp_path):
    p = {"method": "dare", "base": "o", "drop": 0.3, "trim": 0.4, "seed": 2, "rescale": False}
    path = _merge(_recipe(models, tmp_path, p))
    _check(models, path, p, "abc", [1.0, 1.0, 1.0], exact=True)


def test_della_with_the_sum_vote_and_trim(models, tmp_path):
    p = {"method": "della", "base": "o", "drop": 0.2, "drop_eps": 0.15, "vote": "sum", "trim": 0.6, "seed": 9}
    path = _merge(_recipe(models, tmp_path, p))
    _check(models, path, p, "abc", [1.0, 1.0, 1.0], exact=False)


def test_della_negative_eps_over_one_model(models, tmp_path):
    p = {"method": "della", "base": "o", "drop": 0.5, "drop_eps": -0.4, "seed": 1, "rescale": False}
    path = _merge(_recipe(models, tmp_path, p, select=("c",)))
    _check(models, path, p, "c", [1.0], exact=True)


def test_model_stock(models, tmp_path):
    path = _merge(_recipe(models, tmp_path, {"method": "model_stock", "base": "o"}))
    _check(models, path, {"combine": "stock"}, "abc", [1.0, 1.0, 1.0], exact=False)


def test_model_stock_factor_and_its_clamp():
    from engine.methods.tensor_stats import stock_factor

    same = [[4.0, 4.0], [4.0, 4.0]]  # two equal deltas: c = 1, t = 1
    assert stock_factor(torch.tensor(same, dtype=torch.float64).numpy()) == (1.0, None)
    orth = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    assert stock_factor(torch.tensor(orth, dtype=torch.float64).numpy()) == (0.0, None)
    opposed = [[1.0, -1.0], [-1.0, 1.0]]  # c = -1: 1 + (N-1) c = 0, t is 0 and reported
    t, raw = stock_factor(torch.tensor(opposed, dtype=torch.float64).numpy())
    assert t == 0.0 and raw is not None
    zero = [[0.0, 0.0], [0.0, 1.0]]  # a zero delta counts as cos 0
    assert stock_factor(torch.tensor(zero, dtype=torch.float64).numpy()) == (0.0, None)


# --------------------------------------------------------------------------- masks and bytes


@pytest.mark.parametrize("p", [
    {"method": "dare", "base": "o", "drop": 0.2, "vote": "sum", "seed": 3},
    {"method": "della", "base": "o", "drop": 0.2, "drop_eps": 0.1, "vote": "sum", "trim": 0.3, "seed": 3},
    {"method": "model_stock", "base": "o"},
], ids=["dare", "della-trim", "stock"])
def test_bytes_do_not_depend_on_buffer_size_model_order_or_backend(models, tmp_path, monkeypatch, p):
    first = _merge(_recipe(models, tmp_path, p, name="small"), SMALL).read_bytes()
    assert _merge(_recipe(models, tmp_path, p, name="small"), LARGE).read_bytes() == first  # the same file
    again = _merge(_recipe(models, tmp_path, p, select=("c", "a", "b"), name="order"), SMALL)
    assert _strip(load(again)) == _strip(load(tmp_path / "small.safetensors"))
    monkeypatch.setattr(merge_run, "open_backend", backend_factory())
    cuda = _merge(_recipe(models, tmp_path, p, name="cuda"), SMALL)
    assert _strip(load(cuda)) == _strip(load(tmp_path / "small.safetensors"))


def _strip(tensors: dict) -> dict:
    return {k: v.view(torch.int16).tolist() if v.dtype == torch.float16 else v.tolist() for k, v in tensors.items()}


@pytest.mark.parametrize("drop", [0.1, 0.5, 0.9])
def test_kept_fraction_within_binomial_bounds(models, tmp_path, drop):
    p = {"method": "dare", "base": "o", "drop": drop, "seed": 5, "rescale": False}
    out = load(_merge(_recipe(models, tmp_path, p, select=("a",)), LARGE))
    base, a = load(models / "o.safetensors"), load(models / "a.safetensors")
    kept = n = 0
    for key in out:
        if key == POS or key not in base:
            continue
        differs = a[key] != base[key]
        kept += int((out[key] != base[key])[differs].sum())  # kept deltas move the result off the base
        n += int(differs.sum())
    sigma = math.sqrt(n * drop * (1 - drop))
    assert abs(kept - n * (1 - drop)) < 6 * sigma + 0.001 * n, (kept, n)
