"""engine.jobs.store: process identity that survives pid reuse, output locks held by processes,
atomic job.json. Real processes, real files."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from engine.jobs import store


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(store.STATE_DIR_ENV, str(tmp_path / "state"))
    return tmp_path / "state"


def test_state_dir_follows_the_environment(state_dir):
    assert store.jobs_dir() == state_dir / "jobs"


def test_job_ids_are_unique_and_sort_by_creation():
    ids = [store.create_job_dir()[0] for _ in range(20)]
    assert len(set(ids)) == 20
    assert all(len(i) <= 18 for i in ids)
    assert [i[:13] for i in ids] == sorted(i[:13] for i in ids)


def test_this_process_is_alive_and_a_reused_pid_is_not():
    me = store.identify(os.getpid())
    assert me.start_ticks is not None
    assert store.is_alive(me) is True
    assert store.is_alive(dataclasses.replace(me, start_ticks=me.start_ticks + 1)) is False
    assert store.is_alive(dataclasses.replace(me, boot_id="another-boot")) is False
    assert store.is_alive(dataclasses.replace(me, host="some-other-host")) is None


def test_an_exited_or_zombie_process_is_not_alive():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    ident = store.identify(child.pid)
    deadline = time.monotonic() + 10
    while store.is_alive(ident) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.is_alive(ident) is False  # exited but not yet reaped: a zombie
    child.wait()
    assert store.is_alive(ident) is False


def test_a_command_name_with_parentheses_and_spaces_is_parsed(tmp_path):
    script = tmp_path / "odd ) name (x"
    script.write_text("#!/bin/sh\nsleep 30\n")
    script.chmod(0o755)
    child = subprocess.Popen([str(script)])
    try:
        ident = store.identify(child.pid)
        assert ident.start_ticks is not None and store.is_alive(ident)
    finally:
        child.kill()
        child.wait()


def test_update_job_json_is_atomic_and_keeps_other_fields(tmp_path):
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    store.write_json_atomic(job_dir / store.JOB_JSON, {"id": "x", "status": "starting"})
    store.update_job_json(job_dir, pid=123)
    store.update_job_json(job_dir, status="running")
    assert store.read_job_json(job_dir) == {"id": "x", "status": "running", "pid": 123}
    assert sorted(p.name for p in job_dir.iterdir()) == [".job.json.lock", "job.json"]


def test_a_broken_job_file_is_a_job_error(tmp_path):
    (tmp_path / store.JOB_JSON).write_text("{half")
    with pytest.raises(store.JobError, match="job.json"):
        store.read_job_json(tmp_path)


HOLD_LOCKS = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from engine.jobs import store
    store.acquire_locks(sys.argv[1], Path(sys.argv[2]), [Path(sys.argv[3])])
    print("locked", flush=True)
    time.sleep(60)
    """
)


def test_an_output_lock_names_its_job_and_dies_with_its_process(tmp_path):
    output = tmp_path / "out" / "mix.safetensors"
    holder_dir = tmp_path / "holder"
    holder_dir.mkdir()
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCKS, "job-A", str(holder_dir), str(output)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout.readline().strip() == "locked"
        assert store.output_holder(output) == "job-A"
        other_dir = tmp_path / "other"
        other_dir.mkdir()
        with pytest.raises(store.OutputBusy, match="job-A") as caught:
            store.acquire_locks("job-B", other_dir, [tmp_path / "out" / "." / "mix.safetensors"])
        assert caught.value.holder == "job-A"
        with pytest.raises(store.JobError, match="already running"):
            store.acquire_locks("job-A", holder_dir, [])
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert store.output_holder(output) is None
    fds = store.acquire_locks("job-B", tmp_path / "other", [output])
    assert store.output_holder(output) == "job-B"
    store.release_locks(fds)
    assert store.output_holder(output) is None
