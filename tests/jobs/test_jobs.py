"""Detached merge jobs, end to end: real runner processes, real files, synthetic SDXL models.

The merges here read their models through ``--read-limit`` (a user setting for shared disks) so
that a job is reliably still running when a test closes its terminal, kills it or cancels it.
"""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.checkpoint.writer import partial_path
from engine.jobs import store
from engine.jobs.launch import (
    CANCELLED,
    DIED,
    FINISHED,
    RUNNING,
    STARTING,
    JobError,
    OutputBusy,
    cancel_job,
    follow_events,
    get_job,
    list_jobs,
    output_locks,
    read_event_lines,
    resume_job,
    start_job,
    wait_for_job,
)
from engine.merge.output import sidecar_path
from engine.merge.run import execute
from engine.plan.planner import build_plan
from engine.recipe.toml_file import load_recipe
from engine.synth.checkpoints import SynthSpec, write_checkpoint

SCALE = 8  # ~110 MB per model: several 64 MB read buffers, so a merge has durable marks mid-way
READ_LIMIT = 40e6  # bytes/s: ~8 s for the three models
JOB_ID = re.compile(r"\b\d{6}-\d{6}-[0-9a-f]{4}\b")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("job-models")
    return [write_checkpoint(folder / f"m{i}.safetensors", SynthSpec(scale=SCALE, seed=i + 1)) for i in range(3)]


def write_recipe(
    folder: Path, models: list[Path], output: str = "out/mix.safetensors", name: str = "jobs-test"
) -> Path:
    """A recipe averaging every component over the models but the VAE (copied from one); the
    output path is relative, so it resolves against the recipe's folder."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f'name = "{name}"', "", "[models]"]
    lines += [f'm{i} = "{p}"' for i, p in enumerate(models)]
    lines += [
        "",
        "[select]",
        f"all = [{', '.join(f'{chr(34)}m{i}{chr(34)}' for i in range(len(models)))}]",
        'one = ["m0"]',
        "",
        "[[output]]",
        f'path = "{output}"',
        'unet = "all"',
        'te0 = "all"',
        'te1 = "all"',
        'vae = "one"',
    ]
    path = folder / "recipe.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def reference_bytes(recipe_path: Path) -> bytes:
    """What an uninterrupted foreground merge of the recipe writes (then removed, so a job can
    write the same path). It also leaves the sources' hashes in the test's catalog."""
    result = execute(build_plan(load_recipe(recipe_path)))
    target = Path(result.outputs[0].path)
    data = target.read_bytes()
    target.unlink()
    return data


def astolfo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "astolfo_tui", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def durable_tensors(output: Path) -> int:
    try:
        return json.loads(sidecar_path(output).read_text())["tensors_written"]
    except (OSError, ValueError, KeyError):
        return 0


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def started_events(job) -> list[dict]:
    return [d for d in read_event_lines(job.events_path)[0] if d["type"] == "started"]


# --------------------------------------------------------------------------- the SSH scenario


def test_a_job_survives_the_terminal_it_was_started_from_closing(tmp_path, models):
    recipe = write_recipe(tmp_path / "work", models)
    expected = reference_bytes(recipe)
    output = recipe.parent / "out" / "mix.safetensors"

    # The child is a shell whose controlling terminal is the pty, as sshd sets up a login.
    pid, master = pty.fork()
    if pid == 0:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as a login shell has it (not nohup's ignore)
        os.execvp(
            "bash",
            [
                "bash",
                "-c",
                f"{sys.executable} -m astolfo_tui merge {recipe} --detach --read-limit {READ_LIMIT:.0f}; "
                "echo shell-prompt-again; sleep 60",
            ],
        )
    # Read until the command has returned to the shell (the marker after it): a hangup while the
    # CLI is still exiting (a loaded machine takes seconds) is another scenario than the user's
    # terminal closing after the job started, and the shell's exit status then varies.
    seen = b""
    deadline = time.monotonic() + 120
    while b"shell-prompt-again" not in seen and time.monotonic() < deadline:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        seen += chunk
    match = JOB_ID.search(seen.decode(errors="replace"))
    assert match, f"no job id printed: {seen!r}"
    job_id = match.group(0)

    os.close(master)  # the connection drops: the kernel hangs up the terminal's session
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGHUP, "the shell should die of SIGHUP"
    assert get_job(job_id).is_active, "the job must still be running after the hangup"

    job = wait_for_job(job_id, timeout_s=180)
    assert job.status == FINISHED, job.exit_reason
    assert job.exit_code == 0
    assert output.read_bytes() == expected
    assert leftovers(output.parent) == ["mix.safetensors"]
    assert [e.type for e in follow_events(job)[0]][-1] == "finished"
    assert job.result()["result"]["outputs"][0]["path"] == str(output)
    log = job.log_path.read_text()
    assert "finished" in log and "Traceback" not in log


# --------------------------------------------------------------------------- kill -9 and resume


def test_kill_9_half_way_then_resume_writes_identical_bytes(tmp_path, models):
    recipe = write_recipe(tmp_path / "work", models)
    expected = reference_bytes(recipe)
    output = recipe.parent / "out" / "mix.safetensors"

    job = start_job(recipe, read_limit=READ_LIMIT)
    wait_until(lambda: durable_tensors(output) > 0, 120, "a durable progress mark")
    assert get_job(job.id).status == RUNNING
    os.kill(job.pid, signal.SIGKILL)
    ident = store.ProcessIdentity.from_json(get_job(job.id).extra)
    wait_until(lambda: not store.is_alive(ident), 30, "the runner to die")

    killed = get_job(job.id)
    assert killed.status == DIED and killed.recorded_status == RUNNING
    listed = [json.loads(line) for line in astolfo("jobs", "--json").stdout.splitlines()]
    assert [(j["id"], j["status"]) for j in listed] == [(job.id, DIED)]
    table = astolfo("jobs").stdout
    assert job.id in table and "died" in table and "running" not in table
    assert not output.exists() and partial_path(output).exists()
    kept = durable_tensors(output)
    assert 0 < kept < build_plan(load_recipe(recipe)).tensor_count

    done = astolfo("resume", job.id)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == job.id
    finished = wait_for_job(job.id, timeout_s=180)
    assert finished.status == FINISHED, finished.exit_reason
    assert finished.attempts == 2 and finished.events_start > 0
    assert output.read_bytes() == expected
    assert leftovers(output.parent) == ["mix.safetensors"]
    first, second = started_events(finished)
    assert first["resumed_tensors"] == 0
    assert second["resumed_tensors"] >= kept  # the tensors already on disk were not redone

    with pytest.raises(JobError, match="already finished"):
        resume_job(job.id)


# --------------------------------------------------------------------------- cancel


def test_cancel_stops_the_merge_and_leaves_nothing_behind(tmp_path, models):
    recipe = write_recipe(tmp_path / "work", models)
    output = recipe.parent / "out" / "mix.safetensors"
    job = start_job(recipe, read_limit=READ_LIMIT)
    wait_until(lambda: durable_tensors(output) > 0, 120, "a partial output with a progress mark")

    done = astolfo("cancel", job.id[-4:])  # the random suffix is enough to name a job
    assert done.returncode == 0, done.stderr
    cancelled = get_job(job.id)
    assert cancelled.status == CANCELLED and cancelled.exit_code == 130
    assert leftovers(output.parent) == []
    assert [e.type for e in follow_events(cancelled)[0]][-1] == "cancelled"
    assert store.output_holder(output) is None
    with pytest.raises(JobError, match="cancelled"):
        resume_job(job.id)


def test_cancelling_a_job_that_died_removes_its_partial_output(tmp_path, models):
    recipe = write_recipe(tmp_path / "work", models)
    output = recipe.parent / "out" / "mix.safetensors"
    job = start_job(recipe, read_limit=READ_LIMIT)
    wait_until(lambda: durable_tensors(output) > 0, 120, "a durable progress mark")
    os.kill(job.pid, signal.SIGKILL)
    wait_until(lambda: get_job(job.id).status == DIED, 30, "the job to show as died")
    assert partial_path(output).exists() and sidecar_path(output).exists()

    cancelled = cancel_job(job.id)
    assert cancelled.status == CANCELLED
    assert "partial output removed" in cancelled.exit_reason
    assert leftovers(output.parent) == []


# --------------------------------------------------------------------------- one writer per output


def test_a_second_job_for_the_same_output_is_refused(tmp_path, models):
    first_recipe = write_recipe(tmp_path / "a", models, output=str(tmp_path / "shared" / "mix.safetensors"))
    second_recipe = write_recipe(tmp_path / "b", models[:2], output="../shared/mix.safetensors", name="other")
    # slow enough (~30 s) to still be running after three CLI runs on a loaded machine; cancelled below
    first = start_job(first_recipe, read_limit=READ_LIMIT / 4)
    try:
        with pytest.raises(OutputBusy, match=first.id) as refused:
            start_job(second_recipe)
        assert refused.value.holder == first.id
        cli = astolfo("merge", str(second_recipe), "--detach")
        assert cli.returncode == 1
        assert first.id in cli.stderr and "already writing" in cli.stderr
        foreground = astolfo("merge", str(second_recipe))
        assert foreground.returncode == 1
        assert first.id in foreground.stdout + foreground.stderr  # a foreground merge is refused too
        assert [j.id for j in list_jobs()] == [first.id]  # the refused ones left no job behind
    finally:
        cancel_job(first.id)
    assert get_job(first.id).status == CANCELLED
    assert leftovers(tmp_path / "shared") == []


def test_a_job_is_refused_while_a_foreground_merge_writes_its_output(tmp_path, models):
    recipe = write_recipe(tmp_path / "work", models[:1])
    output = recipe.parent / "out" / "mix.safetensors"
    with output_locks([output], "a foreground `astolfo merge` (pid 4242)"):
        with pytest.raises(OutputBusy, match="pid 4242"):
            start_job(recipe)
        assert store.output_holder(output) == "a foreground `astolfo merge` (pid 4242)"
    assert list_jobs() == []
    assert wait_for_job(start_job(recipe).id, timeout_s=120).status == FINISHED


def test_an_invalid_recipe_is_refused_before_any_job_exists(tmp_path, models):
    recipe = write_recipe(tmp_path / "work", [models[0], tmp_path / "missing.safetensors"])
    cli = astolfo("merge", str(recipe), "--detach")
    assert cli.returncode == 2
    assert "missing.safetensors" in cli.stdout + cli.stderr
    assert list_jobs() == []


# --------------------------------------------------------------------------- status, attach


def test_a_dead_runner_whose_pid_was_reused_shows_as_died(tmp_path, models):
    """job.json still says running, and its pid now belongs to a live process (this one) that
    started at another time: the job is died, not running."""
    recipe = write_recipe(tmp_path / "work", models[:1])
    job = wait_for_job(start_job(recipe).id, timeout_s=120)
    assert job.status == FINISHED
    me = store.identify(os.getpid())
    store.update_job_json(
        job.dir,
        status=RUNNING,
        ended=None,
        pid=me.pid,
        pid_start_ticks=me.start_ticks + 1,
        boot_id=me.boot_id,
        host=me.host,
    )
    assert get_job(job.id).status == DIED
    store.update_job_json(job.dir, pid_start_ticks=me.start_ticks)
    assert get_job(job.id).status == RUNNING  # the same pid and start time: the very process
    store.update_job_json(job.dir, boot_id="an-earlier-boot")
    assert get_job(job.id).status == DIED  # the machine rebooted since


def test_attach_follows_a_job_to_its_end(tmp_path, models):
    recipe = write_recipe(tmp_path / "work", models)
    job = start_job(recipe, read_limit=READ_LIMIT)
    attached = astolfo("attach", job.id, timeout=180)
    assert attached.returncode == 0, attached.stderr
    types = [json.loads(line)["type"] for line in attached.stdout.splitlines()]
    assert "started" in types and types[-1] == "finished" and "progress" in types
    assert get_job(job.id).status == FINISHED


def test_ctrl_c_in_attach_detaches_and_the_job_goes_on(tmp_path, models):
    recipe = write_recipe(tmp_path / "work", models)
    job = start_job(recipe, read_limit=READ_LIMIT)
    pid, master = pty.fork()
    if pid == 0:
        # as a terminal's shell has it: a suite started in the background (``ci &``) ignores SIGINT,
        # the exec'd Python would inherit that and never see the Ctrl-C
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.execv(sys.executable, [sys.executable, "-m", "astolfo_tui", "attach", job.id])
    seen = b""
    while b"Ctrl-C detaches" not in seen:
        seen += os.read(master, 4096)
    os.write(master, b"\x03")
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    _, status = os.waitpid(pid, 0)
    os.close(master)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, seen
    assert b"detached from job" in seen
    # the Ctrl-C may come before the runner has marked the job running (a loaded machine starts
    # Python slowly): detaching leaves it alone either way, and it goes on to run
    assert get_job(job.id).status in (STARTING, RUNNING)
    wait_until(lambda: get_job(job.id).status == RUNNING, 60, "the detached job to go on running")
    cancel_job(job.id)


def test_job_ids_can_be_given_by_prefix_or_suffix_and_unknown_ones_are_errors(tmp_path, models):
    recipe = write_recipe(tmp_path / "work", models[:1])
    job = wait_for_job(start_job(recipe).id, timeout_s=120)
    assert get_job(job.id[:-2]).id == job.id
    assert get_job(job.id[-4:]).id == job.id
    with pytest.raises(JobError, match="no job"):
        get_job("no-such-job")
    result = astolfo("attach", "no-such-job")
    assert result.returncode == 1 and "no job" in result.stderr
    finished = astolfo("attach", job.id)
    assert finished.returncode == 0 and json.loads(finished.stdout.splitlines()[-1])["type"] == "finished"


def test_read_limit_takes_human_rates():
    import argparse

    from astolfo_tui.commands.merge import parse_rate

    assert parse_rate("200M") == 200e6
    assert parse_rate("1.5G") == 1.5e9
    assert parse_rate("64MiB/s") == 64 * 2**20
    assert parse_rate("500000") == 500000
    for bad in ("fast", "0", "-5M", "10X"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_rate(bad)


@pytest.mark.parametrize("device, methods, started", [
    ("cpu", False, [False]), ("cpu", True, [True]), ("cuda", False, []),
])
def test_the_runner_starts_loading_the_kernels_its_recipe_calls_before_its_imports(tmp_path, monkeypatch, device,
                                                                                    methods, started):
    """The runner reads its recipe copy once, first, and starts the CPU kernels' load from it, so
    numba's set-up overlaps torch's import; a job folder it cannot read starts nothing, raises
    nothing and gives no recipe (run_merge reads it again and reports the problem)."""
    from engine.jobs import runner
    from engine.kernels import warm

    calls = []
    monkeypatch.setattr(warm, "start", lambda methods=True: calls.append(methods))
    monkeypatch.delenv(warm.ENV, raising=False)
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / store.JOB_JSON).write_text(json.dumps({"id": "000000-000000-abcd", "base_dir": str(tmp_path)}))
    (job_dir / store.RECIPE_COPY).write_text(
        f'name = "r"\ndevice = "{device}"\n[models]\na = "a.safetensors"\n[select]\nall = ["a"]\n'
        + ('[methods.all]\nmethod = "ties"\n' if methods else "")
        + '[[output]]\npath = "o.safetensors"\nunet = "all"\n')
    recipe = runner._read_recipe_and_start_kernels(job_dir)
    assert calls == started
    assert recipe.device == device and bool(recipe.methods) == methods
    calls.clear()
    (job_dir / store.RECIPE_COPY).write_text("name = [unclosed\n")
    assert runner._read_recipe_and_start_kernels(job_dir) is None
    assert runner._read_recipe_and_start_kernels(tmp_path / "no-such-job") is None
    assert calls == []
