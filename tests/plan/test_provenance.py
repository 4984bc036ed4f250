"""engine.plan.provenance: pins, reserved metadata keys, and metadata that depends only on the
recipe and the inputs (two builds of the same plan give the same strings)."""

from __future__ import annotations

import json

from merge_support import make_models, recipe_text, sdxl_output

from engine.hashes.model import FileHashes
from engine.plan.planner import build_plan
from engine.plan.provenance import PROVENANCE_KEYS, build_metadata, pin_mismatch, pin_problem
from engine.recipe.toml_file import parse_recipe

SHA = "ab" * 32


def test_pins_match_full_hashes_and_autov2_prefixes_in_any_case():
    assert pin_problem("m", "/x", SHA, SHA) is None
    assert pin_problem("m", "/x", SHA[:10].upper(), SHA) is None
    assert pin_problem("m", "/x", None, SHA) is None
    message = pin_problem("m", "/x/m.safetensors", "cd" * 5, SHA)
    assert "model m" in message and "/x/m.safetensors" in message and "cdcdcdcdcd" in message


def _plan(tmp_path, **extra):
    paths = make_models(tmp_path / "models", 2)
    models = {f"m{i}": str(p) for i, p in enumerate(paths)}
    text = recipe_text(models, {"all": list(models)}, [sdxl_output(str(tmp_path / "out.safetensors"))])
    text += "[metadata]\n" + "".join(f'"{k}" = "{v}"\n' for k, v in extra.items())
    return build_plan(parse_recipe(text, tmp_path))


def _hashes(plan):
    return {f.model_id: FileHashes(sha256=f"{i:02x}" * 32, autov1=f"{i:08x}", autov3=None, size=f.size)
            for i, f in enumerate(plan.files)}


def test_reserved_keys_are_not_taken_from_the_recipe(tmp_path):
    plan = _plan(tmp_path, **{"sd_merge_models": "forged", "modelspec.author": "me"})
    assert "sd_merge_models" in PROVENANCE_KEYS
    meta = build_metadata(plan, plan.outputs[0], _hashes(plan))
    assert meta["modelspec.author"] == "me"
    assert json.loads(meta["sd_merge_models"]) != "forged"
    assert set(json.loads(meta["sd_merge_models"])) == {h.sha256 for h in _hashes(plan).values()}


def test_metadata_is_the_same_on_every_build(tmp_path):
    plan = _plan(tmp_path)
    first = build_metadata(plan, plan.outputs[0], _hashes(plan))
    again = build_metadata(plan, plan.outputs[0], _hashes(plan))
    assert first == again
    assert all(isinstance(v, str) for v in first.values())
    sources = json.loads(first["astolfo.sources"])
    assert [s["id"] for s in sources] == ["m0", "m1"]


def test_a_mismatching_pin_is_found_before_the_merge(tmp_path):
    plan = _plan(tmp_path)
    plan.files[1].sha256_pin = "ff" * 5
    found = pin_mismatch(plan, _hashes(plan))
    assert found is not None and found[0] == "m1"
