"""Issue 14 in the app, driven with Pilot on the demo models: the compare screen from the
library (heatmap, table, findings), ticking from there into the library's own selection, the
grid's consensus column following the highlighted selection's component, the findings in the
details pane, cancel mid-run, and opening from the cache.

SDXL base (synthetic) is marked as the ``=sd`` reference, so that consensus cosines exist; the
mark goes into a catalog of each test's own, never the session's shared one."""

from __future__ import annotations

import io
import threading

import pytest
from rich.console import Console
from textual.widgets import Static
from textual.widgets.data_table import ColumnKey

from astolfo_tui.app import AstolfoApp
from astolfo_tui.screens import compare as compare_screen
from astolfo_tui.screens.compare import CompareScreen, cosine_colour
from astolfo_tui.widgets.details import DetailsPane
from astolfo_tui.widgets.selection_grid import CONSENSUS, SEL
from engine.compare.events import Progress
from tui.conftest import SIZE
from tui.helpers import open_library, put_cursor, wait_for


@pytest.fixture
def own_catalog(tmp_path, monkeypatch):
    monkeypatch.setenv("ASTOLFO_CACHE_DIR", str(tmp_path / "cache"))


async def _with_reference(pilot, app) -> None:
    await open_library(pilot)
    put_cursor(app.library.grid, "_x00", "id")
    await pilot.press("equals_sign")
    await wait_for(pilot, lambda: app.library.grid.hashes["_x00"].same_as_reference, what="the =sd mark")


async def _compared(pilot, app) -> CompareScreen:
    await wait_for(pilot, lambda: isinstance(app.screen, CompareScreen), what="the compare screen")
    screen = app.screen
    await wait_for(pilot, lambda: screen.result is not None and not screen.running, timeout=120, what="the result")
    await pilot.pause(0.1)
    return screen


def _text(screen, selector: str) -> str:
    """What a Static shows, as plain text (Rich renderables rendered as the screen would)."""
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(screen.query_one(selector, Static).content)
    return console.export_text()


async def test_the_screen_shows_cosines_findings_and_ticks_into_the_library(demo_dir, own_catalog):
    app = AstolfoApp([demo_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await _with_reference(pilot, app)
        lib = app.library
        put_cursor(lib.grid, "_x01", SEL + "te0")
        await pilot.press("v")
        screen = await _compared(pilot, app)
        assert screen.selection == "te0" and screen.component == "te0"
        result = screen.result
        assert result["reference"] == "_x00"
        entry = result["components"]["te0"]
        assert entry["models"][0] == "_x01" and "_x00" not in entry["models"]
        # the table: one row per compared model, in grid order, the engine's numbers
        table = screen.table
        assert [k.value for k in table.rows] == entry["models"]
        i = entry["models"].index("_x02")
        assert table.get_cell("_x02", "consensus").plain == f"{entry['consensus'][i]:+.3f}"
        # _x03 and _x04 kept SDXL base's text encoders: unchanged against it
        assert "unchanged" in table.get_cell("_x03", "findings").plain
        assert "unchanged" in _text(screen, "#compare-findings")
        heat = _text(screen, "#compare-heat")
        j = entry["models"].index("_x01")
        assert f"{round(entry['cosine'][j][i] * 100):>3d}" in heat.splitlines()[1 + j]
        assert "against _x00" in str(screen.query_one("#compare-status").render())

        # space ticks the highlighted model in te0: the library's state and grid follow
        was = lib.state.is_ticked("te0", "_x02")
        table.move_cursor(row=i)
        await pilot.press("space")
        assert lib.state.is_ticked("te0", "_x02") is not was
        assert table.get_cell("_x02", "sel").plain.strip() == ("02" if not was else "--")
        assert lib.grid.get_cell("_x02", SEL + "te0").plain.strip() == ("02" if not was else "--")
        # s goes through the selections: the second UNet selection shows the unet comparison
        await pilot.press("s", "s")
        assert screen.selection == "unet"
        await pilot.press("s")
        assert screen.selection == "nsfw" and screen.component == "unet"

        await pilot.press("escape")
        assert app.screen is lib
        # the grid's optional column: te0's consensus cosines, then unet's on a unet column
        assert ColumnKey(CONSENSUS) not in lib.grid.columns
        await pilot.press("V")
        assert ColumnKey(CONSENSUS) in lib.grid.columns
        put_cursor(lib.grid, "_x02", SEL + "te0")
        await pilot.pause(0.1)
        assert lib.grid.get_cell("_x02", CONSENSUS).plain == f"{entry['consensus'][i]:+.2f}"
        assert lib.grid.get_cell("_x00", CONSENSUS).plain == "ref"
        put_cursor(lib.grid, "_x02", SEL + "unet")
        await pilot.pause(0.1)
        unet = result["components"]["unet"]
        expected = unet["consensus"][unet["models"].index("_x02")]
        assert lib.grid.get_cell("_x02", CONSENSUS).plain == f"{expected:+.2f}"
        assert "unet" in lib.grid.columns[ColumnKey(CONSENSUS)].label.plain
        await pilot.press("V")
        assert ColumnKey(CONSENSUS) not in lib.grid.columns

        # the details pane names the comparison's findings for the highlighted model
        put_cursor(lib.grid, "_x03", SEL + "te0")
        await wait_for(pilot, lambda: "the reference's: _x03" in _text(lib.query_one(DetailsPane), "#details-body"),
                       what="the compare findings in the details")
        assert "compare" in _text(lib.query_one(DetailsPane), "#details-body")


async def test_the_command_palette_offers_compare(demo_dir):
    app = AstolfoApp([demo_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await open_library(pilot, hashed=False)
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert "Compare" in titles and "Consensus column" in titles


async def test_a_second_opening_is_instant_and_a_new_session_reads_the_cache(demo_dir, own_catalog):
    app = AstolfoApp([demo_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await _with_reference(pilot, app)
        await pilot.press("v")
        first = await _compared(pilot, app)
        assert not first.from_cache
        await pilot.press("escape", "v")
        again = app.screen
        assert isinstance(again, CompareScreen) and again is not first
        assert again.result is first.result and not again.running  # no worker: the library holds it
    app = AstolfoApp([demo_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await open_library(pilot)
        await pilot.press("v")
        screen = await _compared(pilot, app)
        assert screen.from_cache
        assert screen.result["components"] == first.result["components"]


async def test_cancel_mid_run_leaves_nothing_and_a_rerun_completes(demo_dir, own_catalog, monkeypatch):
    """The real comparison, held at its first progress event until the user has pressed c."""
    real = compare_screen.compare
    held = threading.Event()

    def holding_compare(reports, cancel, on_event, use_cache):
        def hold(e):
            on_event(e)
            if isinstance(e, Progress) and not held.is_set():
                held.set()
                cancel.wait(60)

        return real(reports, cancel=cancel, on_event=hold, use_cache=use_cache)

    monkeypatch.setattr(compare_screen, "compare", holding_compare)
    app = AstolfoApp([demo_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await open_library(pilot)
        await pilot.press("v")
        await wait_for(pilot, held.is_set, timeout=60, what="the first progress event")
        screen = app.screen
        assert screen.running
        await pilot.press("c")
        await wait_for(pilot, lambda: screen.cancelled, timeout=60, what="the cancel")
        assert screen.result is None and app.library.comparison is None
        assert "cancelled" in str(screen.query_one("#compare-status").render())
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: screen.result is not None, timeout=120, what="the rerun")
        assert not screen.from_cache  # the cancelled run stored nothing


def test_cosine_colours_run_from_the_background_to_red_and_blue():
    assert cosine_colour(0.0) == "#1a1b26"
    assert cosine_colour(1.0) == "#f7768e"
    assert cosine_colour(-1.0) == "#7aa2f7"
    assert cosine_colour(None) != cosine_colour(0.0)
