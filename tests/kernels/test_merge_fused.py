"""A merge through the fused CPU kernels writes the same tensor bytes as through the torch
kernel (``ASTOLFO_CPU_KERNELS=torch``), on the test recipes: uniform and weighted means, every
source and output dtype, several outputs from one pass, NaN left out with skip_nan, and
small buffers that cut tensors into many chunks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from merge_support import SCALE, load, make_models, method_table, recipe_text, sdxl_output

from engine.merge.backends import cpu_fused
from engine.merge.run import MergeError, execute
from engine.merge.tuning import Tuning
from engine.plan.planner import build_plan
from engine.recipe.toml_file import parse_recipe
from engine.synth.checkpoints import SynthSpec, write_checkpoint

# small buffers, and stretches that cut a segment into many (the fused path reads its own sources)
SMALL = Tuning(buffer_bytes=256 << 10, sub_elems=4096, read_buffers=3, out_buffers=2, stretch_bytes=20 << 10)


def _both(tmp_path: Path, monkeypatch, text: str, tuning=SMALL):
    """The recipe merged twice, fused then torch; the outputs' tensors of each run. Both plans
    are built first: a merge records what it learnt of the sources (NaN counts) for later plans."""
    plans = {}
    for mode in ("fused", "torch"):
        folder = tmp_path / mode
        folder.mkdir()
        plans[mode] = (folder, build_plan(parse_recipe(text.replace("@OUT@", str(folder)), folder)))
    runs = []
    for mode, (folder, plan) in plans.items():
        monkeypatch.setenv(cpu_fused.ENV, mode)
        assert cpu_fused.wanted() == (mode == "fused")
        result = execute(plan, tuning=tuning)
        runs.append({Path(o.path).name: load(Path(o.path)) for o in result.outputs})
        runs[-1]["warnings"] = [w.replace(str(folder), "@OUT@") for w in result.warnings]
    return runs


def _assert_same(fused: dict, plain: dict) -> None:
    assert fused.keys() == plain.keys()
    assert fused.pop("warnings") == plain.pop("warnings")
    for name in fused:
        assert fused[name].keys() == plain[name].keys()
        for key, t in fused[name].items():
            other = plain[name][key]
            assert t.dtype == other.dtype and t.shape == other.shape, (name, key)
            assert t.reshape(-1).view(torch.uint8).equal(other.reshape(-1).view(torch.uint8)), (name, key)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("fused-models")
    paths = make_models(folder / "f16", 2) + make_models(folder / "bf16", 1, dtype="BF16")
    paths += make_models(folder / "f32", 1, dtype="F32")
    return {mid: str(p) for mid, p in zip("abcd", paths)}


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_weighted_mixed_dtype_merge_bytes_equal_the_torch_path(tmp_path, monkeypatch, mixed, dtype):
    text = recipe_text(mixed, {"all": list(mixed), "two": ["a", "c"]},
                       [sdxl_output("@OUT@/all.safetensors", "all", dtype=dtype),
                        sdxl_output("@OUT@/two.safetensors", "two", te1="all", dtype="bf16"),
                        sdxl_output("@OUT@/one.safetensors", "two", unet="all", vae="two", te0="all", te1="two")],
                       {"a": 0.3, "b": 1.7, "c": 5.0, "d": 0.123})
    _assert_same(*_both(tmp_path, monkeypatch, text))


def test_uniform_merge_with_default_buffers_bytes_equal(tmp_path, monkeypatch, mixed):
    text = recipe_text(mixed, {"all": list(mixed)}, [sdxl_output("@OUT@/all.safetensors", "all")])
    _assert_same(*_both(tmp_path, monkeypatch, text, tuning=Tuning()))


def test_skip_nan_leaves_the_same_sources_out(tmp_path, monkeypatch):
    folder = tmp_path / "models"
    paths = make_models(folder, 3)
    paths[1] = make_models(folder / "nan", 1, nan_in=("unet",))[0]
    models = {mid: str(p) for mid, p in zip("abc", paths)}
    text = recipe_text(models, {"all": list(models)}, [sdxl_output("@OUT@/out.safetensors", "all")], skip_nan=True)
    fused, plain = _both(tmp_path, monkeypatch, text)
    assert any("skip_nan" in w for w in fused["warnings"])
    _assert_same(fused, plain)


def _assert_same_error(tmp_path: Path, monkeypatch, text: str, model_id: str) -> None:
    """The recipe stops with the same MergeError, naming ``model_id``, fused and torch."""
    plans = [build_plan(parse_recipe(text, tmp_path)) for _ in range(2)]
    errors = []
    for mode, plan in zip(("fused", "torch"), plans):
        monkeypatch.setenv(cpu_fused.ENV, mode)
        with pytest.raises(MergeError) as e:
            execute(plan, tuning=SMALL)
        errors.append((str(e.value), e.value.model_id, e.value.key))
    assert errors[0] == errors[1] and errors[0][1] == model_id


def test_nan_stops_the_merge_with_the_same_error(tmp_path, monkeypatch):
    paths = make_models(tmp_path / "models", 2) + make_models(tmp_path / "nan", 1, nan_in=("te1",))
    models = {mid: str(p) for mid, p in zip("abc", paths)}
    text = recipe_text(models, {"all": ["a", "c", "b"]}, [sdxl_output(str(tmp_path / "out.safetensors"), "all")])
    _assert_same_error(tmp_path, monkeypatch, text, "c")


# --------------------------------------------------------------------------- merge methods

METHODS = [
    {"method": "add_difference", "base": "o", "alpha": 0.7},
    {"method": "ties", "base": "o"},
    {"method": "ties_soup", "base": "o", "alpha": 1.25},
    {"method": "dare", "base": "o", "drop": 0.3, "seed": 7},
    {"method": "dare", "base": "o", "drop": 0.25, "rescale": False, "combine": "sum"},
    {"method": "ties_soup", "base": "o", "drop": 0.1, "trim": 0.5},
    {"method": "della", "base": "o", "drop": 0.2, "drop_eps": -0.1},
    {"method": "model_stock", "base": "o"},
    {"method": "geometric_median"},
    {"method": "tgmd", "base": "o", "maxiter": 5},
]


@pytest.fixture(scope="module")
def method_models(tmp_path_factory) -> dict[str, str]:
    """A base ``o`` and models of three source dtypes (the base fp16)."""
    folder = tmp_path_factory.mktemp("fused-method-models")
    models = {}
    for i, (mid, dtype) in enumerate(zip("oabcd", ["F16", "F16", "F16", "BF16", "F32"])):
        models[mid] = str(write_checkpoint(folder / f"{mid}.safetensors", SynthSpec(seed=40 + i, scale=SCALE,
                                                                                      dtype=dtype)))
    return models


@pytest.mark.parametrize("method", METHODS, ids=lambda m: "-".join(f"{k}={v}" for k, v in m.items() if k != "base"))
def test_method_merge_bytes_equal_the_torch_path(tmp_path, monkeypatch, method_models, method):
    """The fused element pass (``engine.kernels.methods``) writes the bytes of
    ``engine.methods.streamed.compute`` for every method, with weights, mixed source dtypes,
    16- and 32-bit outputs and slices cut small."""
    text = recipe_text(method_models, {"all": ["a", "b", "c", "d"], "two": ["b", "d"]},
                       [sdxl_output("@OUT@/all.safetensors", "all", dtype="bf16", vae="two"),
                        sdxl_output("@OUT@/f32.safetensors", "two", dtype="fp32")],
                       {"a": 0.5, "b": 1.5, "c": 1.0, "d": 3.0} if method.get("method") != "model_stock" else None)
    text += method_table("all", method) + method_table("two", method)
    fused_calls = []
    original = cpu_fused.FusedNodes.method

    def spy(self, *args, **kwargs):
        fused_calls.append(original(self, *args, **kwargs))
        return fused_calls[-1]

    monkeypatch.setattr(cpu_fused.FusedNodes, "method", spy)
    _assert_same(*_both(tmp_path, monkeypatch, text))
    assert fused_calls and all(r == -1 for r in fused_calls)  # every slice went through the kernel, all finite


def test_method_nan_stops_the_merge_with_the_same_error(tmp_path, monkeypatch):
    paths = make_models(tmp_path / "models", 3) + make_models(tmp_path / "nan", 1, nan_in=("unet",))
    models = {mid: str(p) for mid, p in zip("oabc", paths)}
    text = recipe_text(models, {"all": ["a", "c", "b"]}, [sdxl_output(str(tmp_path / "out.safetensors"), "all")])
    text += method_table("all", {"method": "ties", "base": "o"})
    _assert_same_error(tmp_path, monkeypatch, text, "c")
