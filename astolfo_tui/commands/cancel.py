"""``astolfo cancel ID``: stop a detached merge job cleanly. Its merge stops, no output file is
left and its partial output is removed; a job whose process died has its leftovers removed."""

from __future__ import annotations

import argparse
import sys

from engine.jobs.launch import CANCELLED, JobError, cancel_job


def register(subparsers) -> None:
    p = subparsers.add_parser("cancel", help="stop a detached merge job", description=__doc__)
    p.add_argument("job", metavar="ID", help="job id (or a unique prefix or suffix of it)")
    p.add_argument("--wait", type=float, default=60.0, metavar="S", help="seconds to wait for it to stop (60)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        job = cancel_job(args.job, wait_s=args.wait)
    except JobError as e:
        print(f"astolfo cancel: {e}", file=sys.stderr)
        return 1
    print(f"job {job.id} {job.status}" + (f": {job.exit_reason}" if job.exit_reason else ""))
    return 0 if job.status == CANCELLED else 1  # it ended some other way before the cancel landed
