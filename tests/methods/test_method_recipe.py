"""The ``[methods.<selection>]`` table: parsed and written back unchanged, presets filling their
defaults as the issue defines them, every bad parameter reported at once (selection, field and
value named; ``astolfo merge --check`` exits 2), the combinations that are not defined and the
settings not supported yet refused, and the method with every parameter in the provenance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from merge_support import make_models, recipe_text, sdxl_output

from astolfo_tui.cli import main
from engine.library.report import Severity
from engine.merge.run import execute
from engine.methods.params import MethodParams, resolve
from engine.plan.planner import build_plan, check_recipe
from engine.recipe.toml_file import parse_recipe, recipe_to_toml


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("recipe-models")
    make_models(folder, 3)
    return folder


def _text(models: Path, tmp_path: Path, methods: str, select=None, weights=None) -> str:
    ids = {"o": str(models / "m0.safetensors"), "a": str(models / "m1.safetensors"),
           "b": str(models / "m2.safetensors")}
    select = select or {"all": ["a", "b"]}
    return recipe_text(ids, select, [sdxl_output(str(tmp_path / "out.safetensors"), "all")], weights) + methods


def _errors(models, tmp_path, methods: str, **kw) -> list[str]:
    problems = check_recipe(parse_recipe(_text(models, tmp_path, methods, **kw), tmp_path))
    return [p.message for p in problems if p.severity >= Severity.ERROR]


def test_presets_fill_the_defaults_the_issue_gives():
    assert resolve({"method": "add_difference", "base": "o"}) == MethodParams("add_difference", "o", vote="none",
                                                                              combine="sum")
    assert resolve({"method": "ties", "base": "o"}) == MethodParams("ties", "o", trim=0.2, vote="sum")
    assert resolve({"method": "ties_soup", "base": "o"}) == MethodParams("ties_soup", "o", trim=1.0, vote="count")
    assert resolve({"method": "dare", "base": "o", "drop": 0.1}) == MethodParams("dare", "o", drop=0.1)
    assert resolve({"method": "model_stock", "base": "o"}) == MethodParams("model_stock", "o", combine="stock")
    assert resolve({"method": "ties", "base": "o", "trim": 1, "vote": "count", "seed": 9}) == MethodParams(
        "ties", "o", trim=1.0, vote="count", seed=9)
    d = MethodParams("x", None)
    assert (d.alpha, d.trim, d.vote, d.drop, d.drop_eps, d.rescale, d.seed, d.combine) == (
        1.0, 1.0, "none", 0.0, 0.0, True, 0, "mean")


def test_methods_table_round_trips_as_written(models, tmp_path):
    methods = '[methods.all]\nmethod = "dare"\nbase = "o"\ndrop = 0.25\nseed = 114514\nrescale = false\n'
    recipe = parse_recipe(_text(models, tmp_path, methods), tmp_path)
    assert recipe.methods == {"all": {"method": "dare", "base": "o", "drop": 0.25, "seed": 114514, "rescale": False}}
    again = parse_recipe(recipe_to_toml(recipe), tmp_path)
    assert again == recipe


def test_unknown_field_is_a_structural_problem(models, tmp_path):
    with pytest.raises(Exception, match="unknown key 'drops'"):
        parse_recipe(_text(models, tmp_path, '[methods.all]\nmethod = "dare"\ndrops = 0.1\n'), tmp_path)


def test_every_bad_parameter_at_once_naming_selection_field_and_value(models, tmp_path):
    methods = ('[methods.all]\nmethod = "dare"\nbase = "nobody"\ndrop = 1.0\nvote = "maybe"\ntrim = 0\n'
               'seed = -1\nrescale = "yes"\nalpha = "big"\n')
    errors = _errors(models, tmp_path, methods)
    for part in ("methods.all.base = 'nobody'", "methods.all.vote = 'maybe'", "methods.all.seed = -1",
                 "methods.all.rescale = 'yes'", "methods.all.alpha = 'big'"):
        assert any(part in e for e in errors), (part, errors)
    errors = _errors(models, tmp_path, '[methods.all]\nmethod = "dare"\nbase = "o"\ndrop = 1.0\ntrim = 0\n')
    assert any("methods.all.drop = 1.0" in e and "[0, 1)" in e for e in errors), errors
    assert any("methods.all.trim = 0" in e and "(0, 1]" in e for e in errors), errors
    assert any("methods.all.method = 'tie'" in e for e in _errors(models, tmp_path, '[methods.all]\nmethod = "tie"\n'))
    assert any("methods.all.drop: required" in e for e in _errors(models, tmp_path, '[methods.all]\nmethod = "dare"\n'
                                                                                     'base = "o"\n'))
    assert any("methods.all.base: required" in e for e in _errors(models, tmp_path, '[methods.all]\nmethod = '
                                                                                      '"ties_soup"\n'))
    assert any("no selection 'nope'" in e for e in _errors(models, tmp_path, '[methods.nope]\nmethod = "dare"\n'))


def test_undefined_combinations_are_refused(models, tmp_path):
    errors = _errors(models, tmp_path, '[methods.all]\nmethod = "add_difference"\nbase = "o"\nvote = "sum"\n')
    assert any("vote = 'sum' with combine = 'sum'" in e for e in errors), errors
    errors = _errors(models, tmp_path, '[methods.all]\nmethod = "model_stock"\nbase = "o"\nalpha = 0.5\ndrop = 0.1\n',
                     select={"all": ["a"]}, weights={"a": 2.0})
    for part in ("methods.all.alpha = 0.5: not defined", "methods.all.drop = 0.1: not defined",
                 "needs at least two models", "does not use weights"):
        assert any(part in e for e in errors), (part, errors)


def test_every_preset_with_its_required_fields_passes_the_check(models, tmp_path):
    for table in ('method = "ties"\nbase = "o"\n', 'method = "della"\nbase = "o"\ndrop = 0.2\ndrop_eps = 0.1\n',
                  'method = "model_stock"\nbase = "o"\n', 'method = "dare"\nbase = "o"\ndrop = 0.3\ntrim = 0.5\n'):
        assert _errors(models, tmp_path, "[methods.all]\n" + table) == [], table


def test_check_command_exits_2_listing_every_problem(models, tmp_path, capsys):
    path = tmp_path / "r.toml"
    path.write_text(_text(models, tmp_path, '[methods.all]\nmethod = "dare"\nbase = "zz"\ndrop = -0.5\n'))
    assert main(["merge", str(path), "--check"]) == 2
    shown = capsys.readouterr()
    text = shown.out + shown.err
    assert "methods.all.base = 'zz'" in text and "methods.all.drop = -0.5" in text


def test_base_in_the_selection_is_warned(models, tmp_path):
    problems = check_recipe(parse_recipe(_text(models, tmp_path, '[methods.all]\nmethod = "ties_soup"\nbase = "a"\n'),
                                         tmp_path))
    assert [p.code for p in problems if p.severity == Severity.WARNING and p.code == "base_in_selection"]
    assert not [p for p in problems if p.severity >= Severity.ERROR]


def test_method_and_parameters_in_the_provenance(models, tmp_path):
    methods = '[methods.all]\nmethod = "dare"\nbase = "o"\ndrop = 0.5\nseed = 4\n'
    plan = build_plan(parse_recipe(_text(models, tmp_path, methods), tmp_path))
    assert "o" in [f.model_id for f in plan.files]  # the base is read though no selection lists it
    execute(plan)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:
        meta = f.metadata()
    assert '[methods.all]\nmethod = "dare"\nbase = "o"\ndrop = 0.5\nseed = 4' in meta["astolfo.recipe"]
    unet = json.loads(meta["sd_merge_recipe"])["components"]["unet"]
    assert unet["method"] == {"method": "dare", "base": "o", "alpha": 1.0, "trim": 1.0, "vote": "none", "drop": 0.5,
                              "drop_eps": 0.0, "rescale": True, "seed": 4, "combine": "mean"}
