"""``astolfo merge`` end to end in subprocesses: exit codes, JSON lines, Ctrl-C, and kill -9 in
the middle of a merge (no file at the target, sources unchanged, and a resume that finishes
with the same bytes as an uninterrupted run)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from merge_support import (
    make_models,
    method_table,
    recipe_text,
    sdxl_output,
    sha256,
    slow_some_medians,
    subprocess_env,
    write_abc_recipe,
)

from engine.checkpoint.writer import partial_path
from engine.merge.events import event_from_dict
from engine.merge.output import sidecar_path
from engine.merge.run import execute
from engine.merge.tuning import Tuning
from engine.methods import median
from engine.plan.planner import build_plan
from engine.recipe.toml_file import load_recipe
from engine.synth.checkpoints import SynthSpec, write_checkpoint

# Runs the real CLI, with the engine slowed down through its event callback (tiny buffers, an
# event per item, a short sleep per event) so that a signal can land in the middle of a merge.
SLOW_CLI = """
import sys, time
from engine.merge import run as merge
from astolfo_tui.commands import merge as command
from astolfo_tui.cli import main

real = merge.execute
def slow(plan, on_event=None, **kw):
    def on(e):
        time.sleep(0.01)
        on_event(e)
    tuning = merge.Tuning(buffer_bytes=128 << 10, sub_elems=4096, progress_interval=0.0,
                          sync_bytes=256 << 10, sync_seconds=0.05)
    return real(plan, on_event=on, tuning=tuning, **kw)
command.execute = slow
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli-models")
    make_models(folder, 3)
    return folder






def _astolfo(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "astolfo_tui", *map(str, args)], capture_output=True, text=True,
                          env=subprocess_env(), cwd=cwd, timeout=300)


def _lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def test_check_and_merge_with_json_lines(models, tmp_path):
    recipe = write_abc_recipe(tmp_path, models)
    checked = _astolfo("merge", recipe, "--check")
    assert checked.returncode == 0, checked.stderr
    summary = _lines(checked.stdout)[-1]
    assert summary["type"] == "check" and summary["ok"] and summary["tensors"] == 2515
    assert not (tmp_path / "out").exists()

    done = _astolfo("merge", recipe)  # stdout is a pipe: JSON lines
    assert done.returncode == 0, done.stderr
    events = [event_from_dict(d) for d in _lines(done.stdout)]
    assert events[-1].type == "finished"
    assert [e.path for e in events if e.type == "output_done"] == [str(tmp_path / "out/mix.safetensors")]
    assert (tmp_path / "out/mix.safetensors").exists()


def test_invalid_recipe_exits_2_listing_every_problem(models, tmp_path):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(recipe_text({"a": str(models / "m0.safetensors"), "gone": "nope.safetensors"},
                                  {"all": ["a", "gone", "ghost"]},
                                  [sdxl_output(str(models / "m0.safetensors"), "all", vae="none")], dtype="fp8"))
    for args in (("merge", recipe), ("merge", recipe, "--check")):
        result = _astolfo(*args)
        assert result.returncode == 2
        codes = {d["code"] for d in _lines(result.stdout) if d["type"] == "problem" and d["severity"] == "error"}
        assert {"bad_dtype", "unknown_model", "unknown_selection", "unreadable", "output_is_input"} <= codes
    broken = tmp_path / "broken.toml"
    broken.write_text("name = 1\nbogus = 2\n")
    result = _astolfo("merge", broken)
    assert result.returncode == 2
    assert len(_lines(result.stdout)) == 5  # name type, unknown key, no [models], no [select], no [[output]]


def test_failed_merge_exits_1_and_leaves_nothing(models, tmp_path):
    nan = write_checkpoint(tmp_path / "nan.safetensors", SynthSpec(seed=5, scale=64, nan_in=("vae",)))
    recipe = tmp_path / "r.toml"
    recipe.write_text(recipe_text({"a": str(models / "m0.safetensors"), "n": str(nan)}, {"all": ["a", "n"]},
                                  [sdxl_output("out/mix.safetensors", "all")]))
    result = _astolfo("merge", recipe)
    assert result.returncode == 1
    last = _lines(result.stdout)[-1]
    assert last["type"] == "failed" and last["model_id"] == "n" and last["key"].startswith("first_stage_model.")
    assert not any((tmp_path / "out").iterdir())


def _slow_merge(recipe: Path, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SLOW_CLI, "merge", str(recipe), "--json", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"merge ended early: {proc.communicate()}"
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_ctrl_c_exits_130_with_no_output(models, tmp_path):
    recipe = write_abc_recipe(tmp_path, models)
    target = tmp_path / "out/mix.safetensors"
    proc = _slow_merge(recipe)
    _wait_for(lambda: partial_path(target).exists(), proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert _lines(out)[-1]["type"] == "cancelled"
    assert list((tmp_path / "out").iterdir()) == []


def test_kill_9_leaves_no_target_and_resume_gives_identical_bytes(models, tmp_path):
    sources = {p: sha256(p) for p in sorted(models.iterdir())}
    recipe = write_abc_recipe(tmp_path, models, skip_nan=False)
    target = tmp_path / "out/mix.safetensors"

    def durable_progress() -> bool:
        try:
            return json.loads(sidecar_path(target).read_text())["tensors_written"] > 100
        except (OSError, ValueError, KeyError):
            return False

    proc = _slow_merge(recipe)
    _wait_for(durable_progress, proc)
    proc.kill()
    proc.communicate()
    assert not target.exists()
    assert partial_path(target).exists() and sidecar_path(target).exists()
    assert {p: sha256(p) for p in sorted(models.iterdir())} == sources

    # resume through the CLI (slowed again, and killed again), then in-process
    proc = _slow_merge(recipe, "--resume")
    written = json.loads(sidecar_path(target).read_text())["tensors_written"]
    _wait_for(lambda: json.loads(sidecar_path(target).read_text() or "{}").get("tensors_written", 0) > written + 50,
              proc)
    proc.kill()
    proc.communicate()
    events: list = []
    execute(build_plan(load_recipe(recipe)), on_event=events.append, resume=True,
            tuning=Tuning(buffer_bytes=1 << 20))
    started = next(e for e in events if e.type == "started")
    assert started.resumed_tensors > written
    resumed = sha256(target)
    assert not partial_path(target).exists() and not sidecar_path(target).exists()

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    execute(build_plan(load_recipe(write_abc_recipe(fresh, models))))
    assert sha256(fresh / "out/mix.safetensors") == resumed
    assert {p: sha256(p) for p in sorted(models.iterdir())} == sources


# the medians' phases unslowed (an event each), the rest slowed as in SLOW_CLI
MEDIAN_PACE = "time.sleep(0 if getattr(e, 'detail', None) else 0.01)"


def test_kill_9_in_the_middle_of_a_median_and_resume_give_identical_bytes(models, tmp_path, monkeypatch):
    """The geometric median works over a whole key before any of it is written: a kill while it
    does (the progress names the key and the median's phase: its Gram matrix, the iterate, or
    the sweep's iteration) loses that key's work only, and the resumed output has the bytes of
    an uninterrupted run. Some medians are slowed, so the merge, which computes them a key
    ahead, waits for one and names it."""
    make_models(tmp_path / "more", 4)
    text = recipe_text({m: str(tmp_path / "more" / f"m{i}.safetensors") for i, m in enumerate("abcd")},
                       {"all": ["b", "c", "d"]}, [sdxl_output("out/mix.safetensors", "all")])
    text += method_table("all", {"method": "tgmd", "base": "a"})
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(text)
    target = tmp_path / "out/mix.safetensors"
    script = SLOW_CLI.replace("time.sleep(0.01)", MEDIAN_PACE).replace(
        "command.execute = slow", "command.execute = slow\nimport merge_support; merge_support.slow_some_medians()")
    proc = subprocess.Popen([sys.executable, "-c", script, "merge",
                             str(recipe), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env())
    seen: list[dict] = []
    iterating = threading.Event()

    def drain() -> None:  # the JSON lines, read as they come (a full pipe would stall the merge)
        for line in proc.stdout:
            event = json.loads(line)
            seen.append(event)
            if "median" in (event.get("detail") or "") and _written(target) > 5:
                iterating.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        _wait_for(iterating.is_set, proc)
    finally:
        proc.kill()
        proc.communicate()
    reader.join(10)
    assert not target.exists() and _written(target) > 5

    events: list = []
    monkeypatch.setattr(median, "geometric_median", median.geometric_median)  # undone after the test
    slow_some_medians()
    execute(build_plan(load_recipe(recipe)), on_event=events.append, resume=True, tuning=Tuning(buffer_bytes=1 << 20))
    assert next(e for e in events if e.type == "started").resumed_tensors > 5
    assert any(e.type == "progress" and e.detail and "median" in e.detail for e in events)
    resumed = sha256(target)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "recipe.toml").write_text(text)
    execute(build_plan(load_recipe(fresh / "recipe.toml")))
    assert sha256(fresh / "out/mix.safetensors") == resumed


def _written(target: Path) -> int:
    try:
        return json.loads(sidecar_path(target).read_text())["tensors_written"]
    except (OSError, ValueError, KeyError):
        return 0


FULL_DISK = """
import resource, signal, sys
from engine.merge.run import MergeError, execute
from engine.plan.planner import build_plan
from engine.recipe.toml_file import load_recipe
plan = build_plan(load_recipe(sys.argv[1]))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
try:
    execute(plan)
except MergeError as e:
    print(e)
    sys.exit(1)
"""


def test_a_write_failure_names_the_file_and_leaves_nothing(models, tmp_path):
    """A file size limit stands in for a full disk: the write fails part-way through."""
    recipe = write_abc_recipe(tmp_path, models)
    sources = {p: sha256(p) for p in sorted(models.iterdir())}
    result = subprocess.run([sys.executable, "-c", FULL_DISK, str(recipe)], capture_output=True, text=True,
                            env=subprocess_env(), timeout=300)
    assert result.returncode == 1, result.stderr
    assert "mix.safetensors.partial" in result.stdout and "File too large" in result.stdout
    assert list((tmp_path / "out").iterdir()) == []
    assert {p: sha256(p) for p in sorted(models.iterdir())} == sources
