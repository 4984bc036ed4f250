"""SelectionState: the grid's picks as plain data, and their round trip through a Recipe."""

from pathlib import Path

from astolfo_tui.selection_state import SelectionState
from engine.library.scan import scan
from engine.recipe.toml_file import parse_recipe, recipe_to_toml


def _state(demo_dir) -> SelectionState:
    return SelectionState(scan([demo_dir]), base_dir=demo_dir, name="mix")


def test_columns_follow_the_article(demo_dir):
    s = _state(demo_dir)
    assert list(s.columns) == ["te0", "te1", "unet", "nsfw", "vae"]
    assert s.columns["nsfw"].component == "unet" and s.columns["vae"].single
    assert [o.sources["unet"] for o in s.outputs] == ["unet", "nsfw"]


def test_refusals_name_the_reason(demo_dir):
    s = _state(demo_dir)
    assert s.set("unet", "_x01", True) is None
    reason = s.set("vae", "_x08", True)  # no VAE in that file
    assert reason and "vae" in reason
    assert "_x08" not in s.columns["vae"].ids
    lora = s.set("te0", "_x12", True)
    assert lora and "_x12" not in s.columns["te0"].ids


def test_column_toggle_skips_broken_and_vae_is_single(demo_dir):
    s = _state(demo_dir)
    refused = s.toggle_column("unet", s.order)
    assert refused and "_x13" in refused  # the truncated download
    assert all(not s.refusal("unet", m) for m in s.columns["unet"].ids)
    s.toggle_column("unet", s.order)
    assert not s.columns["unet"].ids
    s.set("vae", "_x01", True)
    s.set("vae", "_x02", True)
    assert s.ordered("vae") == ["_x02"]


def test_rename_and_remove_keep_outputs_consistent(demo_dir):
    s = _state(demo_dir)
    s.rename_column("nsfw", "unet2")
    assert [o.sources["unet"] for o in s.outputs] == ["unet", "unet2"]
    s.add_column("unet3", "unet")
    assert len(s.outputs) == 3
    s.remove_column("unet2")
    assert [o.sources["unet"] for o in s.outputs] == ["unet", "unet3"]


def test_recipe_round_trip(demo_dir):
    s = _state(demo_dir)
    s.set_many("te0", ["_x01", "_x03"], True)
    s.set_many("unet", ["_x01", "_x02", "_x03"], True)
    s.set("nsfw", "_x02", True)
    s.set("vae", "_x00", True)
    s.sha256["_x01"] = "a" * 64
    s.dtype = "bf16"
    recipe = s.to_recipe()
    assert set(recipe.models) == {"_x00", "_x01", "_x02", "_x03"}
    assert recipe.models["_x01"].sha256 == "a" * 64
    text = recipe_to_toml(recipe)
    again = parse_recipe(text, demo_dir)
    fresh = _state(demo_dir)
    assert fresh.apply_recipe(again) == []
    assert fresh.selections() == s.selections()
    assert fresh.dtype == "bf16"
    assert [Path(o.path).name for o in fresh.outputs] == ["mix-base.safetensors", "mix-nsfw.safetensors"]


def test_recipe_with_unknown_model_is_reported(demo_dir, tmp_path):
    s = _state(demo_dir)
    s.set("unet", "_x01", True)
    recipe = s.to_recipe()
    recipe.models["_x01"].path = tmp_path / "gone.safetensors"
    recipe.models["_x01"].id = "zz"
    recipe.models["zz"] = recipe.models.pop("_x01")
    recipe.select["unet"] = ["zz"]
    missing = _state(demo_dir).apply_recipe(recipe)
    assert missing and "gone.safetensors" in missing[0]


def test_rebased_follows_files_when_positional_ids_move(demo_dir, tmp_path):
    import shutil

    for name, mid in (("b.safetensors", "_x01"), ("c.safetensors", "_x02"), ("d.safetensors", "_x03")):
        shutil.copy(demo_dir / next(p.name for p in demo_dir.iterdir() if p.name.startswith(mid)), tmp_path / name)
    s = SelectionState(scan([tmp_path]), base_dir=tmp_path, name="mine")
    assert s.order == ["m01", "m02", "m03"]
    s.set_many("unet", ["m01", "m02"], True)
    s.add_column("anime", "unet")
    s.set("anime", "m03", True)
    s.dtype = "bf16"
    shutil.copy(tmp_path / "b.safetensors", tmp_path / "a.safetensors")  # sorts first: ids stay
    again = s.rebased(scan([tmp_path]))
    assert again.order == ["m04", "m01", "m02", "m03"]
    assert again.ordered("unet") == ["m01", "m02"] and again.ordered("anime") == ["m03"]
    assert again.dtype == "bf16" and again.name == "mine"
    assert [o.sources["unet"] for o in again.outputs] == ["unet", "nsfw", "anime"]


def test_methods_and_weights_go_into_the_recipe_and_come_back(demo_dir):
    """A method's base is listed in [models] even when no selection ticks it; renaming or
    removing a selection takes its method along; mean and weight 1 are the defaults, not entries."""
    s = _state(demo_dir)
    s.set_many("unet", ["_x01", "_x02"], True)
    s.set_method("unet", {"method": "ties_soup", "base": "_x00", "alpha": 0.5})
    s.set_weight("_x02", 2.0)
    s.set_weight("_x01", 1.0)
    recipe = s.to_recipe()
    assert recipe.methods == {"unet": {"method": "ties_soup", "base": "_x00", "alpha": 0.5}}
    assert list(recipe.models) == ["_x00", "_x01", "_x02"] and recipe.weights == {"_x02": 2.0}
    back = _state(demo_dir)
    back.apply_recipe(parse_recipe(recipe_to_toml(recipe), demo_dir))
    assert back.methods == s.methods and back.weights == {"_x02": 2.0} and back.method_name("unet") == "ties_soup"
    assert back.rebased(scan([demo_dir])).methods == s.methods
    s.rename_column("unet", "anime")
    assert s.method_name("anime") == "ties_soup" and "unet" not in s.methods
    s.set_method("anime", {"method": "mean"})
    assert s.methods == {} and s.method_name("anime") == "mean"
    s.set_method("nsfw", {"method": "add_difference", "base": "_x00"})
    s.remove_column("nsfw")
    assert s.methods == {}
