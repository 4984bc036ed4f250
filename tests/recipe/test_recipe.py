"""Recipes: the issue's example parses, every recipe survives recipe_to_toml -> parse_recipe
unchanged, and structural problems are all reported at once with the file named."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.recipe.model import ModelEntry, OutputSpec, Recipe, RecipeError
from engine.recipe.toml_file import load_recipe, parse_recipe, recipe_to_toml, save_recipe

ISSUE_EXAMPLE = '''
name = "x17-AstolfoMix"        # titles and default file names
arch = "sdxl"                   # optional; checked against the models
dtype = "fp16"                  # output storage: fp16 | bf16 | fp32
device = "auto"                 # auto | cpu | cuda | cuda:N

[models]                        # id = path (relative paths resolve against the recipe's folder)
_x01 = "models/_x01-foo.safetensors"
_x02 = "models/_x02-bar.safetensors"

[select]                        # named selections (the grid's columns): lists of model ids
te0  = ["_x01", "_x02"]
te1  = ["_x02"]
unet = ["_x01", "_x02"]
nsfw = ["_x01"]
vae  = ["_x01"]

[weights]                       # optional relative weights, default 1, normalised per selection
_x02 = 2.0

[[output]]                      # one table per output file
path = "out/x17-AstolfoMix-base.safetensors"
unet = "unet"                   # each component names the selection that feeds it
te0 = "te0"
te1 = "te1"
vae = "vae"

[[output]]
path = "out/x17-AstolfoMix-nsfw.safetensors"
unet = "nsfw"
te0 = "te0"
te1 = "te1"
vae = "vae"
'''


def test_issue_example_parses(tmp_path):
    r = parse_recipe(ISSUE_EXAMPLE, tmp_path)
    assert r.name == "x17-AstolfoMix" and r.arch == "sdxl" and r.dtype == "fp16" and r.device == "auto"
    assert r.models["_x01"] == ModelEntry("_x01", Path("models/_x01-foo.safetensors"), None)
    assert r.select == {"te0": ["_x01", "_x02"], "te1": ["_x02"], "unet": ["_x01", "_x02"], "nsfw": ["_x01"],
                        "vae": ["_x01"]}
    assert r.weights == {"_x02": 2.0}
    assert [o.sources for o in r.outputs] == [
        {"unet": "unet", "te0": "te0", "te1": "te1", "vae": "vae"},
        {"unet": "nsfw", "te0": "te0", "te1": "te1", "vae": "vae"},
    ]
    assert r.output_path(r.outputs[1]) == tmp_path / "out/x17-AstolfoMix-nsfw.safetensors"
    assert r.model_path("_x02") == tmp_path / "models/_x02-bar.safetensors"
    assert r.weight("_x01") == 1.0 and not r.strict and not r.skip_nan and r.date is None


def test_round_trip_of_issue_example(tmp_path):
    r = parse_recipe(ISSUE_EXAMPLE, tmp_path)
    text = recipe_to_toml(r)
    assert parse_recipe(text, tmp_path) == r
    assert recipe_to_toml(parse_recipe(text, tmp_path)) == text


def test_pinned_models_options_and_dates(tmp_path):
    text = '''
name = "pinned"
date = 2024-05-01
strict = true
skip_nan = true
[models]
a = { path = "/abs/a.safetensors", sha256 = "5BD3B4A4C7" }
b = "b.safetensors"
[select]
s = ["a", "b"]
[metadata]
"modelspec.author" = "someone"
[[output]]
unet = "s"
dtype = "bf16"
title = "My mix"
'''
    r = parse_recipe(text, tmp_path)
    assert r.models["a"].sha256 == "5bd3b4a4c7"
    assert r.model_path("a") == Path("/abs/a.safetensors")
    assert r.date == "2024-05-01" and r.strict and r.skip_nan
    assert r.metadata == {"modelspec.author": "someone"}
    out = r.outputs[0]
    assert out.path == Path("pinned.safetensors")  # default from the name
    assert out.dtype == "bf16" and out.title == "My mix" and r.output_dtype(out) == "bf16"
    assert parse_recipe(recipe_to_toml(r), tmp_path) == r


def test_default_output_names_with_several_outputs(tmp_path):
    text = '''
name = "mix 2"
[models]
a = "a.safetensors"
[select]
u = ["a"]
n = ["a"]
[[output]]
unet = "u"
[[output]]
unet = "n"
[[output]]
unet = "n"
'''
    r = parse_recipe(text, tmp_path)
    assert [o.path for o in r.outputs] == [Path("mix_2-u.safetensors"), Path("mix_2-2.safetensors"),
                                           Path("mix_2-3.safetensors")]


def test_structural_problems_are_all_listed_with_the_file(tmp_path):
    text = '''
dtype = 16
skip_nans = true
strict = "yes"
[models]
a = 3
b = { file = "b.safetensors" }
[select]
s = "a"
[weights]
a = "heavy"
[metadata]
n = 1
[[output]]
unet = 7
colour = "red"
'''
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    e = info.value
    assert e.path == str(path)
    joined = "\n".join(e.reasons)
    for fragment in ("name: missing", "dtype: expected a string", "unknown setting 'skip_nans'",
                     "strict: expected true or false", "models.a:", "models.b: unknown key 'file'",
                     "models.b.path: missing", "select.s:", "weights.a:", "metadata.n:", "output 1.unet:",
                     "unknown key 'colour'"):
        assert fragment in joined, fragment
    assert len(e.reasons) >= 12
    assert str(path) in str(e)


def test_not_toml_and_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="not valid TOML"):
        parse_recipe("name = ", tmp_path)
    with pytest.raises(RecipeError, match="no such file"):
        load_recipe(tmp_path / "nope.toml")
    with pytest.raises(RecipeError, match=r"\[\[output\]\]: missing"):
        parse_recipe('name = "x"\n[models]\n[select]\n', tmp_path)


def test_load_resolves_against_the_recipe_folder_and_save_is_atomic(tmp_path):
    folder = tmp_path / "recipes"
    folder.mkdir()
    r = parse_recipe(ISSUE_EXAMPLE, folder)
    target = folder / "r.toml"
    save_recipe(r, target)
    assert sorted(p.name for p in folder.iterdir()) == ["r.toml"]  # no temporary file left
    loaded = load_recipe(target)
    assert loaded == r
    assert loaded.model_path("_x01") == folder / "models/_x01-foo.safetensors"


# --------------------------------------------------------------------------- round trip, any recipe

_ids = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)
_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30)
_paths = st.lists(st.text(alphabet="abcXYZ019 _-.é", min_size=1, max_size=8), min_size=1, max_size=3).map(
    lambda parts: Path("/".join(parts) + ".safetensors"))


@st.composite
def recipes(draw) -> Recipe:
    ids = draw(st.lists(_ids, min_size=1, max_size=5, unique=True))
    models = {i: ModelEntry(i, draw(_paths), draw(st.one_of(st.none(), st.sampled_from(["0123456789", "ab" * 32]))))
              for i in ids}
    sel_names = draw(st.lists(_ids, min_size=1, max_size=4, unique=True))
    select = {s: draw(st.lists(st.sampled_from(ids), max_size=4)) for s in sel_names}
    weights = {i: draw(st.floats(min_value=1e-6, max_value=1e6, allow_nan=False)) for i in
               draw(st.lists(st.sampled_from(ids), unique=True, max_size=3))}
    outputs = []
    for _ in range(draw(st.integers(1, 3))):
        comps = draw(st.lists(st.sampled_from(["unet", "te0", "te1", "te", "vae"]), unique=True, min_size=1))
        outputs.append(OutputSpec(draw(_paths), {c: draw(st.sampled_from(sel_names)) for c in comps},
                                  draw(st.one_of(st.none(), st.sampled_from(["fp16", "bf16", "fp32"]))),
                                  draw(st.one_of(st.none(), _text))))
    return Recipe(
        name=draw(_text), models=models, select=select, outputs=outputs,
        arch=draw(st.one_of(st.none(), st.sampled_from(["sdxl", "sd15"]))),
        dtype=draw(st.sampled_from(["fp16", "bf16", "fp32"])), device=draw(st.sampled_from(["auto", "cpu", "cuda:1"])),
        weights=weights, strict=draw(st.booleans()), skip_nan=draw(st.booleans()),
        date=draw(st.one_of(st.none(), _text)), base_dir=Path("/base"),
        metadata=draw(st.dictionaries(_ids, _text, max_size=3)),
    )


@settings(max_examples=300, deadline=None)
@given(recipes())
def test_any_recipe_round_trips_exactly(recipe):
    text = recipe_to_toml(recipe)
    assert parse_recipe(text, Path("/base")) == recipe


def test_saving_over_the_users_file_edits_its_methods_tables_and_keeps_comments(tmp_path):
    """[methods.<selection>] tables are edited field by field: a changed value keeps its line's
    comment, a new table is added, a selection set back to the mean loses its table."""
    text = ISSUE_EXAMPLE.replace("[[output]]                      # one table per output file", (
        "# how the UNet is combined\n[methods.unet]   # mine\nmethod = \"ties_soup\"   # the soup\n"
        "base = \"_x01\"\nalpha = 0.5  # half\n\n[methods.nsfw]\nmethod = \"add_difference\"\nbase = \"_x01\"\n\n"
        "[[output]]                      # one table per output file"), 1)
    target = tmp_path / "r.toml"
    target.write_text(text, "utf-8")
    r = load_recipe(target)
    assert r.methods["unet"] == {"method": "ties_soup", "base": "_x01", "alpha": 0.5}
    r.methods["unet"] = {"method": "ties_soup", "base": "_x01", "alpha": 0.8, "seed": 7}
    del r.methods["nsfw"]
    r.methods["te0"] = {"method": "dare", "base": "_x02", "drop": 0.1}
    save_recipe(r, target, original=text)
    saved = target.read_text("utf-8")
    assert load_recipe(target) == r
    assert "# how the UNet is combined\n[methods.unet]   # mine\nmethod = \"ties_soup\"   # the soup\n" in saved
    assert "alpha = 0.8  # half" in saved and "seed = 7" in saved
    assert "[methods.nsfw]" not in saved and "add_difference" not in saved
    assert "[methods.te0]" in saved
    assert "name = \"x17-AstolfoMix\"        # titles and default file names" in saved
    r.methods = {}
    save_recipe(r, target, original=saved)
    assert "[methods" not in target.read_text("utf-8") and load_recipe(target) == r
