"""Issue 11 (trust in daily use), the command line: messages say what is wrong (brackets in
names survive Rich, closest ids are suggested, every problem is reported at once), `astolfo scan`
says where values are checked, `astolfo jobs --prune` removes old jobs."""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import subprocess
import sys
from pathlib import Path

from merge_support import make_models

RECIPE = """\
name = "[b]x"
skip_nans = true

[models]
_x01 = "models/m0.safetensors"
_x02 = "models/m1.safetensors"

[select]
te0 = ["_x01", "_x2"]
all = ["_x01", "_x02"]

[[output]]
path = "out/mix.safetensors"
unet = "all"
te0 = "te0"
te1 = "all"
vae = "all"
"""


def _on_a_terminal(*args, cwd=None, timeout: float = 120) -> tuple[int, str]:
    """Run ``astolfo ARGS`` with its stdout on a pseudo-terminal (how a user sees it: Rich
    output, not JSON lines); returns the exit status and what it printed."""
    master, slave = pty.openpty()
    env = dict(os.environ, COLUMNS="200", LINES="50", TERM="xterm-256color", NO_COLOR="1")
    proc = subprocess.Popen([sys.executable, "-m", "astolfo_tui", *map(str, args)], stdout=slave, stderr=slave,
                            stdin=subprocess.DEVNULL, env=env, cwd=cwd)
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], timeout)
        if not ready:
            proc.kill()
            raise AssertionError(f"astolfo {args} printed nothing for {timeout} s")
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=timeout), b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")


def _folder(tmp_path: Path) -> Path:
    make_models(tmp_path / "models", count=2)
    (tmp_path / "r.toml").write_text(RECIPE, "utf-8")
    return tmp_path


def test_check_shows_brackets_suggests_the_id_and_reports_every_problem_at_once(tmp_path):
    folder = _folder(tmp_path)
    status, text = _on_a_terminal("merge", "--check", folder / "r.toml")
    flat = " ".join(text.split())
    assert status == 2, text
    assert "unknown setting 'skip_nans'; did you mean 'skip_nan'?" in flat  # the structural problem
    # ... and the model check behind it, with [models] intact and the closest id offered
    assert "selection 'te0' names model '_x2', which is not in [models]; did you mean '_x02'?" in flat


def test_check_json_reports_the_setting_and_the_model_together(tmp_path):
    folder = _folder(tmp_path)
    result = subprocess.run([sys.executable, "-m", "astolfo_tui", "merge", "--check", str(folder / "r.toml"), "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    messages = [json.loads(line)["message"] for line in result.stdout.splitlines() if line.strip()]
    assert any("skip_nans" in m for m in messages) and any("'_x2'" in m and "_x02" in m for m in messages)


def test_scan_table_keeps_brackets_in_file_names(tmp_path, synth_models):
    shutil.copy(synth_models["clean"], tmp_path / "[red]mix[bold].safetensors")
    status, text = _on_a_terminal("scan", tmp_path)
    assert status == 0, text
    assert "[red]mix[bold]" in text


def test_scan_says_values_are_checked_by_hash_and_shows_known_nan(tmp_path, synth_models):
    shutil.copy(synth_models["nan_unet"], tmp_path / "nan.safetensors")
    first = subprocess.run([sys.executable, "-m", "astolfo_tui", "scan", str(tmp_path)], capture_output=True, text=True,
                           timeout=120, env=dict(os.environ, COLUMNS="200"))
    assert first.returncode == 0 and "1 fine" in first.stdout  # headers cannot tell
    assert "checked by `astolfo hash`" in " ".join(first.stdout.split())
    subprocess.run([sys.executable, "-m", "astolfo_tui", "hash", str(tmp_path), "--json"], capture_output=True,
                   timeout=300, check=False)
    again = subprocess.run([sys.executable, "-m", "astolfo_tui", "scan", str(tmp_path)], capture_output=True,
                           text=True, timeout=120, env=dict(os.environ, COLUMNS="200"))
    flat = " ".join(again.stdout.split())
    assert again.returncode == 1, again.stdout
    assert "NaN" in flat and "found by `astolfo hash`" in flat and "1 of 1 already hashed" in flat


def test_jobs_prune_removes_ended_jobs_and_keeps_running_ones():
    from engine.jobs import store

    ids = {}
    for status in ("finished", "failed", "running"):
        job_id, job_dir = store.create_job_dir()
        record = {"id": job_id, "name": status, "status": status, "outputs": [], "created": store.now_iso(),
                  "started": store.now_iso()}
        if status == "running":
            record.update(store.identify(os.getpid()).as_json())  # this test's process: alive
        store.write_json_atomic(job_dir / store.JOB_JSON, record)
        ids[status] = job_dir
    result = subprocess.run([sys.executable, "-m", "astolfo_tui", "jobs", "--prune"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "removed 2 ended job(s)" in result.stdout, result.stdout + result.stderr
    assert not ids["finished"].exists() and not ids["failed"].exists() and ids["running"].exists()
