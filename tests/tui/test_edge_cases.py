"""The app with unusual input: an empty folder, SD 1.5 models, a broken recipe, a small terminal."""

from __future__ import annotations

from astolfo_tui.app import AstolfoApp
from astolfo_tui.screens.dialogs import PathDialog
from engine.synth import checkpoints as synth
from tui.helpers import open_library, wait_for


async def test_an_empty_folder_opens_and_keys_do_no_harm(tmp_path):
    app = AstolfoApp([tmp_path], reattach=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.library is not None and app.library.scan_complete, what="scan")
        await pilot.press("space", "c", "r", "i", "n", "f", "o", "y", "down", "right")
        assert app.library.state.order == []
        assert "0 models" in str(app.library.query_one("#status").render())


async def test_sd15_models_get_their_own_columns(tmp_path):
    for i in (1, 2):
        synth.write_checkpoint(tmp_path / f"_x0{i}-sd.safetensors", synth.SynthSpec(arch="sd15", scale=32, seed=i))
    app = AstolfoApp([tmp_path], reattach=False)
    async with app.run_test(size=(160, 40)) as pilot:
        await open_library(pilot)
        state = app.library.state
        assert list(state.columns) == ["te", "unet", "vae"]
        await pilot.press("c")  # cursor starts on the first selection column: te
        assert state.ordered("te") == ["_x01", "_x02"]


async def test_a_broken_recipe_is_reported_not_raised(demo_dir, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = 'x'\n[select]\nte0 = 'not a list'\n", "utf-8")
    app = AstolfoApp([demo_dir], reattach=False)
    async with app.run_test(size=(160, 40)) as pilot:
        await open_library(pilot, hashed=False)
        await pilot.press("ctrl+o")
        assert isinstance(app.screen, PathDialog)
        app.screen.query_one("Input").value = str(bad)
        await pilot.press("enter")
        await pilot.pause(0.1)
        messages = [n.message for n in app._notifications]
        assert any("bad.toml" in m for m in messages), messages
        assert app.library.state.ordered("te0") == []
