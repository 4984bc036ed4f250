"""The process that runs one detached job: ``python -m engine.jobs.runner JOBDIR [--resume]``.

``engine.jobs.launch`` starts it in a session of its own with no terminal, stdout and stderr going to the
job log. It merges the job's recipe copy, appends the merge's events to events.jsonl and records
the outcome in job.json. SIGTERM or SIGINT (``astolfo cancel``) and the job folder's ``cancel``
flag set the merge's cancel event, so the merge stops cleanly and leaves no output; SIGHUP is
ignored. Exit status: 0 finished, 1 failed, 130 cancelled.

The merge runs in a worker thread and the main thread only waits, so a signal is handled at
once whatever the merge is doing.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import enum
import json
import os
import queue
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import IO

from engine.jobs import store
from engine.jobs.store import CANCELLED, FAILED, FINISHED, RUNNING, JobError
from engine.long_lived import freeze_imports
from engine.merge.events import event_to_dict
from engine.plan.model import PlanError
from engine.plan.planner import build_plan

EXIT_FINISHED, EXIT_FAILED, EXIT_CANCELLED = 0, 1, 130

# The log gets one progress line per this many seconds (every other event gets its own line).
_LOG_PROGRESS_EVERY_S = 15.0


class EventLog:
    """Appends events to events.jsonl and readable lines to the job log from a writer thread,
    so the merge thread only converts an event to a dict and puts it on a queue; a slow disk
    delays the log, never the merge."""

    def __init__(self, events_path: Path, log: IO[str]):
        self._file = open(events_path, "a", encoding="utf-8")
        self._log = log
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._last_progress_log = 0.0
        self._thread = threading.Thread(target=self._write_loop, name="job-events", daemon=True)
        self._thread.start()

    def __call__(self, event) -> None:
        self._queue.put(event_to_dict(event))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._file.close()

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            batch = [item]
            while item is not None:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                batch.append(item)
            done = batch[-1] is None
            self._write([d for d in batch if d is not None])
            if done:
                return

    def _write(self, dicts: list[dict]) -> None:
        try:
            self._file.write("".join(json.dumps(d, separators=(",", ":")) + "\n" for d in dicts))
            self._file.flush()
        except OSError as e:  # a full disk loses progress lines, not the merge
            log_line(self._log, f"cannot append to {self._file.name}: {e}")
        for d in dicts:
            self._log_event(d)

    def _log_event(self, d: dict) -> None:
        now = dt.datetime.now().timestamp()
        if d.get("type") == "progress":
            if now - self._last_progress_log < _LOG_PROGRESS_EVERY_S:
                return
            self._last_progress_log = now
        log_line(self._log, describe_event(d))


def describe_event(d: dict) -> str:
    """One readable line for an event dict: its type, then its fields."""
    fields = " ".join(f"{k}={_short(v)}" for k, v in d.items() if k != "type" and v not in (None, "", [], {}))
    return f"{d.get('type', 'event')}: {fields}" if fields else str(d.get("type", "event"))


def _short(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 200 else text[:197] + "..."


def log_line(log: IO[str], text: str) -> None:
    try:
        log.write(f"{dt.datetime.now().isoformat(timespec='seconds')} {text}\n")
        log.flush()
    except (OSError, ValueError):
        pass


def jsonable(obj):
    """A JSON-safe copy of a result object (dataclasses, paths, enums, dates, containers)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, enum.Enum):
        return jsonable(obj.value)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, (dt.datetime, dt.date)):
        return obj.isoformat()
    return str(obj)


# --------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Outcome:
    status: str
    exit_code: int
    reason: str
    result: object = None


def run_merge(
    job_dir: Path, resume: bool, on_event, cancel: threading.Event, log: IO[str], read_limit: float | None = None,
    recipe=None,
) -> Outcome:
    """Merge the job's recipe (``recipe``: already read from the job folder; None: read it here);
    every way it can end becomes an Outcome (nothing escapes)."""
    from engine.jobs.launch import load_job_recipe
    from engine.merge.run import MergeCancelled, MergeError, execute
    from engine.recipe.model import RecipeError

    try:
        plan = build_plan(recipe if recipe is not None else load_job_recipe(job_dir))
    except PlanError as e:
        problems = getattr(e, "problems", None) or [e]
        for p in problems:
            log_line(log, f"problem: {getattr(p, 'message', p)}")
        return Outcome(FAILED, EXIT_FAILED, f"the recipe cannot be merged any more: {e}")
    except (RecipeError, OSError, JobError) as e:
        return Outcome(FAILED, EXIT_FAILED, f"cannot read the job's recipe: {e}")
    try:
        result = execute(plan, on_event=on_event, cancel=cancel, resume=resume, read_limit=read_limit)
    except MergeCancelled:
        return Outcome(CANCELLED, EXIT_CANCELLED, "cancelled; partial output removed")
    except MergeError as e:
        return Outcome(FAILED, EXIT_FAILED, str(e))
    except Exception as e:
        traceback.print_exc()
        return Outcome(FAILED, EXIT_FAILED, f"internal error: {e.__class__.__name__}: {e}")
    return Outcome(FINISHED, EXIT_FINISHED, "finished", result)


def _read_recipe_and_start_kernels(job_dir: Path):
    """The job's recipe, read once for the whole run (None when it cannot be read: ``run_merge``
    reads it again and reports why), and the CPU kernels it calls start loading now
    (``engine.kernels.warm.start_for``), before the merge's modules are imported: numba's set-up
    and the kernels' load (0.3-0.4 s on the project's 2-core machines) overlap torch's import
    (1.5-2 s) instead of the merge. Started from ``build_plan`` they were still loading when the
    merge began, and its first items waited 0.13-0.18 s for them (bench_merge, cached run)."""
    from engine.jobs.launch import load_job_recipe
    from engine.kernels import warm

    try:
        recipe = load_job_recipe(job_dir)
    except Exception:  # only a head start: whatever stops it here, run_merge meets and reports
        return None
    warm.start_for(recipe.device, methods=bool(recipe.methods))
    return recipe


def _install_signal_handlers(cancel: threading.Event) -> None:
    def request_cancel(signum, frame):
        cancel.set()

    signal.signal(signal.SIGTERM, request_cancel)
    signal.signal(signal.SIGINT, request_cancel)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m engine.jobs.runner", description=__doc__.splitlines()[0])
    parser.add_argument("job_dir", type=Path)
    parser.add_argument("--resume", action="store_true", help="continue from the partial output of an earlier run")
    parser.add_argument("--lock-fds", default="", help="fds of locks taken by the launcher (internal)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    recipe = _read_recipe_and_start_kernels(args.job_dir)
    from engine.merge.run import execute  # noqa: F401 (the merge's modules, torch among them, imported before the freeze)

    freeze_imports()
    job_dir = args.job_dir.resolve()
    cancel = threading.Event()
    _install_signal_handlers(cancel)
    log = sys.stdout
    data = store.read_job_json(job_dir)
    job_id = data["id"]

    if args.lock_fds:
        lock_fds = [int(fd) for fd in args.lock_fds.split(",")]
    else:  # started by hand: take the locks here
        try:
            lock_fds = store.acquire_locks(job_id, job_dir, [Path(p) for p in data.get("outputs", [])])
        except JobError as e:
            log_line(log, str(e))
            if not isinstance(e, store.OutputBusy):
                return EXIT_FAILED
            store.update_job_json(
                job_dir, status=FAILED, ended=store.now_iso(), exit_code=EXIT_FAILED, exit_reason=str(e)
            )
            return EXIT_FAILED

    store.update_job_json(job_dir, status=RUNNING, **store.identify(os.getpid()).as_json())
    log_line(log, f"job {job_id} {'resuming' if args.resume else 'starting'} (pid {os.getpid()})")
    if (job_dir / store.CANCEL_FLAG).exists():
        cancel.set()

    events = EventLog(job_dir / store.EVENTS, log)
    read_limit = (data.get("options") or {}).get("read_limit")
    box: list[Outcome] = []
    worker = threading.Thread(
        target=lambda: box.append(run_merge(job_dir, args.resume, events, cancel, log, read_limit, recipe)),
        name="merge",
    )
    worker.start()
    while worker.is_alive():
        worker.join(0.25)
        if not cancel.is_set() and (job_dir / store.CANCEL_FLAG).exists():
            cancel.set()
    events.close()
    outcome = box[0] if box else Outcome(FAILED, EXIT_FAILED, "internal error: the merge thread ended without a result")

    if outcome.status == FINISHED:
        store.write_json_atomic(job_dir / store.RESULT, {"result": jsonable(outcome.result)})
    store.update_job_json(
        job_dir, status=outcome.status, ended=store.now_iso(), exit_code=outcome.exit_code, exit_reason=outcome.reason
    )
    log_line(log, f"job {job_id} {outcome.status}: {outcome.reason}")
    store.release_locks(lock_fds)
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
