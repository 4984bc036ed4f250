"""Merge methods and weights in the app: the method dialog (driven by engine.methods.params),
the column header, saving over the user's own recipe, the weights dialog, and a merge launched
from the app with a method."""

from __future__ import annotations

import io
import json

from rich.console import Console
from textual.widgets import Button, Input, Select, Static

from astolfo_tui.app import AstolfoApp
from astolfo_tui.screens.dialogs import PathDialog, WeightDialog
from astolfo_tui.screens.merge import MergeScreen
from astolfo_tui.screens.method_dialog import PARAMS, MethodDialog, default_text, parse_value
from astolfo_tui.widgets.details import DetailsPane
from astolfo_tui.widgets.selection_grid import SEL, SelectionGrid
from engine.checkpoint.format import read_header
from engine.methods.params import FIELDS
from engine.recipe.toml_file import load_recipe
from tui.conftest import SIZE
from tui.helpers import open_library, put_cursor, wait_for

# The user's own recipe, with comments that a save from the app must keep.
USER_RECIPE = """# my mix, by hand
name = "mine"   # the name
dtype = "fp16"

[models]        # the demo files
_x00 = "_x00-SDXL-Base.safetensors"
_x01 = "_x01-AnimagineLike.safetensors"
_x02 = "_x02-PonyLike.safetensors"
_x03 = "_x03-BaseClipTune.safetensors"

[select]
te0 = ["_x01", "_x02"]   # two encoders
te1 = ["_x01", "_x02"]
unet = ["_x01", "_x02", "_x03"]
vae = ["_x00"]

[[output]]      # the one file
path = "../mixes/mine.safetensors"
unet = "unet"
te0 = "te0"
te1 = "te1"
vae = "vae"
"""


def _header(app, name: str) -> str:
    grid = app.library.query_one(SelectionGrid)
    return next(c.label.plain for k, c in grid.columns.items() if k.value == SEL + name)


async def _open_method_dialog(app, pilot, column: str = "unet") -> MethodDialog:
    put_cursor(app.library.query_one(SelectionGrid), "_x01", SEL + column)
    await pilot.pause()
    await pilot.press("t")
    await wait_for(pilot, lambda: isinstance(app.screen, MethodDialog), what="the method dialog")
    return app.screen


async def _fill(pilot, dialog: MethodDialog, method: str, base: str | None = None, **params: str) -> None:
    dialog.query_one("#method-choice", Select).value = method
    if base is not None:
        dialog.query_one("#method-base", Select).value = base
    for name, text in params.items():
        dialog.query_one(f"#param-{name}", Input).value = text
    await pilot.pause()


def _plain(static: Static) -> str:
    """What a Static shows, as plain text (a Rich Text or Table)."""
    console = Console(width=400, file=io.StringIO(), record=True)
    console.print(static.content)
    return console.export_text()


def _problems_text(dialog: MethodDialog) -> str:
    return _plain(dialog.query_one("#method-problems", Static))


def test_typed_values_read_as_toml_and_words_as_strings():
    assert parse_value(" 0.2 ") == 0.2 and parse_value("114514") == 114514 and parse_value("true") is True
    assert parse_value("sum") == "sum" and parse_value('"count"') == "count" and parse_value("") is None
    assert parse_value("[1, 2]") == "[1, 2]" and parse_value("2024-01-01") == "2024-01-01"  # not a scalar
    assert default_text("ties", "trim") == "0.2 (ties)" and default_text("dare", "drop") == "required"
    assert default_text("ties", "alpha") == "1.0 (default)"
    assert set(PARAMS) == set(FIELDS) - {"method", "base"}  # every parameter the engine knows


async def test_set_a_method_see_the_header_save_and_reload_with_comments_kept(work_dir):
    recipe_path = work_dir / "mine.recipe.toml"
    recipe_path.write_text(USER_RECIPE, "utf-8")
    app = AstolfoApp([work_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await open_library(pilot, hashed=False)
        app.library.load_recipe_from(recipe_path)
        await wait_for(pilot, lambda: app.library.state.count("unet") == 3, what="the recipe applied")
        assert _header(app, "unet") == "unet\n=3"
        dialog = await _open_method_dialog(app, pilot)
        assert dialog.query_one("#param-trim", Input).placeholder == "1.0 (default)"
        await _fill(pilot, dialog, "ties_soup", "_x00", alpha="0.5")
        assert dialog.query_one("#param-trim", Input).placeholder == "1.0 (ties_soup)"  # the preset's
        assert not dialog.query_one("#ok", Button).disabled
        await pilot.click("#ok")
        await wait_for(pilot, lambda: not isinstance(app.screen, MethodDialog), what="the dialog to close")
        assert app.library.state.methods == {"unet": {"method": "ties_soup", "base": "_x00", "alpha": 0.5}}
        assert _header(app, "unet") == "unet\n=3 ties_soup"
        assert recipe_path.read_text("utf-8") == USER_RECIPE  # nothing written before ctrl+s
        assert "unet: --,01,02,03,--" in app.library.notation() and "=3 ties_soup(base=00, alpha=0.5)" in (
            app.library.notation())
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, PathDialog)
        assert app.screen.query_one(Input).value == str(recipe_path)
        await pilot.press("enter")
        await wait_for(pilot, lambda: "[methods.unet]" in recipe_path.read_text("utf-8"), what="the save")
    text = recipe_path.read_text("utf-8")
    for kept in ("# my mix, by hand\n", 'name = "mine"   # the name', "[models]        # the demo files",
                 'te0 = ["_x01", "_x02"]   # two encoders', "[[output]]      # the one file"):
        assert kept in text, kept
    assert '[methods.unet]\nmethod = "ties_soup"\nbase = "_x00"\nalpha = 0.5\n' in text
    assert load_recipe(recipe_path).methods == {"unet": {"method": "ties_soup", "base": "_x00", "alpha": 0.5}}

    app = AstolfoApp([work_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await open_library(pilot, hashed=False)
        app.library.state.set_method("unet", None)
        app.library.load_recipe_from(recipe_path)
        await wait_for(pilot, lambda: app.library.state.method_name("unet") == "ties_soup", what="the reload")
        assert _header(app, "unet") == "unet\n=3 ties_soup"
        dialog = await _open_method_dialog(app, pilot)  # the dialog shows what the recipe says
        assert dialog.query_one("#method-choice", Select).value == "ties_soup"
        assert dialog.query_one("#method-base", Select).value == "_x00"
        assert dialog.query_one("#param-alpha", Input).value == "0.5"
        await _fill(pilot, dialog, "mean")  # the plain mean: the table goes
        await pilot.click("#ok")
        await wait_for(pilot, lambda: not isinstance(app.screen, MethodDialog), what="the dialog to close")
        assert app.library.state.methods == {} and _header(app, "unet") == "unet\n=3"
        assert app.library.save_recipe_to(recipe_path)
    text = recipe_path.read_text("utf-8")
    assert "[methods" not in text and "# my mix, by hand\n" in text


async def test_a_bad_value_shows_the_checks_message_and_ok_is_refused(demo_dir):
    app = AstolfoApp([demo_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await open_library(pilot, hashed=False)
        app.library.state.set_many("unet", ["_x01", "_x02"], True)
        dialog = await _open_method_dialog(app, pilot)
        await _fill(pilot, dialog, "dare", "_x00")
        assert "methods.unet.drop: required by method 'dare'" in _problems_text(dialog)
        await _fill(pilot, dialog, "dare", drop="1.5")
        assert "methods.unet.drop = 1.5: the drop probability must be in [0, 1)" in _problems_text(dialog)
        assert dialog.query_one("#ok", Button).disabled
        await _fill(pilot, dialog, "dare", drop="0.1", vote="maybe")
        assert "methods.unet.vote = 'maybe': expected one of sum, count, none" in _problems_text(dialog)
        assert dialog.query_one("#ok", Button).disabled
        dialog.query_one("#param-drop", Input).focus()
        await pilot.press("enter")  # OK by the keyboard is refused too
        assert app.screen is dialog and app.library.state.methods == {}
        assert any("methods.unet" in n.message for n in app._notifications)
        await _fill(pilot, dialog, "dare", drop="0.1", vote="", seed="114514")
        assert "✓ valid" in _problems_text(dialog) and not dialog.query_one("#ok", Button).disabled
        await pilot.press("escape")  # cancel keeps what was there
        assert not isinstance(app.screen, MethodDialog) and app.library.state.methods == {}
        dialog = await _open_method_dialog(app, pilot)
        await _fill(pilot, dialog, "ties", "_x00")  # the preset's trim 0.2: valid
        assert "✓ valid" in _problems_text(dialog) and not dialog.query_one("#ok", Button).disabled


async def test_weights_are_edited_shown_and_saved(work_dir):
    recipe_path = work_dir / "w.recipe.toml"
    app = AstolfoApp([work_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await open_library(pilot, hashed=False)
        app.library.state.set_many("unet", ["_x01", "_x02"], True)
        put_cursor(app.library.query_one(SelectionGrid), "_x02", SEL + "unet")
        await pilot.pause()
        await pilot.press("W")
        assert isinstance(app.screen, WeightDialog)
        await pilot.press(*"-1", "enter")
        assert isinstance(app.screen, WeightDialog) and app.library.state.weights == {}  # refused
        app.screen.query_one(Input).value = "2.5"
        await pilot.press("enter")
        await wait_for(pilot, lambda: not isinstance(app.screen, WeightDialog), what="the dialog to close")
        assert app.library.state.weights == {"_x02": 2.5}
        body = app.library.query_one(DetailsPane).query_one("#details-body", Static)
        assert "weight 2.5" in _plain(body)
        assert app.library.save_recipe_to(recipe_path)
    assert load_recipe(recipe_path).weights == {"_x02": 2.5}
    assert "[weights]\n_x02 = 2.5" in recipe_path.read_text("utf-8")


async def test_launch_a_merge_with_a_method_from_the_app(work_dir):
    app = AstolfoApp([work_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await open_library(pilot)
        state = app.library.state
        state.set_many("te0", ["_x01", "_x02"], True)
        state.set_many("te1", ["_x01", "_x02"], True)
        state.set_many("unet", ["_x01", "_x02", "_x03"], True)
        state.set("vae", "_x00", True)
        state.remove_column("nsfw")
        app.library.grid.rebuild()
        dialog = await _open_method_dialog(app, pilot)
        await _fill(pilot, dialog, "add_difference", "_x00", alpha="0.5")
        await pilot.click("#ok")
        await wait_for(pilot, lambda: state.method_name("unet") == "add_difference", what="the method")
        await pilot.press("m")
        screen = app.screen
        assert isinstance(screen, MergeScreen) and screen.plan is not None, [p.message for p in screen.problems]
        table = _plain(screen.query_one("#plan-outputs", Static))
        assert "add_difference(base=_x00, alpha=0.5" in table
        await pilot.press("l")
        await wait_for(pilot, lambda: screen.job is not None, what="the job to start")
        await wait_for(pilot, lambda: screen.view.final is not None, timeout=120, what="the merge to end")
        assert screen.view.final == "finished", screen.view.final_message
    output = work_dir.parent / "mixes" / "mix-base.safetensors"
    assert output.exists() and read_header(output).tensors
    assert "add_difference" in json.dumps(read_header(output).metadata)  # the provenance names the method


def test_the_plan_names_each_components_method_even_one_the_checks_refuse():
    from astolfo_tui.screens.merge import _method_text

    assert _method_text(None, 3).plain == "mean" and _method_text({"method": "mean"}, 1).plain == "copy"
    shown = _method_text({"method": "dare", "base": "_x00", "drop": 0.1}, 2).plain
    assert shown.startswith("dare(base=_x00, alpha=1.0") and "drop=0.1" in shown and "rescale=True" in shown
    assert _method_text({"method": "dare", "base": "_x00", "drop": "lots"}, 2).plain == "dare(base='_x00', drop='lots')"


async def test_the_outputs_dialog_names_a_sources_method(demo_dir):
    app = AstolfoApp([demo_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await open_library(pilot, hashed=False)
        app.library.state.set_method("nsfw", {"method": "ties_soup", "base": "_x00"})
        await pilot.press("u")
        await pilot.pause()
        labels = [str(prompt) for select in app.screen.query(Select) for prompt, _ in select._options]
        assert "unet ← nsfw (ties_soup)" in labels and "unet ← unet" in labels


async def test_a_bad_table_from_a_recipe_opens_with_its_problems_named(demo_dir):
    """What a hand-written recipe says is shown as written, never crashes the dialog, and is
    named by the checks (a base that is not a model, a word where a number goes)."""
    app = AstolfoApp([demo_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await open_library(pilot, hashed=False)
        app.library.state.set_method("unet", {"method": "dare", "base": "nope", "drop": "lots"})
        app.library.grid.rebuild()
        assert _header(app, "unet") == "unet\n=0 dare"
        dialog = await _open_method_dialog(app, pilot)
        assert dialog.query_one("#method-base", Select).value == "nope"
        assert dialog.query_one("#param-drop", Input).value == "lots"
        shown = _problems_text(dialog)
        assert "methods.unet.base = 'nope': not a model id in [models]" in shown
        assert "methods.unet.drop = 'lots': expected a finite number" in shown
        assert dialog.query_one("#ok", Button).disabled
