"""The merge dashboard on demo models: check, launch a detached job, watch it finish with the
outputs on disk; quitting leaves a job running and reopening reattaches."""

from __future__ import annotations

from astolfo_tui.app import AstolfoApp
from astolfo_tui.job_view import JobView
from astolfo_tui.screens.jobs import JobsScreen
from astolfo_tui.screens.merge import MergeScreen
from engine.checkpoint.format import read_header
from engine.jobs import launch as engine_jobs
from tui.conftest import SIZE
from tui.helpers import open_library, wait_for


def _pick(state) -> None:
    state.set_many("te0", ["_x01", "_x02", "_x03"], True)
    state.set_many("te1", ["_x01", "_x02"], True)
    state.set_many("unet", ["_x00", "_x01", "_x02", "_x03"], True)
    state.set_many("nsfw", ["_x02", "_x05"], True)
    state.set("vae", "_x00", True)


async def _save_picked_recipe(app, pilot, work_dir):
    """Open the library, tick the test's selection and save it as a recipe the jobs can run."""
    await open_library(pilot, hashed=False)
    _pick(app.library.state)
    recipe_path = work_dir / "r.toml"
    assert app.library.save_recipe_to(recipe_path)
    return recipe_path


async def test_plan_shows_problems_and_blocks_launch(work_dir):
    app = AstolfoApp([work_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await open_library(pilot, hashed=False)
        app.library.state.set("unet", "_x01", True)  # no te0/te1/vae picked, nsfw empty
        await pilot.press("m")
        assert isinstance(app.screen, MergeScreen)
        screen = app.screen
        assert screen.plan is None and any(p.severity >= 2 for p in screen.problems)
        assert screen.query_one("#launch").disabled
        await pilot.press("l")
        assert screen.job is None
        await pilot.press("escape")
        assert not isinstance(app.screen, MergeScreen)


async def test_launch_a_merge_and_see_it_finish(work_dir):
    app = AstolfoApp([work_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await open_library(pilot)
        _pick(app.library.state)
        app.library.grid.rebuild()
        await pilot.press("m")
        screen = app.screen
        assert isinstance(screen, MergeScreen) and screen.plan is not None
        assert screen.plan.bytes_to_read > 0
        await pilot.press("l")
        await wait_for(pilot, lambda: screen.job is not None, what="the job to start")
        await wait_for(pilot, lambda: screen.view.final is not None, timeout=120, what="the merge to end")
        assert screen.view.final == "finished", screen.view.final_message
        await wait_for(pilot, lambda: not screen.job.is_active, what="the job status to settle")
        assert screen.view.fraction == 1.0 and all(o.done for o in screen.view.outputs.values())
    mixes = work_dir.parent / "mixes"  # outside the scanned folder
    outputs = [mixes / "mix-base.safetensors", mixes / "mix-nsfw.safetensors"]
    for path in outputs:
        assert path.exists() and not path.with_name(path.name + ".partial").exists()
        assert read_header(path).tensors
    assert not list(work_dir.glob("*.recipe.toml"))  # launching writes no recipe file of the user's
    job = engine_jobs.list_jobs()[0]
    assert job.status == "finished" and sorted(job.outputs) == sorted(outputs)


async def test_jobs_screen_lists_jobs_and_reopens_the_dashboard(work_dir):
    app = AstolfoApp([work_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        recipe_path = await _save_picked_recipe(app, pilot, work_dir)
        job = engine_jobs.start_job(recipe_path)
        engine_jobs.wait_for_job(job.id, timeout_s=120)
        await pilot.press("j")
        assert isinstance(app.screen, JobsScreen)
        await pilot.pause(0.2)
        await pilot.press("enter")
        screen = app.screen
        assert isinstance(screen, MergeScreen) and screen.job.id == job.id
        await wait_for(pilot, lambda: screen.view.final == "finished", what="the replayed events")


async def test_reopening_reattaches_to_a_running_job(work_dir, monkeypatch):
    """A job still running when the app opens gets its dashboard at once. The job here is held
    at its start by a stopped runner process, so it is 'running' for as long as the test needs."""
    import os
    import signal

    app = AstolfoApp([work_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        recipe_path = await _save_picked_recipe(app, pilot, work_dir)
    job = engine_jobs.start_job(recipe_path)
    os.kill(job.pid, signal.SIGSTOP)
    try:
        app = AstolfoApp([work_dir])
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: isinstance(app.screen, MergeScreen), what="the dashboard")
            assert app.screen.job.id == job.id and app.screen.job.is_active
    finally:
        os.kill(job.pid, signal.SIGCONT)
        engine_jobs.wait_for_job(job.id, timeout_s=120)
    assert engine_jobs.get_job(job.id).status == "finished"


def test_job_view_folds_events():
    from engine.merge import events as ev

    v = JobView()
    v.apply(
        ev.Started(outputs=["a", "b"], tensors_total=10, bytes_to_read=100, bytes_to_write=50, device="cpu", sources=3)
    )
    v.apply(
        ev.Progress(
            "merging", 5, 10, 50, 100, 20, 1.0, 0.5, 1.0, "k", 1000, outputs=[ev.OutputProgress("a", 5, 5, 50, 50)]
        )
    )
    v.apply(ev.MergeWarning("key_missing", "key k missing from _x02", model_id="_x02"))
    v.apply(ev.OutputDone("a", 50, 5))
    assert v.fraction == 0.5 and v.outputs["a"].done and not v.outputs["b"].done
    assert list(v.throughput) == [0.5] and v.warnings == 1
    assert [k for k, _ in v.lines_since(0)] == ["info", "warning", "ok"]
    assert v.lines_since(3) == []
    v.apply(ev.Failed("disk full", key="k"))
    assert v.final == "failed" and "disk full" in v.final_message


async def test_cancel_asks_first_and_leaves_no_output(work_dir):
    import os
    import signal

    from astolfo_tui.screens.dialogs import ConfirmDialog

    app = AstolfoApp([work_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        recipe_path = await _save_picked_recipe(app, pilot, work_dir)
    job = engine_jobs.start_job(recipe_path)
    os.kill(job.pid, signal.SIGSTOP)  # hold it running while the dialog is answered
    resumed = False
    try:
        app = AstolfoApp([work_dir])
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: isinstance(app.screen, MergeScreen), what="the dashboard")
            screen = app.screen
            await pilot.press("ctrl+c")
            assert isinstance(app.screen, ConfirmDialog)
            await pilot.press("escape")  # keep running
            assert app.screen is screen and engine_jobs.get_job(job.id).is_active
            await pilot.press("ctrl+c")
            await pilot.press("y")
            os.kill(job.pid, signal.SIGCONT)
            resumed = True
            await wait_for(pilot, lambda: screen.job.status == "cancelled", timeout=60, what="the job to be cancelled")
    finally:
        if not resumed:
            os.kill(job.pid, signal.SIGCONT)
    mixes = work_dir.parent / "mixes"
    assert not mixes.exists() or not any(p.name.startswith("mix-") for p in mixes.iterdir())


async def test_jobs_screen_resumes_a_job_that_died(work_dir):
    import os
    import signal

    app = AstolfoApp([work_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        recipe_path = await _save_picked_recipe(app, pilot, work_dir)
        job = engine_jobs.start_job(recipe_path)
        os.kill(job.pid, signal.SIGKILL)  # as a reboot or the OOM killer would
        await wait_for(pilot, lambda: engine_jobs.get_job(job.id).status == "died", what="the job to be seen as died")
        await pilot.press("j")
        await pilot.pause(0.2)
        await pilot.press("r")
        await wait_for(pilot, lambda: isinstance(app.screen, MergeScreen), what="the resumed job's dashboard")
        await wait_for(
            pilot, lambda: engine_jobs.get_job(job.id).status == "finished", timeout=120, what="the resumed job"
        )
    mixes = work_dir.parent / "mixes"
    assert (mixes / "mix-base.safetensors").exists() and (mixes / "mix-nsfw.safetensors").exists()


async def test_a_busy_output_is_refused_with_the_reason(work_dir):
    """A second merge onto outputs a running job writes: start_job refuses, the app says why
    (through the one worker-error handler) and the launch button comes back."""
    import os
    import signal

    app = AstolfoApp([work_dir], reattach=False)
    async with app.run_test(size=SIZE) as pilot:
        await open_library(pilot, hashed=False)
        _pick(app.library.state)
        recipe_path = work_dir / "other.toml"
        assert app.library.save_recipe_to(recipe_path)
        job = engine_jobs.start_job(recipe_path)
        os.kill(job.pid, signal.SIGSTOP)
        try:
            await pilot.press("m")
            screen = app.screen
            await pilot.press("l")
            await wait_for(
                pilot,
                lambda: any("Starting the merge failed" in n.message for n in app._notifications),
                what="the refusal",
            )
            assert screen.job is None and not screen.query_one("#launch").disabled
        finally:
            os.kill(job.pid, signal.SIGCONT)
            engine_jobs.wait_for_job(job.id, timeout_s=120)


def test_a_statistic_in_progress_is_shown_with_its_key():
    """A median's iteration (``Progress.detail``) survives the job log's JSON, reaches the view
    and the CLI's progress line, and is gone once the next item is done."""
    from rich.console import Console

    from astolfo_tui.commands.merge import _Display
    from engine.merge import events as ev

    key = "model.diffusion_model.out.2.weight"
    busy = ev.Progress("merging", 5, 10, 50, 100, 20, 1.0, 0.5, 1.0, key, 1000,
                       detail="median, iteration 7 of at most 100")
    again = ev.event_from_dict(ev.event_to_dict(busy))
    assert again.detail == busy.detail
    display = _Display(Console(record=True, width=200))
    display.apply(again)
    assert display.view.detail == busy.detail
    line = display.progress.tasks[0].fields["detail"]
    assert f"{key}: median, iteration 7 of at most 100" in line
    display.apply(ev.Progress("merging", 6, 10, 60, 100, 30, 1.2, 0.5, 1.0, key, 1000))
    assert display.view.detail is None and "median" not in display.progress.tasks[0].fields["detail"]
