"""The demo folder ships a recipe that checks clean and merges both outputs."""

from engine.checkpoint.format import read_header
from engine.library.report import Severity
from engine.merge.run import execute
from engine.plan.planner import build_plan, check_recipe
from engine.recipe.toml_file import load_recipe
from engine.synth.demo import RECIPE, make_demo_folder


def test_demo_recipe_checks_and_merges(tmp_path):
    make_demo_folder(tmp_path)
    recipe = load_recipe(tmp_path / RECIPE)
    errors = [p for p in check_recipe(recipe) if p.severity >= Severity.ERROR]
    assert errors == []
    result = execute(build_plan(recipe))
    assert len(result.outputs) == 2
    for output in recipe.outputs:
        header = read_header(recipe.output_path(output))
        assert len(header.tensors) == 2515
        assert header.metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base"


def test_demo_recipe_is_not_overwritten(tmp_path):
    make_demo_folder(tmp_path)
    (tmp_path / RECIPE).write_text("# mine\n", "utf-8")
    make_demo_folder(tmp_path)
    assert (tmp_path / RECIPE).read_text("utf-8") == "# mine\n"
