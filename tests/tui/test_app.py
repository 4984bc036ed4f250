"""The real app under run_test(), driven with Pilot on the demo models."""

from __future__ import annotations

from astolfo_tui.app import AstolfoApp
from astolfo_tui.screens.dialogs import PathDialog
from astolfo_tui.screens.help import HelpScreen
from astolfo_tui.widgets.selection_grid import SEL, SelectionGrid
from engine.recipe.notation import format_notation
from engine.recipe.toml_file import load_recipe
from tui.conftest import SIZE
from tui.helpers import open_library, put_cursor, wait_for


def _grid(app) -> SelectionGrid:
    return app.library.query_one(SelectionGrid)


def _cell_text(grid, model_id, column_key) -> str:
    return grid.get_cell(model_id, column_key).plain.strip()


async def test_space_toggles_a_cell_and_the_total(demo_dir):
    app = AstolfoApp([demo_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await open_library(pilot, hashed=False)
        grid = _grid(app)
        put_cursor(grid, "_x01", SEL + "te0")
        await pilot.press("space")
        assert app.library.state.ordered("te0") == ["_x01"]
        assert _cell_text(grid, "_x01", SEL + "te0") == "01"
        assert grid.columns[next(k for k in grid.columns if k.value == SEL + "te0")].label.plain == "te0\n=1"
        await pilot.press("space")
        assert app.library.state.ordered("te0") == []
        assert _cell_text(grid, "_x01", SEL + "te0") == "--"


async def test_mouse_click_toggles(demo_dir):
    app = AstolfoApp([demo_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await open_library(pilot, hashed=False)
        grid = _grid(app)
        put_cursor(grid, "_x00", "id")
        region = grid._get_cell_region(
            grid.cursor_coordinate.__class__(grid.get_row_index("_x02"), grid.get_column_index(SEL + "te1"))
        )
        offset = (region.x - int(grid.scroll_x) + 1, region.y - int(grid.scroll_y))
        await pilot.click(SelectionGrid, offset=offset)
        assert app.library.state.ordered("te1") == ["_x02"]


async def test_column_toggle_ticks_every_mergeable_model(demo_dir):
    app = AstolfoApp([demo_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await open_library(pilot)
        state = app.library.state
        put_cursor(_grid(app), "_x00", SEL + "unet")
        await pilot.press("c")
        ticked = state.ordered("unet")
        allowed = [m for m in state.order if state.refusal("unet", m) is None]
        assert ticked == allowed and len(ticked) >= 8
        assert "_x09" not in ticked  # NaN in its UNet (found by hashing)
        await pilot.press("i")
        assert state.ordered("unet") == []
        await pilot.press("c", "n")
        assert state.ordered("unet") == []


async def test_broken_component_is_refused_with_the_reason(demo_dir):
    app = AstolfoApp([demo_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await open_library(pilot, hashed=False)
        grid = _grid(app)
        put_cursor(grid, "_x08", SEL + "vae")  # a file without a VAE
        await pilot.press("space")
        assert app.library.state.ordered("vae") == []
        messages = [n.message for n in app._notifications]
        assert any("_x08 cannot go in vae" in m and "vae" in m.split(":", 1)[1] for m in messages), messages
        assert _cell_text(grid, "_x08", SEL + "vae") == "✗"


async def test_row_toggle_filter_search_and_sort(demo_dir):
    app = AstolfoApp([demo_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await open_library(pilot, hashed=False)
        grid = _grid(app)
        put_cursor(grid, "_x02", SEL + "te0")
        await pilot.press("r")
        state = app.library.state
        assert all(state.is_ticked(n, "_x02") for n in ("te0", "te1", "unet", "nsfw"))
        await pilot.press("f")  # problems only
        assert grid.filter == "problems" and "_x13" in grid.visible_ids() and "_x01" not in grid.visible_ids()
        await pilot.press("f")  # selected only
        assert grid.visible_ids() == ["_x02"]
        await pilot.press("escape", "slash")
        await pilot.press(*"pony")
        assert grid.visible_ids() == ["_x02"]
        await pilot.press("escape")
        put_cursor(grid, "_x00", "size")
        await pilot.press("o", "o")
        assert grid.visible_ids()[0] == "_x10"  # the fp32 file is the largest


async def test_notation_goes_to_the_clipboard(work_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ASTOLFO_CACHE_DIR", str(tmp_path / "own-cache"))  # its =sd mark stays here
    app = AstolfoApp([work_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await open_library(pilot, hashed=False)
        state = app.library.state
        state.set_many("te0", ["_x01", "_x03"], True)
        await pilot.press("y")
        assert app.clipboard.startswith(format_notation(state.order, state.selections()))  # then the legend
        assert app.clipboard.startswith("te0: --,01,--,03,--")
        await open_library(pilot)
        app.library.mark_reference("_x00", app.library.file_hashes["_x00"].sha256, "base")
        await wait_for(pilot, lambda: "=sd: 00,--,--,03" in app.library.notation(), what="the =sd line")
        await pilot.press("y")
        lines = [line for line in app.clipboard.splitlines() if not line.startswith("#")]
        assert lines[-1].startswith("=sd: 00,--,--,03")


async def test_save_and_reload_a_recipe(work_dir):
    recipe_path = work_dir / "my.recipe.toml"
    app = AstolfoApp([work_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await open_library(pilot)
        grid = _grid(app)
        for mid, col in (("_x01", "te0"), ("_x03", "te0"), ("_x01", "unet"), ("_x02", "unet"), ("_x00", "vae")):
            put_cursor(grid, mid, SEL + col)
            await pilot.press("space")
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, PathDialog)
        app.screen.query_one("Input").value = str(recipe_path)
        await pilot.press("enter")
        await wait_for(pilot, recipe_path.exists, what="the recipe file")
        saved = app.library.state.selections()
    recipe = load_recipe(recipe_path)
    assert recipe.select["te0"] == ["_x01", "_x03"] and recipe.select["vae"] == ["_x00"]
    assert recipe.models["_x01"].sha256  # pinned once hashed

    app = AstolfoApp([work_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await open_library(pilot, hashed=False)
        assert app.library.state.ordered("te0") == ["_x01", "_x03"]  # the last session, restored
        app.library.state.clear("te0")
        await pilot.press("ctrl+o")
        app.screen.query_one("Input").value = str(recipe_path)
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.library.state.ordered("te0") == ["_x01", "_x03"], what="recipe applied")
        assert app.library.state.selections() == saved
        assert _cell_text(_grid(app), "_x03", SEL + "te0") == "03"


async def test_help_and_command_palette_list_the_actions(demo_dir):
    app = AstolfoApp([demo_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await open_library(pilot, hashed=False)
        titles = {c.title for c in app.get_system_commands(app.screen)}
        for expected in (
            "Toggle",
            "Column",
            "Row",
            "Invert",
            "None",
            "Filter",
            "Sort",
            "Search",
            "Save",
            "Load",
            "Copy notation",
            "Notation",
            "Merge",
            "Outputs",
            "Help",
            "Jobs",
            "Add sel.",
        ):
            assert expected in titles, expected
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)


async def test_add_rename_remove_a_selection_column(demo_dir):
    app = AstolfoApp([demo_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await open_library(pilot, hashed=False)
        await pilot.press("a")
        app.screen.query_one("#name").value = "unet2"
        await pilot.press("enter")
        state = app.library.state
        assert "unet2" in state.columns and state.columns["unet2"].component == "unet"
        grid = _grid(app)
        put_cursor(grid, "_x01", SEL + "unet2")
        await pilot.press("space", "e")
        app.screen.query_one("#name").value = "anime"
        await pilot.press("enter")
        assert state.ordered("anime") == ["_x01"] and "unet2" not in state.columns
        put_cursor(grid, "_x01", SEL + "anime")
        await pilot.press("x", "y")
        assert "anime" not in state.columns


async def test_fast_toggle_draws_what_a_rebuild_draws(demo_dir):
    """redraw_cell drops only two cached cells; the screen must match a full redraw."""
    app = AstolfoApp([demo_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await open_library(pilot)
        grid = _grid(app)
        for mid, col in (("_x01", "te0"), ("_x02", "te0"), ("_x02", "unet"), ("_x01", "te0"), ("_x05", "nsfw")):
            put_cursor(grid, mid, SEL + col)
            await pilot.pause()
            await pilot.press("space")
        put_cursor(grid, "_x00", "id")
        await pilot.pause(0.1)
        fast = app.export_screenshot()
        assert _cell_text(grid, "_x02", SEL + "te0") == "02" and _cell_text(grid, "_x01", SEL + "te0") == "--"
        grid.rebuild()
        put_cursor(grid, "_x00", "id")
        await pilot.pause(0.1)
        assert app.export_screenshot() == fast


async def test_fast_toggle_uses_datatable_internals_without_falling_back(demo_dir, monkeypatch):
    """redraw_cell leans on DataTable's private caches (textual is pinned in pyproject to the
    range this was checked with); if textual changes them this fails instead of silently
    falling back to the slow full redraw."""
    app = AstolfoApp([demo_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await open_library(pilot)
        grid = _grid(app)
        fell_back = []
        monkeypatch.setattr(grid, "update_cell", lambda *a, **k: fell_back.append(a))
        put_cursor(grid, "_x01", SEL + "te0")
        await pilot.pause()
        await pilot.press("space")
        await pilot.pause()
        assert fell_back == []
