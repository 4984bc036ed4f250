"""The main screens, as SVG snapshots (see snapshots.py for how to update them)."""

from __future__ import annotations

import pytest

from astolfo_tui.app import AstolfoApp
from astolfo_tui.screens import merge as merge_screen
from astolfo_tui.widgets.selection_grid import SEL
from tui.conftest import SIZE
from tui.helpers import open_library, put_cursor, wait_for
from tui.snapshots import assert_snapshot


@pytest.fixture
def fixed_disk(monkeypatch):
    """Free disk space is a fact of the machine, not of the app: fixed for the snapshot."""
    monkeypatch.setattr(merge_screen, "_free_disk", lambda target: 512 * 10**9)


def _pick(state) -> None:
    state.set_many("te0", ["_x01", "_x02", "_x03", "_x05", "_x10"], True)
    state.set_many("te1", ["_x01", "_x02", "_x04", "_x05", "_x07", "_x10"], True)
    state.set_many("unet", ["_x00", "_x01", "_x02", "_x03", "_x04", "_x05", "_x06", "_x07", "_x10", "_x14"], True)
    state.set_many("nsfw", ["_x02", "_x05", "_x07"], True)
    state.set("vae", "_x00", True)


def _pick_clean(state) -> None:
    """Only models without findings: the plan's notes are the merge engine's words, and a
    snapshot of them would break whenever they are reworded."""
    state.set_many("te0", ["_x01", "_x02", "_x03"], True)
    state.set_many("te1", ["_x01", "_x02"], True)
    state.set_many("unet", ["_x00", "_x01", "_x02", "_x03"], True)
    state.set_many("nsfw", ["_x02", "_x03"], True)
    state.set("vae", "_x00", True)


async def _library(pilot, picks):
    await open_library(pilot)
    if picks:
        (picks if callable(picks) else _pick)(pilot.app.library.state)
        pilot.app.library.grid.rebuild()
        pilot.app.library._refresh_status()
    await pilot.pause(0.1)


async def test_library(demo_dir, tui_root, tmp_path):
    app = AstolfoApp([demo_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await _library(pilot, picks=False)
        put_cursor(app.library.grid, "_x01", SEL + "te0")  # a clean model: no findings text to drift
        await pilot.pause(0.2)
        assert_snapshot(app, "library", tui_root, tmp_path)


async def test_library_with_picks(demo_dir, tui_root, tmp_path):
    app = AstolfoApp([demo_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await _library(pilot, picks=True)
        put_cursor(app.library.grid, "_x09", SEL + "unet")
        await pilot.pause(0.2)
        assert_snapshot(app, "library_picks", tui_root, tmp_path)


async def test_help(demo_dir, tui_root, tmp_path):
    app = AstolfoApp([demo_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await _library(pilot, picks=False)
        await pilot.press("question_mark")
        await pilot.pause(0.2)
        assert_snapshot(app, "help", tui_root, tmp_path)


async def test_merge_plan(demo_dir, tui_root, tmp_path, fixed_disk):
    app = AstolfoApp([demo_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await _library(pilot, picks=_pick_clean)
        await pilot.press("m")
        await wait_for(pilot, lambda: getattr(app.screen, "plan", None) is not None, what="the plan")
        await pilot.pause(0.2)
        assert_snapshot(app, "merge_plan", tui_root, tmp_path)


async def test_compare(demo_dir, tui_root, tmp_path, monkeypatch):
    """SDXL base marked =sd (in a catalog of this test's own) and the result already cached, so
    the screen shows consensus cosines and no timing."""
    import asyncio

    from engine.compare.run import compare

    monkeypatch.setenv("ASTOLFO_CACHE_DIR", str(tmp_path / "cache"))
    app = AstolfoApp([demo_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await _library(pilot, picks=True)
        lib = app.library
        put_cursor(lib.grid, "_x00", "id")
        await pilot.press("equals_sign")
        await wait_for(pilot, lambda: lib.grid.hashes["_x00"].same_as_reference, what="the =sd mark")
        await asyncio.to_thread(compare, [lib.state.reports[m] for m in lib.state.order])
        put_cursor(lib.grid, "_x01", SEL + "unet")
        await pilot.press("v")
        await wait_for(pilot, lambda: getattr(app.screen, "result", None) is not None, what="the comparison")
        await pilot.pause(0.3)
        assert app.screen.from_cache
        assert_snapshot(app, "compare", tui_root, tmp_path)


async def test_outputs_dialog(demo_dir, tui_root, tmp_path):
    app = AstolfoApp([demo_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await _library(pilot, picks=True)
        await pilot.press("u")
        await pilot.pause(0.3)
        assert_snapshot(app, "outputs", tui_root, tmp_path)


async def test_notation_dialog(demo_dir, tui_root, tmp_path):
    app = AstolfoApp([demo_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await _library(pilot, picks=True)
        await pilot.press("w")
        await pilot.pause(0.3)
        assert_snapshot(app, "notation", tui_root, tmp_path)
