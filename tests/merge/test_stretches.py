"""The CPU backend reading its own sources from the page cache, a stretch at a time
(``engine.merge.backends.cpu_stretches``): the same tensor bytes as the reader threads' path with
the same fused kernels (which a read limit keeps), for every stretch size, for means and merge
methods; the same sources blamed for NaN; a source cut short mid-merge is an error naming it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from merge_support import SCALE, load, make_models, recipe_text, sdxl_output

from engine.merge import io
from engine.merge.run import MergeError, execute
from engine.merge.slice_reads import SliceReads
from engine.merge.tuning import Tuning
from engine.plan.planner import build_plan
from engine.recipe.toml_file import parse_recipe
from engine.synth.checkpoints import SynthSpec, write_checkpoint

UNLIMITED = 1e15  # bytes a second: a read limit that paces nothing, and keeps the reader threads' path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """A base ``o`` and models of three source dtypes."""
    folder = tmp_path_factory.mktemp("stretch-models")
    out = {}
    for i, (mid, dtype) in enumerate(zip("oabcd", ["F16", "F16", "F16", "BF16", "F32"])):
        out[mid] = str(write_checkpoint(folder / f"{mid}.safetensors", SynthSpec(seed=70 + i, scale=SCALE,
                                                                                   dtype=dtype)))
    return out


def _run(tmp_path: Path, text: str, tuning: Tuning, own: bool, monkeypatch) -> dict:
    """The recipe's outputs (tensors by name, and the warnings) through one of the two paths,
    checking which one read the sources."""
    folder = tmp_path / ("own" if own else "readers")
    folder.mkdir()
    plan = build_plan(parse_recipe(text.replace("@OUT@", str(folder)), folder))
    calls = {"stretches": 0, "readers": 0}
    real_read, real_item = SliceReads.read, io.Readers._read

    def stretch_read(self, *a):
        calls["stretches"] += 1
        return real_read(self, *a)

    def item_read(self, *a):
        calls["readers"] += 1
        return real_item(self, *a)

    monkeypatch.setattr(SliceReads, "read", stretch_read)
    monkeypatch.setattr(io.Readers, "_read", item_read)
    result = execute(plan, tuning=tuning, read_limit=None if own else UNLIMITED)
    monkeypatch.undo()
    assert (calls["stretches"] > 0, calls["readers"] > 0) == (own, not own), calls
    runs = {Path(o.path).name: load(Path(o.path)) for o in result.outputs}
    runs["warnings"] = [w.replace(str(folder), "@OUT@") for w in result.warnings]
    return runs


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert a.pop("warnings") == b.pop("warnings")
    for name in a:
        assert a[name].keys() == b[name].keys()
        for key, t in a[name].items():
            other = b[name][key]
            assert t.dtype == other.dtype and t.shape == other.shape, (name, key)
            assert t.reshape(-1).view(torch.uint8).equal(other.reshape(-1).view(torch.uint8)), (name, key)


RECIPES = {
    "weighted means, three outputs": ({}, {"all": list("abcd"), "two": ["a", "c"]}),
    "ties with drops": ({"method": "ties", "base": "o", "drop": 0.3, "seed": 3}, {"all": list("abcd")}),
    "della": ({"method": "della", "base": "o", "drop": 0.2, "drop_eps": -0.1}, {"all": list("abcd")}),
    "tgmd": ({"method": "tgmd", "base": "o", "maxiter": 4}, {"all": list("abcd")}),
}


@pytest.mark.parametrize("stretch_bytes", [1 << 10, 20 << 10, 4 << 20])
@pytest.mark.parametrize("name", list(RECIPES))
def test_reading_its_own_sources_writes_the_bytes_of_the_readers_path(tmp_path, monkeypatch, models, name,
                                                                       stretch_bytes):
    method, select = RECIPES[name]
    outputs = [sdxl_output("@OUT@/all.safetensors", "all", dtype="bf16")]
    if "two" in select:
        outputs += [sdxl_output("@OUT@/two.safetensors", "two", te1="all", dtype="fp32"),
                    sdxl_output("@OUT@/one.safetensors", "two", unet="all", vae="two")]
    text = recipe_text({k: v for k, v in models.items() if k != "o" or method}, select, outputs,
                       {"a": 0.3, "b": 1.7, "c": 5.0, "d": 0.123})
    if method:
        text += "[methods.all]\n" + "".join(f'{k} = "{v}"\n' if isinstance(v, str) else f"{k} = {v}\n"
                                            for k, v in method.items())
    tuning = Tuning(buffer_bytes=256 << 10, read_buffers=3, out_buffers=2, stretch_bytes=stretch_bytes)
    _assert_same(_run(tmp_path, text, tuning, True, monkeypatch), _run(tmp_path, text, tuning, False, monkeypatch))


def test_nan_mid_tensor_blames_the_same_sources(tmp_path, monkeypatch):
    folder = tmp_path / "models"
    paths = make_models(folder, 3)
    paths[1] = make_models(folder / "nan", 1, nan_in=("unet", "te1"))[0]
    chosen = {mid: str(p) for mid, p in zip("abc", paths)}
    text = recipe_text(chosen, {"all": list(chosen)}, [sdxl_output("@OUT@/out.safetensors", "all")], skip_nan=True)
    tuning = Tuning(buffer_bytes=256 << 10, stretch_bytes=2 << 10)
    own = _run(tmp_path, text, tuning, True, monkeypatch)
    assert any("skip_nan" in w for w in own["warnings"])
    _assert_same(own, _run(tmp_path, text, tuning, False, monkeypatch))


def test_a_source_cut_short_mid_merge_stops_it_naming_the_file(tmp_path):
    folder = tmp_path / "models"
    paths = make_models(folder, 2)
    victim = tmp_path / "victim.safetensors"
    shutil.copy(paths[1], victim)
    chosen = {"a": str(paths[0]), "b": str(victim)}
    plan = build_plan(parse_recipe(recipe_text(chosen, {"all": ["a", "b"]},
                                               [sdxl_output(str(tmp_path / "out.safetensors"))]), tmp_path))
    cut = []

    def on_event(e):  # once the sources are checked and the merging starts, half of the file goes
        if e.type == "stage" and e.stage == "merging":
            os.truncate(victim, victim.stat().st_size // 2)
            cut.append(True)

    with pytest.raises(MergeError, match="victim.safetensors") as e:
        execute(plan, on_event=on_event, tuning=Tuning(buffer_bytes=64 << 10, stretch_bytes=8 << 10))
    assert cut and "end of file" in str(e.value)
    assert not (tmp_path / "out.safetensors").exists()
