"""Detached merge jobs: merges that outlive the terminal (and the SSH connection) that started them.

``start_job(recipe)`` validates the recipe, makes a job folder (see ``jobs.store``) holding a frozen
copy of the recipe (absolute paths, SHA256 pins: what resume and provenance read; the user's file
is never written), and starts
``python -m engine.jobs.runner JOBDIR`` in a session of its own, with no terminal: stdin from
/dev/null, stdout and stderr to the job log. When the terminal goes away (sshd closes the
pseudo-terminal and the kernel sends SIGHUP to that session) the job is not in that session and
goes on. The CLI's ``astolfo merge --detach`` and the TUI's launch button both call it.

Everything else here reads the job folder: ``list_jobs``/``get_job`` (status, progress),
``follow_events`` (the progress events, for ``astolfo attach`` and dashboards), and asks the
runner to act: ``cancel_job`` (SIGTERM plus a flag file; the runner sets the merge's cancel
event), ``resume_job`` (a new runner that continues the merge with ``resume=True``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from engine.jobs import store
from engine.jobs.store import (
    ACTIVE,
    CANCELLED,
    DIED,
    FAILED,
    FINISHED,
    RUNNING,
    STARTING,
    JobError,
    OutputBusy,
    ProcessIdentity,
)
from engine.merge.events import event_from_dict
from engine.recipe.model import ModelEntry, Recipe
from engine.recipe.toml_file import load_recipe, parse_recipe, recipe_to_toml

__all__ = [
    "Job", "JobError", "OutputBusy", "start_job", "resume_job", "cancel_job", "list_jobs",
    "get_job", "follow_events", "freeze_recipe", "prune_jobs", "wait_for_job", "load_job_recipe", "output_holder",
    "output_locks",
    "STARTING", "RUNNING", "FINISHED", "FAILED", "CANCELLED", "DIED", "UNKNOWN",
]

UNKNOWN = "unknown"  # recorded as running on another host: this machine cannot check it

output_holder = store.output_holder
output_locks = store.output_locks

# A job recorded "starting" with no pid yet is a launcher that crashed after making the folder.
_STARTING_GRACE_S = 60.0


@dataclass
class Job:
    """One job as its folder describes it now. ``status`` is what users see: a recorded
    "starting"/"running" whose process is gone is "died"."""

    id: str
    dir: Path
    status: str
    recorded_status: str
    name: str
    recipe: Path  # the recipe file the job was started from, else its frozen copy in the job folder
    outputs: list[Path]
    created: dt.datetime | None
    started: dt.datetime | None
    ended: dt.datetime | None
    host: str
    pid: int | None
    attempts: int
    exit_code: int | None
    exit_reason: str | None
    progress: float | None  # 0..1 from the latest progress event, None before the first
    events_start: int  # byte offset in events.jsonl where the latest run (a resume) begins
    extra: dict = field(default_factory=dict, repr=False)  # job.json as read

    @property
    def events_path(self) -> Path:
        return self.dir / store.EVENTS

    @property
    def log_path(self) -> Path:
        return self.dir / store.LOG

    @property
    def result_path(self) -> Path:
        return self.dir / store.RESULT

    @property
    def is_active(self) -> bool:
        return self.status in ACTIVE

    @property
    def elapsed(self) -> dt.timedelta | None:
        if self.created is None:
            return None
        end = self.ended or dt.datetime.now(dt.timezone.utc)
        return max(end - self.created, dt.timedelta(0))

    def result(self) -> dict | None:
        try:
            return json.loads(self.result_path.read_text("utf-8"))
        except (OSError, ValueError):
            return None


# --------------------------------------------------------------------------- reading jobs


def _effective_status(data: dict) -> str:
    recorded = data.get("status")
    if recorded not in ACTIVE:
        return recorded if isinstance(recorded, str) else UNKNOWN
    ident = ProcessIdentity.from_json(data)
    if ident is None:
        since = store.parse_iso(data.get("started") or data.get("created"))
        age = (dt.datetime.now(dt.timezone.utc) - since).total_seconds() if since else 1e9
        return recorded if age < _STARTING_GRACE_S else DIED
    alive = store.is_alive(ident)
    if alive is None:
        return UNKNOWN
    return recorded if alive else DIED


def _job_from_json(job_dir: Path, data: dict) -> Job:
    return Job(
        id=data["id"],
        dir=job_dir,
        status=_effective_status(data),
        recorded_status=str(data.get("status")),
        name=str(data.get("name") or ""),
        recipe=Path(data.get("recipe") or job_dir / store.RECIPE_COPY),
        outputs=[Path(p) for p in data.get("outputs") or []],
        created=store.parse_iso(data.get("created")),
        started=store.parse_iso(data.get("started")),
        ended=store.parse_iso(data.get("ended")),
        host=str(data.get("host") or ""),
        pid=data.get("pid") if isinstance(data.get("pid"), int) else None,
        attempts=int(data.get("attempts") or 1),
        exit_code=data.get("exit_code"),
        exit_reason=data.get("exit_reason"),
        progress=1.0 if data.get("status") == FINISHED else latest_progress(job_dir / store.EVENTS),
        events_start=int(data.get("events_offset") or 0),
        extra=data,
    )


def load_job(job_dir: Path) -> Job:
    return _job_from_json(job_dir, store.read_job_json(job_dir))


def list_jobs() -> list[Job]:
    """Every readable job, oldest first (ids sort by creation time)."""
    root = store.jobs_dir()
    if not root.is_dir():
        return []
    jobs = []
    for job_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            jobs.append(load_job(job_dir))
        except JobError:
            continue
    return jobs


def get_job(ref: str) -> Job:
    """The job named ``ref``: its full id, or any unique prefix or suffix of it (the random
    suffix is the easy part to type)."""
    root = store.jobs_dir()
    if ref and "/" not in ref and (root / ref / store.JOB_JSON).exists():
        return load_job(root / ref)
    ids = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    matches = [i for i in ids if ref and (i.startswith(ref) or i.endswith(ref))]
    if not matches:
        raise JobError(f"no job {ref!r} in {root} (`astolfo jobs` lists them)")
    if len(matches) > 1:
        raise JobError(f"{ref!r} matches several jobs: {', '.join(matches)}")
    return load_job(root / matches[0])


def load_job_recipe(job: Job | Path) -> Recipe:
    """The job's own copy of its recipe, with relative paths resolved against the folder of
    the recipe it was started from (as a foreground merge of that file would)."""
    job_dir = job.dir if isinstance(job, Job) else Path(job)
    data = store.read_job_json(job_dir)
    text = (job_dir / store.RECIPE_COPY).read_text("utf-8")
    return parse_recipe(text, Path(data["base_dir"]), source=job_dir / store.RECIPE_COPY)


# --------------------------------------------------------------------------- events


def read_event_lines(path: Path, offset: int = 0) -> tuple[list[dict], int]:
    """Complete JSON lines of ``path`` from byte ``offset``; a line still being written is left
    for the next call. Returns the dicts and the offset to continue from."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
    except FileNotFoundError:
        return [], offset
    end = chunk.rfind(b"\n")
    if end < 0:
        return [], offset
    out = []
    for line in chunk[: end + 1].splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if isinstance(d, dict):
            out.append(d)
    return out, offset + end + 1


def follow_events(job: Job, offset: int = 0) -> tuple[list, int]:
    """The events appended to ``job``'s events.jsonl since ``offset`` (as event objects) and the
    offset to pass next time. Poll it: it never blocks. Start at ``job.events_start`` to see
    only the latest run of a resumed job, at 0 for its whole history."""
    dicts, new_offset = read_event_lines(job.events_path, offset)
    events = []
    for d in dicts:
        try:
            events.append(event_from_dict(d))
        except Exception:  # a line from a newer or older astolfo: skip it, keep following
            continue
    return events, new_offset


_TAIL_BYTES = 64 * 1024  # a few hundred events: the latest progress event is always among them


def latest_progress(events_path: Path) -> float | None:
    """The fraction done per the latest progress event (read from the file's tail only)."""
    try:
        size = events_path.stat().st_size
    except OSError:
        return None
    dicts, _ = read_event_lines(events_path, max(0, size - _TAIL_BYTES))
    for d in reversed(dicts):
        fraction = progress_fraction(d)
        if fraction is not None:
            return fraction
        if d.get("type") == "started":
            return 0.0
    return None


def progress_fraction(event: dict) -> float | None:
    """0..1 from an event dict that carries done/total counts (bytes preferred), else None.
    Hashing sources for provenance comes before any merging and counts as 0."""
    if event.get("type") == "finished":
        return 1.0
    if event.get("stage") == "hashing":
        return 0.0
    for done_key, total_key in (("bytes_done", "bytes_total"), ("tensors_done", "tensors_total")):
        done, total = event.get(done_key), event.get(total_key)
        if isinstance(done, (int, float)) and isinstance(total, (int, float)) and total > 0:
            return max(0.0, min(1.0, done / total))
    return None


# --------------------------------------------------------------------------- starting


def _runner_env() -> dict[str, str]:
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _spawn_runner(job_dir: Path, lock_fds: list[int], resume: bool) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "engine.jobs.runner", str(job_dir), "--lock-fds", ",".join(map(str, lock_fds))]
    if resume:
        cmd.append("--resume")
    with open(job_dir / store.LOG, "ab") as log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            pass_fds=lock_fds,
            cwd=job_dir,
            env=_runner_env(),
        )
    # A long-lived launcher (the TUI) reaps the runner when it exits, so no zombie lingers.
    threading.Thread(target=proc.wait, name=f"reap-{proc.pid}", daemon=True).start()
    return proc


def _launch(job_id: str, job_dir: Path, fds: list[int], resume: bool) -> Job:
    """Hand the job's locks (``fds``, taken by the caller so that a conflict is refused at once
    and two launches cannot race) to a new runner process, and record who runs it."""
    try:
        try:
            proc = _spawn_runner(job_dir, fds, resume)
        except OSError as e:
            store.update_job_json(
                job_dir, status=FAILED, ended=store.now_iso(), exit_reason=f"cannot start the job process: {e}"
            )
            raise JobError(f"job {job_id}: cannot start the job process: {e}") from None
        store.update_job_json(job_dir, **store.identify(proc.pid).as_json())
    finally:
        store.release_locks(fds)
    return load_job(job_dir)


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _resolved_outputs(recipe: Recipe) -> list[Path]:
    return [Path(store.output_key(recipe.output_path(o))) for o in recipe.outputs]


def freeze_recipe(recipe: Recipe, pins: dict[str, str] | None = None) -> Recipe:
    """The job's own copy of ``recipe``: every path absolute (the copy lives in the job folder,
    not beside the models), every model pinned to its SHA256 where one is known (``pins``:
    model id -> SHA256, else the recipe's own pin, else the hash catalog's entry for the
    unchanged file). The user's file is never touched: resume and provenance read this copy."""
    from engine.plan.provenance import cached_hashes

    pins = dict(pins or {})
    unpinned = [mid for mid, e in recipe.models.items() if not e.sha256 and mid not in pins]
    if unpinned:
        known = cached_hashes([recipe.model_path(m) for m in unpinned], unpinned)
        pins.update({mid: h.sha256 for mid, h in known.items()})
    models = {
        mid: ModelEntry(mid, Path(os.path.abspath(recipe.model_path(mid))), e.sha256 or pins.get(mid))
        for mid, e in recipe.models.items()
    }
    outputs = [replace(o, path=Path(os.path.abspath(recipe.output_path(o)))) for o in recipe.outputs]
    return replace(recipe, models=models, outputs=outputs, select={k: list(v) for k, v in recipe.select.items()},
                   weights=dict(recipe.weights), metadata=dict(recipe.metadata))


def start_job(recipe: str | os.PathLike | Recipe, read_limit: float | None = None,
              pins: dict[str, str] | None = None) -> Job:
    """Validate ``recipe`` (a recipe file, or a Recipe the app holds) and start merging it in a
    detached process; returns at once. The job folder gets a frozen copy of it
    (``freeze_recipe``); a recipe file is only read. ``read_limit``: bytes per second the merge
    may read (``engine.merge.run.execute``), kept for a resume too.

    Raises RecipeError / PlanError (with every problem) for a recipe that cannot be merged, and
    OutputBusy when a live job already writes one of its outputs: in those cases no job is made.
    """
    from engine.plan.planner import build_plan

    if isinstance(recipe, Recipe):
        recipe_path = None
    else:
        recipe_path = Path(os.path.abspath(recipe))
        recipe = load_recipe(recipe_path)
    build_plan(recipe)
    frozen = freeze_recipe(recipe, pins)
    outputs = _resolved_outputs(frozen)
    with store.output_locks(outputs, "a job being started"):
        pass  # refused here, before a job folder exists; _launch takes the locks for good

    job_id, job_dir = store.create_job_dir()
    try:
        (job_dir / store.RECIPE_COPY).write_text(recipe_to_toml(frozen), "utf-8")
        now = store.now_iso()
        store.write_json_atomic(
            job_dir / store.JOB_JSON,
            {
                "id": job_id,
                "version": 1,
                "name": recipe.name,
                "recipe": str(recipe_path) if recipe_path else None,  # None: launched from the app
                "base_dir": str(Path(recipe.base_dir).resolve()),  # as load_recipe resolves it
                "outputs": [str(p) for p in outputs],
                "status": STARTING,
                "created": now,
                "started": now,
                "ended": None,
                "attempts": 1,
                "exit_code": None,
                "exit_reason": None,
                "options": {"read_limit": read_limit},
                "events_offset": 0,
            },
        )
        fds = store.acquire_locks(job_id, job_dir, outputs)
    except BaseException:
        shutil.rmtree(job_dir, ignore_errors=True)
        raise
    return _launch(job_id, job_dir, fds, resume=False)


def resume_job(ref: str) -> Job:
    """Continue a job whose process died (kill -9, reboot) or that failed, from the durable
    progress its merge left (tensors already written are not redone)."""
    job = get_job(ref)
    if job.status in ACTIVE:
        raise JobError(f"job {job.id} is still {job.status} (pid {job.pid}); nothing to resume")
    if job.status == UNKNOWN:
        raise JobError(f"job {job.id} runs on host {job.host!r}; resume it there")
    if job.status == FINISHED:
        raise JobError(f"job {job.id} already finished: {', '.join(map(str, job.outputs))}")
    if job.status == CANCELLED:
        raise JobError(
            f"job {job.id} was cancelled and its partial output removed; start it again with"
            f" `astolfo merge {job.dir / store.RECIPE_COPY} --detach`"
        )
    from engine.plan.planner import build_plan

    recipe = load_job_recipe(job)
    build_plan(recipe)
    # Locks first: if another runner (a concurrent resume) has the job, nothing is rewritten.
    fds = store.acquire_locks(job.id, job.dir, _resolved_outputs(recipe))
    try:
        (job.dir / store.CANCEL_FLAG).unlink(missing_ok=True)
        store.update_job_json(
            job.dir,
            status=STARTING,
            pid=None,
            started=store.now_iso(),
            ended=None,
            attempts=job.attempts + 1,
            exit_code=None,
            exit_reason=None,
            events_offset=_file_size(job.events_path),
        )
    except BaseException:
        store.release_locks(fds)
        raise
    return _launch(job.id, job.dir, fds, resume=True)


# --------------------------------------------------------------------------- cancelling


def cancel_job(ref: str, wait_s: float = 60.0) -> Job:
    """Stop a running job cleanly: its merge stops, removes its partial output and records
    "cancelled". A job whose process died has its leftover partial output removed here.
    Waits up to ``wait_s`` for the runner to finish stopping."""
    job = get_job(ref)
    if job.status == FINISHED:
        raise JobError(f"job {job.id} already finished; nothing to cancel")
    if job.status == CANCELLED:
        return job
    if job.status == UNKNOWN:
        raise JobError(f"job {job.id} runs on host {job.host!r}; cancel it there")
    (job.dir / store.CANCEL_FLAG).touch()  # a runner still starting up sees this
    deadline = time.monotonic() + wait_s
    signalled: ProcessIdentity | None = None
    while job.status in ACTIVE:
        ident = ProcessIdentity.from_json(job.extra)
        if ident is not None and ident != signalled:
            _signal(ident, signal.SIGTERM)
            signalled = ident
        if time.monotonic() >= deadline:
            raise JobError(f"job {job.id} (pid {job.pid}) has not stopped after {wait_s:.0f} s; it is stopping")
        time.sleep(0.05)
        job = load_job(job.dir)
    while signalled is not None and store.is_alive(signalled) and time.monotonic() < deadline:
        time.sleep(0.02)  # until the runner has exited and its output locks are free
    if job.status in (DIED, FAILED):
        _discard_partial_output(job)
        store.update_job_json(
            job.dir,
            status=CANCELLED,
            ended=job.extra.get("ended") or store.now_iso(),
            exit_reason=f"cancelled after it {job.status}; partial output removed",
        )
    return load_job(job.dir)


def _signal(ident: ProcessIdentity, sig: int) -> None:
    if store.is_alive(ident):
        try:
            os.kill(ident.pid, sig)
        except ProcessLookupError:
            pass


def _discard_partial_output(job: Job) -> None:
    """Remove what an interrupted merge of ``job`` left beside its outputs for a resume (the
    partial file, its progress mark, and a mark's temporary file cut off mid-write). Needs no
    plan, so it works when the job's models are gone."""
    from engine.merge.output import remove_progress, sidecar_path

    for output in job.outputs:
        remove_progress(output)
        sidecar_tmp = sidecar_path(output)
        sidecar_tmp.with_name(sidecar_tmp.name + ".tmp").unlink(missing_ok=True)


def prune_jobs() -> list[Job]:
    """Remove the folders of jobs that have ended (finished, failed, cancelled, died), with what
    an interrupted one left beside its outputs for a resume; running jobs, and jobs recorded on
    another host, are kept. Finished outputs are never touched. Returns the jobs removed."""
    removed = []
    for job in list_jobs():
        if job.status in ACTIVE or job.status == UNKNOWN:
            continue
        if job.status in (DIED, FAILED):
            try:
                _discard_partial_output(job)
            except OSError:
                continue
        shutil.rmtree(job.dir, ignore_errors=True)
        if not job.dir.exists():
            removed.append(job)
    return removed


def wait_for_job(ref: str, timeout_s: float | None = None, poll_s: float = 0.1) -> Job:
    """Block until the job is no longer starting/running (or ``timeout_s`` passes)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        job = get_job(ref)
        if job.status not in ACTIVE or (deadline is not None and time.monotonic() >= deadline):
            return job
        time.sleep(poll_s)
