"""``astolfo attach ID``: watch a detached merge job's progress until it ends.

The progress comes from the job's events.jsonl (the same events a foreground ``astolfo merge``
renders), so attaching shows what the merge is doing wherever it was started from. Returns the
job's exit status when it ends (0 finished, 1 failed or died, 130 cancelled); Ctrl-C only
detaches: the job goes on. With stdout not a terminal, the events are printed as JSON lines.
"""

from __future__ import annotations

import argparse
import sys
import time

from rich.console import Console

from engine.jobs.launch import CANCELLED, DIED, FINISHED, Job, JobError, follow_events, get_job

from .merge import _Output

POLL_S = 0.2
EXIT_BY_STATUS = {FINISHED: 0, CANCELLED: 130}


def register(subparsers) -> None:
    p = subparsers.add_parser("attach", help="watch a detached merge job", description=__doc__)
    p.add_argument("job", metavar="ID", help="job id (or a unique prefix or suffix of it)")
    p.add_argument("--json", action="store_true", help="JSON lines on stdout (the default when it is not a terminal)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    return attach(args.job, json_mode=args.json or not sys.stdout.isatty())


def attach(ref: str, json_mode: bool | None = None) -> int:
    """Render the job's events as ``astolfo merge`` renders a foreground merge's (the same
    display), from the start of its latest run, until the job ends; Ctrl-C only detaches."""
    try:
        job = get_job(ref)
    except JobError as e:
        print(f"astolfo attach: {e}", file=sys.stderr)
        return 1
    out = _Output(json_mode=not sys.stdout.isatty() if json_mode is None else json_mode)
    try:
        if not out.json_mode:
            out.console.print(f"job {job.id}  {job.name}  ({job.status}; Ctrl-C detaches, the job goes on)",
                              highlight=False, markup=False)
        with out.live():
            job, events, offset, ended = _poll(job, job.events_start)  # a resumed job: its latest run
            while True:
                for e in events:
                    out.event(e)
                if ended:
                    break
                time.sleep(POLL_S)
                job, events, offset, ended = _poll(job, offset)
    except KeyboardInterrupt:
        out.console.print(
            f"detached from job {job.id}; it goes on. `astolfo attach {job.id}` to watch again,"
            f" `astolfo cancel {job.id}` to stop it.",
            highlight=False, markup=False,
        )
        return 0
    return _report_end(job, out.console)


def _poll(job: Job, offset: int) -> tuple[Job, list, int, bool]:
    """The job re-read, the events since ``offset``, and whether the job has ended. The status is
    read before the events: the runner writes its last event before it records the end."""
    job = get_job(job.id)
    events, offset = follow_events(job, offset)
    return job, events, offset, not job.is_active


def _report_end(job: Job, console: Console) -> int:
    reason = f": {job.exit_reason}" if job.exit_reason else ""
    if job.status == DIED:
        console.print(f"job {job.id} died (its process is gone){reason}; `astolfo resume {job.id}` continues it",
                      style="bold red", highlight=False, markup=False)
    elif job.status != FINISHED:
        console.print(f"job {job.id} {job.status}{reason}", style="bold red" if job.status != CANCELLED else "yellow",
                      highlight=False, markup=False)
    else:
        console.print(f"job {job.id} finished: {', '.join(map(str, job.outputs))}", style="green", highlight=False,
                      markup=False)
    return EXIT_BY_STATUS.get(job.status, 1)
