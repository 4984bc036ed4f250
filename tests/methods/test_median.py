"""The geometric median (``combine = "median"``; presets geometric_median, tgmd, dgmla) against a
plain fp64 Weiszfeld written here over stacked points, from the issue's definitions: without a
base (the models themselves), with a base and the TIES vote and drops (the filtered deltas,
zeros where an entry was dropped, trimmed or voted out), weights as Weiszfeld weights; all-equal
points; the re-read mode (a tiny memory budget) giving the in-memory mode's bytes; buffer sizes
and the CUDA backend; NaN under the policy; the checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cuda_double import backend_factory
from merge_support import drop_uniform, load, method_table, recipe_text, round_exact, sdxl_output

from engine.library.report import Severity
from engine.merge import run as merge_run
from engine.merge.run import MergeError, execute
from engine.merge.tuning import Tuning
from engine.plan.model import METHOD
from engine.plan.planner import build_plan, check_recipe
from engine.recipe.toml_file import parse_recipe
from engine.synth.checkpoints import SynthSpec, write_checkpoint

POS = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"
SMALL = Tuning(buffer_bytes=256 << 10, sub_elems=4096, read_buffers=3, out_buffers=2)
LARGE = Tuning(buffer_bytes=8 << 20, sub_elems=1 << 20, read_buffers=2, out_buffers=2)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A base ``o``, fine-tunes a, b, c, d, and ``n`` holding NaN in its VAE."""
    folder = tmp_path_factory.mktemp("median-models")
    for i, mid in enumerate("oabcd"):
        write_checkpoint(folder / f"{mid}.safetensors", SynthSpec(seed=51 + i, scale=96))
    write_checkpoint(folder / "n.safetensors", SynthSpec(seed=61, scale=96, nan_in=("vae",)))
    for copy in "ef":  # byte copies of b: all-equal points
        (folder / f"{copy}.safetensors").write_bytes((folder / "b.safetensors").read_bytes())
    return folder


def _recipe(models: Path, tmp_path: Path, method: dict, select=("a", "b", "c", "d"), weights=None, name="out",
            memory: str | None = None, **settings):
    ids = {m: str(models / f"{m}.safetensors") for m in "oabcdnef"}
    text = recipe_text(ids, {"all": list(select)}, [sdxl_output(str(tmp_path / f"{name}.safetensors"), "all")],
                       weights, **settings)
    if memory is not None:
        text = f'memory = "{memory}"\n' + text
    text += method_table("all", method)
    return parse_recipe(text, tmp_path)


def _merge(recipe, tuning=SMALL) -> Path:
    plan = build_plan(recipe)
    assert any(n.kind == METHOD for n in plan.nodes)
    execute(plan, tuning=tuning)
    return plan.outputs[0].path


# --------------------------------------------------------------------------- the reference


def weiszfeld(points: torch.Tensor, w: torch.Tensor, eps=1e-6, maxiter=100, ftol=1e-20) -> torch.Tensor:
    """Plain Weiszfeld over stacked fp64 points [N, n]: start at the weighted mean; w' = w /
    max(d, eps); stop when |obj_prev - obj| <= ftol * obj, obj the mean of w_i d_i."""
    def mean(c):
        return (c.view(-1, 1) * points).sum(0) / c.sum()

    m = mean(w)
    d = (points - m).norm(dim=1)
    obj = float((w * d).mean())
    for _ in range(maxiter):
        prev = obj
        m = mean(w / d.clamp(min=eps))
        d = (points - m).norm(dim=1)
        obj = float((w * d).mean())
        if abs(prev - obj) <= ftol * obj:
            break
    return m


def filtered_points(base, xs, ws, p: dict, key: str, paths) -> torch.Tensor:
    """The issue's points: deltas, DELLA's or DARE's drop, trim, then zeros where the sign
    disagrees with the vote (weighted deltas elect it), unweighted."""
    n = base.numel()
    drop, eps, trim = p.get("drop", 0.0), p.get("drop_eps", 0.0), p.get("trim", 1.0)
    rows = []
    for x, path in zip(xs, paths):
        tau = x.to(torch.float64).reshape(-1) - base
        if eps != 0:
            ranks = torch.empty(n, dtype=torch.float64)
            ranks[torch.sort(tau.abs(), stable=True).indices] = torch.arange(1, n + 1, dtype=torch.float64)
            keep = (1.0 - drop + eps * (ranks / n - (n + 1) / (2 * n))).clamp(0.0, 1.0)
            tau = torch.where(drop_uniform(p.get("seed", 0), path, key, n) >= 1.0 - keep, tau, 0.0)
        elif drop > 0:
            tau = torch.where(drop_uniform(p.get("seed", 0), path, key, n) >= drop, tau, 0.0)
        if trim < 1:
            threshold = torch.kthvalue(tau.abs(), max(int((1 - trim) * n), 1)).values
            tau = torch.where(tau.abs() >= threshold, tau, 0.0)
        rows.append(tau)
    pts = torch.stack(rows)
    vote = p.get("vote", "none")
    if vote != "none":
        wt = torch.tensor(ws, dtype=torch.float64).view(-1, 1)
        elect = (pts * wt).sum(0) if vote == "sum" else (torch.sign(pts) * wt).sum(0)
        sign = torch.sign(elect)
        pts = torch.where((torch.sign(pts) == sign) & (sign != 0), pts, 0.0)
    return pts


def _check(models: Path, out_path: Path, p: dict, select, ws, with_base: bool) -> None:
    """Every merged key within 1 ulp of the reference, at most 0.1% of the elements off."""
    out = load(out_path)
    base = load(models / "o.safetensors")
    srcs = [load(models / f"{m}.safetensors") for m in select]
    paths = [models / f"{m}.safetensors" for m in select]
    w = torch.tensor(ws, dtype=torch.float64)
    differ = total = 0
    for key, got in out.items():
        if key == POS or not got.is_floating_point():
            continue
        b = base[key].to(torch.float64).reshape(-1) if with_base else torch.zeros(got.numel(), dtype=torch.float64)
        pts = filtered_points(b, [s[key] for s in srcs], ws, p, key, paths)
        m = weiszfeld(pts, w, p.get("eps", 1e-6), p.get("maxiter", 100), p.get("ftol", 1e-20))
        if p.get("rescale", True) and p.get("drop", 0.0) > 0:
            m = m / (1.0 - p["drop"])
        alpha = p.get("alpha", 1.0)
        if alpha != 1.0:
            m = m * alpha
        want = round_exact((m + b).reshape(got.shape), got.dtype)
        bits = got.reshape(-1).view(torch.int16).to(torch.int32) - want.reshape(-1).view(torch.int16).to(torch.int32)
        assert int(bits.abs().max()) <= 1, f"{key}: more than 1 ulp from the reference"
        differ += int((bits != 0).sum())
        total += got.numel()
    assert differ <= total // 1000, f"{differ} of {total} elements differ by 1 ulp"


# --------------------------------------------------------------------------- the methods


@pytest.fixture(params=["gram", "sweeps"])
def route(request, monkeypatch):
    """Both ways the engine iterates: on the points' Gram matrix (up to GRAM_MAX points, the
    default for these few models) and in sweeps over the points (forced)."""
    from engine.methods import median

    if request.param == "sweeps":
        monkeypatch.setattr(median, "GRAM_MAX", 0)
    return request.param


@pytest.fixture
def sweeps(monkeypatch):
    """The sweeps route, whose memory modes these tests are about."""
    from engine.methods import median

    monkeypatch.setattr(median, "GRAM_MAX", 0)


def test_geometric_median_of_the_models_themselves(models, tmp_path, route):
    path = _merge(_recipe(models, tmp_path, {"method": "geometric_median"}))
    _check(models, path, {}, "abcd", [1.0] * 4, with_base=False)


def test_geometric_median_with_weights_and_a_base(models, tmp_path, route):
    p = {"method": "geometric_median", "base": "o", "alpha": 0.75, "maxiter": 40}
    ws = [1.0, 3.0, 0.5, 2.0]
    path = _merge(_recipe(models, tmp_path, p, weights=dict(zip("abcd", ws))))
    _check(models, path, {"alpha": 0.75, "maxiter": 40}, "abcd", ws, with_base=True)


def test_tgmd(models, tmp_path, route):
    path = _merge(_recipe(models, tmp_path, {"method": "tgmd", "base": "o"}))
    _check(models, path, {"vote": "sum", "drop": 0.1, "rescale": False}, "abcd", [1.0] * 4, with_base=True)


def test_dgmla_with_weights_and_trim(models, tmp_path, route):
    p = {"method": "dgmla", "base": "o", "trim": 0.7, "seed": 5}
    ws = [2.0, 1.0, 1.0, 0.5]
    path = _merge(_recipe(models, tmp_path, p, weights=dict(zip("abcd", ws))))
    ref = {"vote": "sum", "drop": 0.1, "drop_eps": -0.1, "rescale": False, "trim": 0.7, "seed": 5}
    _check(models, path, ref, "abcd", ws, with_base=True)


def test_all_equal_points_give_the_point(models, tmp_path, route):
    """Distances 0: the eps clamp keeps the weights finite and the median is the model."""
    path = _merge(_recipe(models, tmp_path, {"method": "geometric_median"}, select=("b", "e", "f")))
    got, b = load(path), load(models / "b.safetensors")
    for key, t in got.items():
        if key != POS:
            assert torch.equal(t, b[key].to(t.dtype)), key


def test_points_are_held_in_the_narrowest_exact_type(models, tmp_path, route, monkeypatch, tiny_budget):
    """fp16 models without a base are held as their fp16 bits, a tgmd's deltas in fp32 (the
    Gram route's last pass and the sweeps' steps read the held points); each as exact as fp64,
    so the reference check holds and the re-read mode gives the same bytes."""
    from engine.kernels import warm, weiszfeld

    warm.start().join()  # (its calls of every signature are not the merge's)
    seen = []
    for name in ("step", "iterate_only"):
        real = getattr(weiszfeld, name)
        monkeypatch.setattr(weiszfeld, name,
                            lambda points, *a, real=real: (seen.append(points.dtype), real(points, *a))[1])
    plain = _merge(_recipe(models, tmp_path, {"method": "geometric_median"}, name="plain"))
    assert set(seen) == {np.dtype(np.uint16)}
    _check(models, plain, {}, "abcd", [1.0] * 4, with_base=False)
    seen.clear()
    _merge(_recipe(models, tmp_path, {"method": "tgmd", "base": "o"}, name="deltas"))
    assert set(seen) == {np.dtype(np.float32)}
    seen.clear()
    reread = _merge(_recipe(models, tmp_path, {"method": "geometric_median"}, name="reread", memory="1MB"))
    assert np.dtype(np.float64) in seen  # the re-read mode's blocks of the points (the large keys)
    assert _tensors(reread) == _tensors(plain)


# --------------------------------------------------------------------------- memory, bytes, NaN


@pytest.fixture
def tiny_budget(monkeypatch):
    """A recipe's ``memory = "1MB"`` read as 64 KB: the synthetic keys are small, and the
    re-read mode must be taken by most of them."""
    from engine.recipe import sizes

    real = sizes.memory_budget
    monkeypatch.setattr(sizes, "memory_budget", lambda text: 64 << 10 if text == "1MB" else real(text))


def test_re_read_mode_buffer_sizes_and_cuda_give_the_same_bytes(models, tmp_path, monkeypatch, tiny_budget, sweeps):
    p = {"method": "tgmd", "base": "o", "maxiter": 30}
    _merge(_recipe(models, tmp_path, p, name="held"), LARGE)
    plan = build_plan(_recipe(models, tmp_path, p, name="reread", memory="1MB"))
    execute(plan, tuning=SMALL)
    assert _tensors(plan.outputs[0].path) == _tensors(tmp_path / "held.safetensors")
    monkeypatch.setattr(merge_run, "open_backend", backend_factory())
    cuda = _merge(_recipe(models, tmp_path, p, name="cuda"), SMALL)
    assert _tensors(cuda) == _tensors(tmp_path / "held.safetensors")


def test_re_read_mode_is_taken_under_a_small_budget(models, tmp_path, tiny_budget, sweeps):
    from engine.methods.median import geometric_median

    seen = []
    real = geometric_median

    def spy(*args, **kw):
        found = real(*args, **kw)
        seen.append(found.in_memory)
        return found

    import engine.methods.median as median_module

    median_module.geometric_median = spy
    try:
        _merge(_recipe(models, tmp_path, {"method": "geometric_median"}, memory="1MB", name="small"))
        _merge(_recipe(models, tmp_path, {"method": "geometric_median"}, memory="8GB", name="big"))
    finally:
        median_module.geometric_median = real
    half = len(seen) // 2  # one call per method key in each run
    assert False in seen[:half] and True in seen[:half]  # 1MB: the small keys held, the large ones re-read
    assert all(seen[half:])
    assert _tensors(tmp_path / "small.safetensors") == _tensors(tmp_path / "big.safetensors")


def test_the_gram_route_gives_the_same_bytes_on_any_buffer_budget_and_cuda(models, tmp_path, monkeypatch,
                                                                          tiny_budget):
    """Spans are fixed and each span's Gram matrix has its own lanes: neither the merge's
    buffers, nor holding the points or reading them again, nor the backend change a bit (the
    median is computed on the CPU for both)."""
    p = {"method": "tgmd", "base": "o", "maxiter": 30}
    large = _merge(_recipe(models, tmp_path, p, name="large"), LARGE)
    small = _merge(_recipe(models, tmp_path, p, name="small"), SMALL)
    assert _tensors(small) == _tensors(large)
    reread = _merge(_recipe(models, tmp_path, p, name="reread", memory="1MB"), SMALL)
    assert _tensors(reread) == _tensors(large)
    monkeypatch.setattr(merge_run, "open_backend", backend_factory())
    assert _tensors(_merge(_recipe(models, tmp_path, p, name="cuda"), SMALL)) == _tensors(large)


def test_the_gram_distances_are_the_direct_ones():
    """||p_i - sum a_j p_j|| from the centred points' Gram matrix against the direct fp64 norm,
    on points far from the origin and close together (the case centring is for), with a point
    on the iterate (distance 0) and a NaN."""
    import numpy as np

    from engine.kernels.gram import LANES, gram_add, gram_finish
    from engine.kernels.median_gram import center, distances

    rng = np.random.default_rng(7)
    base = rng.normal(size=5000) * 50.0
    pts = base + rng.normal(size=(6, 5000)) * 1e-3
    pts[5] = pts[4]
    a = np.array([0.0, 0.0, 0.0, 0.0, 0.5, 0.5])
    for coef in (np.full(6, 1 / 6), rng.random(6), a):
        coef = coef / coef.sum()
        want = np.linalg.norm(pts - coef @ pts, axis=1)
        c = pts.copy()
        center(c)
        lanes = np.zeros((6, 6, LANES))
        gram_add(lanes, c, 0)
        got = np.empty(6)
        distances(gram_finish(lanes), coef, got)
        assert np.allclose(got, want, rtol=1e-9, atol=1e-9 * want.max())
    got = np.empty(6)
    distances(np.full((6, 6), np.nan), np.full(6, 1 / 6), got)
    assert np.isnan(got).all()


def _tensors(path: Path) -> dict:
    return {k: v.view(torch.int16).tolist() if v.dtype == torch.float16 else v.tolist() for k, v in load(path).items()}


def test_a_point_with_nan_follows_the_policy(models, tmp_path, route):
    with pytest.raises(MergeError, match="model n"):
        execute(build_plan(_recipe(models, tmp_path, {"method": "tgmd", "base": "o"}, select=("a", "n", "b"))))
    execute(build_plan(_recipe(models, tmp_path, {"method": "tgmd", "base": "o"}, select=("a", "n", "b"),
                               name="skipped", skip_nan=True)))
    execute(build_plan(_recipe(models, tmp_path, {"method": "tgmd", "base": "o"}, select=("a", "b"),
                               name="without")))
    got, want, bad = (load(tmp_path / "skipped.safetensors"), load(tmp_path / "without.safetensors"),
                      load(models / "n.safetensors"))
    nan_keys = [k for k, v in bad.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    assert nan_keys and all(torch.equal(got[k], want[k]) for k in nan_keys)


def test_a_point_with_nan_in_the_re_read_mode_follows_the_policy(models, tmp_path, tiny_budget, sweeps):
    """In the re-read mode the values are first seen by the first sweep: a NaN is found there."""
    with pytest.raises(MergeError, match="model n"):
        execute(build_plan(_recipe(models, tmp_path, {"method": "tgmd", "base": "o"}, select=("a", "n", "b"),
                                   memory="1MB")))
    execute(build_plan(_recipe(models, tmp_path, {"method": "tgmd", "base": "o"}, select=("a", "n", "b"),
                               name="skipped", memory="1MB", skip_nan=True)))
    execute(build_plan(_recipe(models, tmp_path, {"method": "tgmd", "base": "o"}, select=("a", "b"),
                               name="without", memory="1MB")))
    got, want = load(tmp_path / "skipped.safetensors"), load(tmp_path / "without.safetensors")
    bad = load(models / "n.safetensors")
    nan_keys = [k for k, v in bad.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    assert nan_keys and all(torch.equal(got[k], want[k]) for k in nan_keys)


def test_a_base_with_nan_stops_the_merge_naming_the_base(models, tmp_path):
    """The median's statistics count the base's NaN/Inf values too: a base cannot be left out."""
    with pytest.raises(MergeError, match="of the base n"):
        execute(build_plan(_recipe(models, tmp_path, {"method": "tgmd", "base": "n"}, select=("a", "b"),
                                   skip_nan=True)))
    assert not (tmp_path / "out.safetensors").exists()


def test_checks_of_the_median_fields(models, tmp_path):
    def errors(method):
        text = recipe_text({m: str(models / f"{m}.safetensors") for m in "oab"}, {"all": ["a", "b"]},
                           [sdxl_output(str(tmp_path / "x.safetensors"), "all")])
        text += method_table("all", method)
        return [p.message for p in check_recipe(parse_recipe(text, tmp_path)) if p.severity >= Severity.ERROR]

    assert errors({"method": "geometric_median"}) == []
    assert any("methods.all.base: required" in e for e in errors({"method": "tgmd"}))
    found = errors({"method": "geometric_median", "eps": 0.0, "maxiter": 0, "ftol": -1.0})
    for part in ("methods.all.eps = 0.0", "methods.all.maxiter = 0", "methods.all.ftol = -1.0"):
        assert any(part in e for e in found), (part, found)
    assert any("only used by combine = 'median'" in e for e in errors({"method": "ties", "base": "o", "maxiter": 3}))
    with pytest.raises(Exception, match="memory"):
        _recipe(models, tmp_path, {"method": "geometric_median"}, memory="lots")
