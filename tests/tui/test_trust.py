"""Issue 11 (trust in daily use), the app driven with Pilot: the loaded recipe is never
rewritten by a launch, a save keeps the user's file as they wrote it and asks before overwriting
a changed one, the picks survive a restart, outputs are not inputs, messages keep brackets, the
dialogs show their own keys."""

from __future__ import annotations

import shutil

from textual.widgets import Footer, Input

from astolfo_tui.app import AstolfoApp
from astolfo_tui.screens.dialogs import ConfirmDialog, PathDialog, complete_path
from astolfo_tui.screens.merge import MergeScreen
from astolfo_tui.screens.outputs import OutputsDialog, renamed_output
from astolfo_tui.widgets.selection_grid import SEL
from engine.jobs import launch as engine_jobs
from engine.recipe.toml_file import load_recipe
from engine.synth.demo import RECIPE
from tui.conftest import SIZE
from tui.helpers import open_library, put_cursor, wait_for
from tui.snapshots import _visible_text

COMMENTED = "# my own notes on this mix\n"


def _user_recipe(work_dir):
    """The demo's recipe as a user keeps it: with a comment of theirs, relative paths."""
    path = work_dir / RECIPE
    text = COMMENTED + path.read_text("utf-8")
    path.write_text(text, "utf-8")
    return path, text


async def _load(pilot, app, path):
    await pilot.press("ctrl+o")
    assert isinstance(app.screen, PathDialog)
    app.screen.query_one(Input).value = str(path)
    await pilot.press("enter")
    await wait_for(pilot, lambda: app.library.recipe_path == path, what="the recipe loaded")


async def test_launching_never_writes_the_loaded_recipe(work_dir):
    path, text = _user_recipe(work_dir)
    app = AstolfoApp([work_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await open_library(pilot)
        await _load(pilot, app, path)
        app.library.state.set("unet", "_x03", False)  # changed in the app, not saved
        await pilot.press("m")
        screen = app.screen
        assert isinstance(screen, MergeScreen) and screen.plan is not None
        await pilot.press("l")
        await wait_for(pilot, lambda: screen.job is not None, what="the job to start")
        job = screen.job
    assert path.read_text("utf-8") == text  # not a byte changed: no pins, no absolute paths
    frozen = engine_jobs.load_job_recipe(job)
    assert "_x03" not in frozen.select["unet"]  # the job merges what the app had
    assert all(e.sha256 and len(e.sha256) == 64 for e in frozen.models.values())  # pinned in the job's copy
    engine_jobs.wait_for_job(job.id, timeout_s=180)


async def test_saving_keeps_the_users_file_and_asks_when_it_changed_on_disk(work_dir):
    path, text = _user_recipe(work_dir)
    app = AstolfoApp([work_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await open_library(pilot)
        await _load(pilot, app, path)
        app.library.state.set("unet", "_x03", False)
        assert app.library.save_recipe_to(path)
        saved = path.read_text("utf-8")
        assert saved.startswith(COMMENTED) and str(work_dir) not in saved  # comment and relative paths kept
        assert "_x03" not in load_recipe(path).select["unet"]

        path.write_text(saved + "# edited in another editor\n", "utf-8")
        app.library.state.set("unet", "_x04", False)
        assert not app.library.save_recipe_to(path)  # asks first
        await pilot.pause(0.1)
        assert isinstance(app.screen, ConfirmDialog)
        await pilot.press("escape")  # keep the file
        assert path.read_text("utf-8").endswith("# edited in another editor\n")
        assert not app.library.save_recipe_to(path)
        await pilot.pause(0.1)
        assert isinstance(app.screen, ConfirmDialog)
        await pilot.press("y")
        await wait_for(pilot, lambda: "_x04" not in load_recipe(path).select["unet"], what="the confirmed save")
        assert path.read_text("utf-8").startswith(COMMENTED)


async def test_the_picks_survive_a_restart_and_the_demo_opens_with_its_recipe(work_dir):
    app = AstolfoApp([work_dir], reattach=False, recipe=work_dir / RECIPE)
    async with app.run_test(size=SIZE) as pilot:
        await open_library(pilot, hashed=False)
        state = app.library.state
        assert state.ordered("nsfw") == ["_x02", "_x05", "_x07", "_x08"]  # demo-recipe.toml, not an empty grid
        put_cursor(app.library.grid, "_x03", SEL + "nsfw")
        await pilot.press("space")
        state.weights["_x02"] = 2.0
        picks = state.selections()
    again = AstolfoApp([work_dir], reattach=False, recipe=work_dir / RECIPE)
    async with again.run_test(size=SIZE) as pilot:
        await open_library(pilot, hashed=False)
        assert again.library.state.selections() == picks and "_x03" in picks["nsfw"]
        assert again.library.state.weights == {"_x02": 2.0}
        assert again.library.recipe_path == work_dir / RECIPE


async def test_outputs_go_outside_the_folder_and_a_mix_is_never_bulk_ticked(work_dir):
    app = AstolfoApp([work_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await open_library(pilot, hashed=False)
        outputs = app.library.state.to_recipe().outputs
        assert all(o.path.parent == work_dir.parent / "mixes" for o in outputs)
    mixes = work_dir.parent / "mixes"
    job = engine_jobs.start_job(work_dir / RECIPE)  # the demo's recipe writes to ../mixes too
    job = engine_jobs.wait_for_job(job.id, timeout_s=180)
    assert job.status == "finished", job.exit_reason
    assert all(p.parent == mixes for p in job.outputs)
    shutil.copy(job.outputs[0], work_dir / "old-mix.safetensors")  # an earlier mix left among the models
    app = AstolfoApp([work_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await open_library(pilot, hashed=False)
        state = app.library.state
        mix = next(m for m, r in state.reports.items() if r.file_name == "old-mix.safetensors")
        assert state.is_output(mix)
        assert app.library.grid.get_cell(mix, "arch").plain == "mix"
        put_cursor(app.library.grid, "_x01", SEL + "unet")
        state.clear("unet")
        await pilot.press("c")
        assert len(state.ordered("unet")) >= 8 and mix not in state.ordered("unet")
        await pilot.press("i")
        assert mix not in state.ordered("unet")


async def test_messages_keep_brackets(work_dir):
    bad = work_dir / "bad.toml"
    bad.write_text('name = "x"\n[select]\nunet = ["a"]\n[[output]]\nunet = "unet"\n', "utf-8")
    app = AstolfoApp([work_dir], reattach=False)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await open_library(pilot, hashed=False)
        await pilot.press("ctrl+o")
        app.screen.query_one(Input).value = str(bad)
        await pilot.press("enter")
        await pilot.pause(0.3)
        shown = "".join(line.strip(" ▊▎▌") for line in _visible_text(app.export_screenshot()))
        assert "[models]: missing" in shown, shown


async def test_dialogs_show_their_own_keys_and_do_not_blink(demo_dir):
    app = AstolfoApp([demo_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await open_library(pilot, hashed=False)
        await pilot.press("u")
        await pilot.pause(0.2)
        dialog = app.screen
        assert isinstance(dialog, OutputsDialog)
        keys = {b.binding.key for b in dialog.active_bindings.values() if b.binding.show}
        assert "ctrl+s" in keys and dialog.query(Footer)  # Apply is on the dialog's own footer
        assert not app.focused.cursor_blink  # a snapshot never catches the cursor half-way
        name = dialog.query_one("#recipe-name", Input)
        name.value = "x18"
        await pilot.press("ctrl+s")
        await pilot.pause(0.1)
        assert [o.path.name for o in app.library.state.outputs] == ["x18-base.safetensors", "x18-nsfw.safetensors"]


async def test_typed_ahead_keys_wait_for_the_rows_and_q_quits_an_empty_folder(demo_dir, tmp_path):
    app = AstolfoApp([demo_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("down", "space")  # before the scan has shown anything
        await open_library(pilot, hashed=False)
        await pilot.pause(0.2)
        assert app.library.state.ordered("te0") == ["_x01"]
    empty = tmp_path / "empty"
    empty.mkdir()
    app = AstolfoApp([empty], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await open_library(pilot, hashed=False)
        await pilot.press("slash", "q")
        await pilot.pause(0.2)
        assert app.return_code == 0  # quit, not typed into a search box


def test_the_path_completer_completes_folders(tmp_path):
    (tmp_path / "models-sdxl").mkdir()
    (tmp_path / "notes.txt").write_text("")
    assert complete_path(str(tmp_path) + "/mo", folders_only=True) == str(tmp_path) + "/models-sdxl/"
    assert complete_path(str(tmp_path) + "/no", folders_only=True) is None
    assert complete_path(str(tmp_path) + "/no") == str(tmp_path) + "/notes.txt"


async def test_sorting_names_the_column_and_the_status_column_has_a_header(demo_dir):
    app = AstolfoApp([demo_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await open_library(pilot)
        grid = app.library.grid
        assert grid.columns[next(k for k in grid.columns if k.value == "status")].label.plain.strip() == "ok"
        put_cursor(grid, "_x01", "hash:te0")
        await pilot.press("o")
        status = str(app.library.query_one("#status").render())
        assert "sorted by #te0" in status, status


async def test_a_screenshot_goes_to_the_current_folder_without_downloads(demo_dir, tmp_path, monkeypatch):
    import platformdirs
    import textual.app

    for module in (platformdirs, textual.app):  # a server without ~/Downloads
        monkeypatch.setattr(module, "user_downloads_path", lambda: tmp_path / "no-such-downloads")
    monkeypatch.chdir(tmp_path)
    app = AstolfoApp([demo_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await open_library(pilot, hashed=False)
        app.action_screenshot()
        await pilot.pause(0.5)
    assert list(tmp_path.glob("*.svg"))


async def test_the_outputs_dialog_shows_whole_paths_and_long_selection_labels(demo_dir):
    app = AstolfoApp([demo_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await open_library(pilot, hashed=False)
        app.library.state.add_column("unet-alt", "unet")
        await pilot.press("u")
        await pilot.pause(0.3)
        dialog = app.screen
        path_box = dialog.query(".output-path").first(Input)
        assert path_box.content_region.width >= len(path_box.value)  # not cut off
        for select in dialog.query(".source-unet"):
            label = f"unet ← {select.value}"
            assert select.content_region.width >= len(label) + 2, (label, select.content_region)


async def test_ctrl_n_opens_another_folder(demo_dir, tmp_path, synth_models):
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(synth_models["clean"], other / "kohaku.safetensors")
    app = AstolfoApp([demo_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await open_library(pilot, hashed=False)
        await pilot.press("ctrl+n")
        assert isinstance(app.screen, PathDialog)
        box = app.screen.query_one(Input)
        box.value = str(tmp_path) + "/"
        box.cursor_position = len(box.value)
        await pilot.press("o", "t", "h")
        await pilot.pause(0.3)
        await pilot.press("right")  # takes the completer's suggestion
        assert box.value == str(other) + "/"
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.library is not None and app.library.paths == [other]
                       and app.library.scan_complete, what="the other folder")
        assert [r.file_name for r in app.library.state.reports.values()] == ["kohaku.safetensors"]


async def test_brackets_in_file_and_mix_names_reach_the_screen(tmp_path, synth_models):
    folder = tmp_path / "lib"
    folder.mkdir()
    for name in ("[red]a[bold]", "b"):
        shutil.copy(synth_models["clean"], folder / f"{name}.safetensors")
    app = AstolfoApp([folder], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await open_library(pilot, hashed=False)
        state = app.library.state
        state.name = "[b]mix"
        state.outputs = [renamed_output(o, "mix", "[b]mix") for o in state.outputs]
        put_cursor(app.library.grid, next(iter(state.reports)), "id")
        await pilot.pause(0.2)
        shown = "\n".join(_visible_text(app.export_screenshot()))
        assert "[red]a[bold]" in shown
        for mid in state.order:
            state.set_many("te0", [mid], True)
        await pilot.press("m")
        await pilot.pause(0.3)
        shown = "\n".join(_visible_text(app.export_screenshot()))
        assert "[b]mix-base.safetensors" in shown, shown
