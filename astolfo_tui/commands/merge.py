"""``astolfo merge RECIPE``: check a recipe and merge it in the foreground, or with ``--detach``
as a job that outlives the terminal (``astolfo jobs``, ``attach``, ``cancel``, ``resume``).

Progress is a Rich display on a terminal and JSON lines (one engine event per line, the same
events a detached job logs) when stdout is not a terminal or with ``--json``. ``--check`` only
validates the recipe and lists every problem. ``--resume`` continues an interrupted merge of the
same recipe from its partial files.

Exit codes: 0 done, 1 the merge failed, 2 the recipe is invalid, 130 interrupted (Ctrl-C, SIGTERM
or a lost terminal stop the merge cleanly: no output file and no partial file are left).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.table import Table
from rich.text import Text

from engine.library.report import Severity
from engine.merge.events import event_to_dict
from engine.merge.run import MergeCancelled, MergeError, execute
from engine.plan.model import MergePlan, PlanError, Problem
from engine.plan.planner import build_plan, check_recipe
from engine.recipe.model import Recipe, RecipeError
from engine.recipe.toml_file import load_recipe_lenient

from ..job_view import JobView, duration

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130
_STYLE = {Severity.ERROR: "bold red", Severity.WARNING: "yellow", Severity.OK: "dim"}


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("merge", help="merge the models of a recipe", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", type=Path, help="recipe TOML file")
    p.add_argument("--check", action="store_true", help="only validate the recipe and list every problem")
    p.add_argument("--json", action="store_true", help="JSON lines on stdout (the default when it is not a terminal)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted merge of this recipe")
    p.add_argument("--detach", action="store_true",
                   help="check the recipe, then merge it as a background job that survives the terminal "
                        "closing (an SSH disconnect); prints the job id at once")
    p.add_argument("--read-limit", type=parse_rate, metavar="RATE",
                   help="read the models at most this fast, e.g. 200M or 1.5G (bytes/s), to spare a shared disk")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    out = _Output(json_mode=args.json or not sys.stdout.isatty())
    recipe, structural = load_recipe_lenient(args.recipe)
    if structural:
        out.recipe_error(RecipeError(args.recipe, structural))
        if recipe is not None:  # every problem of the file at once, not only the first kind
            try:
                later = check_recipe(recipe)
            except Exception:
                later = []
            restated = {"no_models", "no_outputs", "no_name", "no_sources"}  # the structural list has them
            out.problems([p for p in later if p.severity >= Severity.WARNING and p.code not in restated], args.recipe)
        return EXIT_INVALID
    if args.check:
        return check(recipe, out)
    if args.detach:
        return detach(args.recipe, out, args.read_limit, json_ids=args.json)
    try:
        plan = build_plan(recipe)
    except PlanError as e:
        out.problems(e.problems, args.recipe)
        return EXIT_INVALID
    return merge_exclusively(plan, out, resume=args.resume, read_limit=args.read_limit)


def merge_exclusively(plan: MergePlan, out: "_Output", resume: bool = False, read_limit: float | None = None) -> int:
    """``merge`` while holding the outputs' locks, the ones detached jobs hold: a foreground
    merge and a job never write (and truncate) the same partial file at once."""
    import os

    from engine.jobs.launch import OutputBusy, output_locks

    try:
        with output_locks([o.path for o in plan.outputs], f"a foreground `astolfo merge` (pid {os.getpid()})"):
            return merge(plan, out, resume=resume, read_limit=read_limit)  # plan warnings arrive as warning events
    except OutputBusy as e:
        if out.json_mode:
            out._json({"type": "problem", "severity": "error", "code": "output_busy", "message": str(e)})
        else:
            print(f"astolfo merge: {e}", file=sys.stderr)
        return EXIT_FAILED


_RATE_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30}


def parse_rate(text: str) -> float:
    """Bytes per second from ``200M``, ``1.5G``, ``64MiB/s``, ``500000``."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmg]i?)?b?(?:/s)?\s*", text.lower())
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate like 200M or 1.5G (bytes per second)")
    return float(m.group(1)) * _RATE_UNITS[m.group(2) or ""]


def detach(recipe_path: Path, out: "_Output", read_limit: float | None, json_ids: bool) -> int:
    """Start the merge as a detached job (``engine.jobs.launch.start_job``, the TUI's launch path too)
    and print its id on stdout at once: ``id=$(astolfo merge r.toml --detach)`` works."""
    from engine.jobs.launch import JobError, start_job

    try:
        job = start_job(recipe_path, read_limit=read_limit)
    except RecipeError as e:
        out.recipe_error(e)
        return EXIT_INVALID
    except PlanError as e:
        out.problems(e.problems, recipe_path)
        return EXIT_INVALID
    except JobError as e:
        if json_ids:
            out._json({"type": "problem", "severity": "error", "code": "job", "message": str(e)})
        else:
            print(f"astolfo merge: {e}", file=sys.stderr)
        return EXIT_FAILED
    if json_ids:
        out._json({"type": "job", "id": job.id, "dir": str(job.dir), "outputs": [str(p) for p in job.outputs]})
    else:
        print(job.id, flush=True)
        if sys.stderr.isatty():
            Console(stderr=True).print(f"[dim]merging in the background: `astolfo attach {job.id}` shows progress,"
                                       f" `astolfo jobs` lists jobs[/]", highlight=False)
    return EXIT_OK


def check(recipe: Recipe, out: "_Output") -> int:
    problems = check_recipe(recipe)
    errors = [p for p in problems if p.severity >= Severity.ERROR]
    plan = None
    if not errors:
        try:
            plan = build_plan(recipe)
        except PlanError as e:
            problems, errors = e.problems, [p for p in e.problems if p.severity >= Severity.ERROR]
    out.problems(problems, recipe.name)
    out.summary(plan, errors)
    return EXIT_INVALID if errors else EXIT_OK


def merge(plan: MergePlan, out: "_Output", resume: bool = False, read_limit: float | None = None) -> int:
    cancel = threading.Event()
    with _stop_on_signals(cancel), out.live():
        try:
            execute(plan, on_event=out.event, cancel=cancel, resume=resume, read_limit=read_limit)
        except MergeCancelled:
            out.end("interrupted: no output file was written")
            return EXIT_INTERRUPTED
        except MergeError:  # the failed event has the message
            return EXIT_FAILED
    return EXIT_OK


@contextmanager
def _stop_on_signals(cancel: threading.Event):
    """Ctrl-C, SIGTERM and SIGHUP (the terminal went away) ask the merge to stop cleanly."""
    handled = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in handled:
            previous[sig] = signal.signal(sig, lambda *_: cancel.set())
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Output:
    """Everything the command prints: JSON lines, or Rich text and live progress."""

    def __init__(self, json_mode: bool):
        self.json_mode = json_mode
        self.console = Console(stderr=json_mode)
        self.view = JobView()
        self.display: _Display | None = None

    def _json(self, obj: dict) -> None:
        try:
            print(json.dumps(obj), flush=True)
        except (OSError, ValueError):  # stdout went away: keep merging
            pass

    def recipe_error(self, e: RecipeError) -> None:
        if self.json_mode:
            for reason in e.reasons:
                self._json({"type": "problem", "severity": "error", "code": "recipe", "message": reason,
                            "file": e.path})
            return
        self.console.print(f"[bold red]{escape(e.path)}: the recipe cannot be read[/]")
        for reason in e.reasons:
            self.console.print(f"  [red]error[/]: {escape(reason)}", highlight=False)

    def problems(self, problems: list[Problem], where, quiet_notes: bool = False) -> None:
        shown = [p for p in problems if not (quiet_notes and p.severity == Severity.OK)]
        if self.json_mode:
            for p in shown:
                self._json({"type": "problem", **p.to_dict()})
            return
        for p in sorted(shown, key=lambda p: -p.severity):
            label = {Severity.OK: "note"}.get(p.severity, p.severity.label)
            self.console.print(f"  [{_STYLE[p.severity]}]{label}[/]: {escape(p.message)}", highlight=False)

    def summary(self, plan: MergePlan | None, errors: list[Problem]) -> None:
        if self.json_mode:
            self._json({
                "type": "check", "ok": not errors, "errors": len(errors),
                "outputs": [str(o.path) for o in plan.outputs] if plan else [],
                "bytes_to_read": plan.bytes_to_read if plan else None,
                "bytes_to_write": plan.bytes_to_write if plan else None,
                "tensors": plan.tensor_count if plan else None,
            })
            return
        if errors:
            self.console.print(f"[bold red]{len(errors)} problem{'s' * (len(errors) != 1)}: "
                               "the recipe cannot be merged[/]")
            return
        table = Table(title="ready to merge", show_edge=False, header_style="bold")
        table.add_column("output")
        table.add_column("dtype")
        table.add_column("tensors", justify="right")
        table.add_column("size", justify="right")
        for o in plan.outputs:
            table.add_row(Text(str(o.path)), o.dtype, f"{len(o.tensors):,}", f"{o.data_bytes / 1e9:,.2f} GB")
        self.console.print(table)
        self.console.print(f"{len(plan.files)} source files, {plan.bytes_to_read / 1e9:,.2f} GB to read "
                           f"({plan.arch.name}, device {plan.device})", markup=False, highlight=False)

    @contextmanager
    def live(self):
        if self.json_mode:
            yield
            return
        self.display = _Display(self.console)
        with self.display.progress:
            yield
        self.display = None

    def event(self, e) -> None:
        if self.json_mode:
            self._json(event_to_dict(e))
        elif self.display is not None:
            self.display.apply(e)

    def end(self, message: str) -> None:
        if not self.json_mode:
            self.console.print(message, style="yellow", markup=False, highlight=False)


class _Display:
    """A bar for the merge (bytes read), one per output, and the log lines of JobView."""

    def __init__(self, console: Console):
        self.console = console
        self.view = JobView()
        self.progress = Progress(
            TextColumn("{task.description}", markup=False),
            BarColumn(bar_width=None),
            TaskProgressColumn(),
            TextColumn("{task.fields[detail]}", markup=False),
            console=console, expand=True,
        )
        self.overall = self.progress.add_task("starting", total=1, detail="")
        self.tasks: dict[str, int] = {}

    def apply(self, event) -> None:
        before = len(self.view.log)
        self.view.apply(event)
        for kind, line in list(self.view.log)[before:]:
            style = {"warning": "yellow", "error": "bold red", "ok": "green"}.get(kind, "dim")
            self.console.print(line, style=style, markup=False, highlight=False)
        self.refresh()

    def refresh(self) -> None:
        v = self.view
        done = v.bytes_total if v.final == "finished" else v.bytes_done
        parts = [f"{v.tensors_done:,}/{v.tensors_total:,} tensors",
                 f"{v.bytes_done / 1e9:,.2f}/{v.bytes_total / 1e9:,.2f} GB"]
        if v.gbps:
            parts.append(f"{v.gbps:,.2f} GB/s")
        if v.eta_s is not None:
            parts.append(f"ETA {duration(v.eta_s)}")
        if v.host_rss:
            parts.append(f"RAM {v.host_rss / 1e9:,.2f} GB")
        if v.card_mem_used is not None and v.card_mem_total:
            parts.append(f"card VRAM {v.card_mem_used / 1e9:,.1f}/{v.card_mem_total / 1e9:,.1f} GB")
        if v.process_mem_peak:
            parts.append(f"merge peak {v.process_mem_peak / 1e9:,.1f} GB")
        if v.detail and not v.final:
            parts.append(f"{v.current_key}: {v.detail}" if v.current_key else v.detail)
        self.progress.update(self.overall, description=v.stage, total=max(v.bytes_total, 1), completed=done,
                             detail="  ".join(parts))
        for path, state in v.outputs.items():
            task = self.tasks.get(path)
            if task is None:
                task = self.tasks[path] = self.progress.add_task(Path(path).name, total=1, detail="")
            text = "written" if state.done else f"{state.tensors_done:,}/{state.tensors_total:,} tensors"
            self.progress.update(task, total=max(state.bytes_total, 1),
                                 completed=state.bytes_total if state.done else state.bytes_done, detail=text)

