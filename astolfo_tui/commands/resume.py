"""``astolfo resume ID``: continue a detached merge job that was interrupted (its process was
killed, or the machine rebooted) or failed. Tensors already written are not redone, and the
finished file is byte-identical to an uninterrupted run's."""

from __future__ import annotations

import argparse
import sys

from engine.jobs.launch import JobError, resume_job
from engine.plan.model import PlanError
from engine.recipe.model import RecipeError

from .attach import attach


def register(subparsers) -> None:
    p = subparsers.add_parser("resume", help="continue an interrupted merge job", description=__doc__)
    p.add_argument("job", metavar="ID", help="job id (or a unique prefix or suffix of it)")
    p.add_argument("--attach", action="store_true", help="show its progress until it ends (Ctrl-C detaches)")
    p.set_defaults(run=run)


def print_problems(error: PlanError) -> None:
    for problem in error.problems:
        print(f"  {problem.severity.label}: {problem.message}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    try:
        job = resume_job(args.job)
    except PlanError as e:
        print(f"astolfo resume: job {args.job}: its recipe cannot be merged now:", file=sys.stderr)
        print_problems(e)
        return 2
    except (JobError, RecipeError) as e:
        print(f"astolfo resume: {e}", file=sys.stderr)
        return 1
    print(job.id, flush=True)
    if args.attach:
        return attach(job.id)
    return 0
