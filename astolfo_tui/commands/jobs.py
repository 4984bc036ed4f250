"""``astolfo jobs``: the detached merge jobs on this machine, with status and progress."""

from __future__ import annotations

import argparse
import datetime as dt
import json

from rich.console import Console
from rich.table import Table
from rich.text import Text

from engine.jobs.launch import CANCELLED, DIED, FAILED, FINISHED, RUNNING, STARTING, Job, list_jobs

STATUS_STYLES = {
    STARTING: "cyan",
    RUNNING: "bold cyan",
    FINISHED: "green",
    FAILED: "bold red",
    CANCELLED: "yellow",
    DIED: "bold red",
}


def register(subparsers) -> None:
    p = subparsers.add_parser("jobs", help="list detached merge jobs", description=__doc__)
    p.add_argument("--json", action="store_true", help="print one JSON object per job")
    p.add_argument("--prune", action="store_true",
                   help="remove the jobs that have ended (finished, failed, cancelled, died); outputs are kept")
    p.set_defaults(run=run)


def format_elapsed(delta: dt.timedelta | None) -> str:
    if delta is None:
        return "-"
    seconds = int(delta.total_seconds())
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def format_started(when: dt.datetime | None) -> str:
    if when is None:
        return "-"
    local = when.astimezone()
    today = dt.datetime.now().astimezone().date()
    return local.strftime("%H:%M:%S" if local.date() == today else "%Y-%m-%d %H:%M")


def format_progress(job: Job) -> str:
    return "-" if job.progress is None else f"{job.progress * 100:.0f}%"


def job_as_json(job: Job) -> dict:
    return {
        "id": job.id,
        "status": job.status,
        "name": job.name,
        "progress": job.progress,
        "outputs": [str(p) for p in job.outputs],
        "recipe": str(job.recipe),
        "created": job.created.isoformat() if job.created else None,
        "ended": job.ended.isoformat() if job.ended else None,
        "elapsed_s": job.elapsed.total_seconds() if job.elapsed else None,
        "pid": job.pid,
        "host": job.host,
        "attempts": job.attempts,
        "exit_code": job.exit_code,
        "exit_reason": job.exit_reason,
        "dir": str(job.dir),
    }


def jobs_table(jobs: list[Job]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column, justify in (("id", "left"), ("status", "left"), ("progress", "right"), ("outputs", "left"),
                            ("started", "left"), ("elapsed", "right")):
        table.add_column(column, justify=justify, no_wrap=column != "outputs")
    for job in jobs:
        table.add_row(
            job.id,
            f"[{STATUS_STYLES.get(job.status, '')}]{job.status}[/]",
            format_progress(job),
            Text(", ".join(p.name for p in job.outputs)),  # file names are not markup
            format_started(job.created),
            format_elapsed(job.elapsed),
        )
    return table


def run(args: argparse.Namespace) -> int:
    if args.prune:
        from engine.jobs.launch import prune_jobs

        removed = prune_jobs()
        if args.json:
            for job in removed:
                print(json.dumps({"type": "pruned", "id": job.id, "status": job.status}))
        else:
            print(f"removed {len(removed)} ended job(s)" + (f": {', '.join(j.id for j in removed)}" if removed else ""))
        return 0
    jobs = list_jobs()
    if args.json:
        for job in jobs:
            print(json.dumps(job_as_json(job)))
        return 0
    console = Console()
    if not jobs:
        console.print("no jobs (start one with `astolfo merge RECIPE --detach`)")
        return 0
    console.print(jobs_table(jobs))
    return 0
