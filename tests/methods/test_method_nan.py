"""A merge method under the NaN policy: with ``skip_nan`` a model holding NaN/Inf is left out
of the keys where it does (the method over the others, as for the mean); NaN in the base
stops the merge, naming the base."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from merge_support import load, recipe_text, sdxl_output

from engine.merge.run import MergeError, execute
from engine.plan.planner import build_plan
from engine.recipe.toml_file import parse_recipe
from engine.synth.checkpoints import SynthSpec, write_checkpoint

METHOD = '[methods.all]\nmethod = "ties_soup"\nbase = "{base}"\n'


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("nan-models")
    for i, mid in enumerate("oab"):
        write_checkpoint(folder / f"{mid}.safetensors", SynthSpec(seed=31 + i, scale=64))
    write_checkpoint(folder / "n.safetensors", SynthSpec(seed=41, scale=64, nan_in=("vae",)))
    return folder


def _recipe(models, tmp_path, select, base="o", name="out", **settings):
    ids = {m: str(models / f"{m}.safetensors") for m in "oabn"}
    text = recipe_text(ids, {"all": select}, [sdxl_output(str(tmp_path / f"{name}.safetensors"), "all")], **settings)
    return parse_recipe(text + METHOD.format(base=base), tmp_path)


def test_skip_nan_leaves_the_model_out_of_those_keys(models, tmp_path):
    execute(build_plan(_recipe(models, tmp_path, ["a", "n", "b"], name="with", skip_nan=True)))
    execute(build_plan(_recipe(models, tmp_path, ["a", "b"], name="without")))
    got, want = load(tmp_path / "with.safetensors"), load(tmp_path / "without.safetensors")
    bad = load(models / "n.safetensors")
    nan_keys = [k for k, v in bad.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    assert nan_keys
    for k in nan_keys:
        assert torch.equal(got[k], want[k]), k
    clean = [k for k in got if k.startswith("model.diffusion_model.")]
    assert any(not torch.equal(got[k], want[k]) for k in clean)  # n counts where it is finite


def test_nan_without_skip_stops_and_nan_in_the_base_always_does(models, tmp_path):
    with pytest.raises(MergeError, match="model n"):
        execute(build_plan(_recipe(models, tmp_path, ["a", "n"])))
    with pytest.raises(MergeError, match="base n"):
        execute(build_plan(_recipe(models, tmp_path, ["a", "b"], base="n", skip_nan=True)))
