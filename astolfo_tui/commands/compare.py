"""``astolfo compare DIR...|RECIPE [--reference MODEL] [--component C] [--device D] [--json] [--csv F] [--png F]``:
which models are alike, which are clones, mixes or outliers, per component and UNet block,
from one read of every file (see ``engine.compare``). Results are cached by the files' SHA256
and the reference, so a second run reads no tensor data.

Exit status: 0 when the comparison ran (findings are not errors), 1 if no model could be
compared, 2 on usage errors (no paths, a path or reference that does not exist, a device this
machine lacks, a --csv or --png file that cannot be written).
"""

from __future__ import annotations

import csv
import json
import os
import sys
import threading
from pathlib import Path

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from engine.compare.blocks import COMPONENTS
from engine.compare.events import BadDevice, CompareCancelled, CompareError, PassStarted, Progress, UnknownReference
from engine.compare.result import describe, model_codes
from engine.compare.run import compare

from ..cli import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="which models are alike, clones, mixes or outliers (per component and UNet block)",
        description="Compare the models of folders or of a recipe against a reference (--reference, "
        "else a model marked =sd such as SDXL base, else the mean of the models): norms of their "
        "deltas, pairwise cosines, agreement with the consensus, leave-one-out influence, and "
        "findings (unchanged, identical, near_duplicate, combination, outlier, family). One read "
        "of every file; results are cached.",
    )
    parser.add_argument("paths", nargs="+", metavar="DIR|RECIPE",
                        help="folders (searched recursively), model files, or one recipe (.toml)")
    parser.add_argument("--reference", metavar="MODEL", help="the reference: a model id or a file path")
    parser.add_argument("--component", choices=COMPONENTS, action="append",
                        help="only this component (repeatable; default: all)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--csv", metavar="FILE", help="also write one row per component, block and model")
    parser.add_argument("--png", metavar="FILE",
                        help="also draw a heatmap of cosines (grid order) and a dendrogram per component")
    parser.add_argument("--device", default="auto", metavar="auto|cpu|cuda|cuda:N",
                        help="where the deltas are reduced (default auto: the first CUDA GPU if torch sees one)")
    parser.add_argument("--no-cache", action="store_true", help="neither use nor store cached results")
    parser.set_defaults(run=run)


def _reports(paths: list[str]):
    """Reports in grid order: a recipe's models in its order, else the scan of the folders."""
    if len(paths) == 1 and paths[0].endswith(".toml") and os.path.isfile(paths[0]):
        from engine.library.diagnose import inspect_file
        from engine.recipe.toml_file import load_recipe

        recipe = load_recipe(paths[0])
        out = []
        for entry in recipe.models.values():
            path = entry.path if entry.path.is_absolute() else recipe.base_dir / entry.path
            if not path.exists():
                raise FileNotFoundError(f"{entry.id}: {path} does not exist")
            out.append(inspect_file(path, model_id=entry.id))
        return out
    from engine.library.scan import scan

    return scan(paths)


def _only(result: dict, components: list[str] | None) -> dict:
    if not components:
        return result
    return dict(result, components={c: v for c, v in result["components"].items() if c in components},
                findings=[f for f in result["findings"] if f["component"] in components])


def run(args) -> int:
    err = Console(stderr=True)
    try:
        reports = _reports(args.paths)
    except FileNotFoundError as e:
        print(f"astolfo compare: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # a recipe that does not parse
        from engine.recipe.model import RecipeError

        if isinstance(e, RecipeError):
            print(f"astolfo compare: {e}", file=sys.stderr)
            return EXIT_USAGE
        raise
    for option, target in (("--csv", args.csv), ("--png", args.png)):
        problem = _unwritable(target) if target else None
        if problem:  # said before the files are read, not after
            print(f"astolfo compare: cannot write {option} {target}: {problem}", file=sys.stderr)
            return EXIT_USAGE
    cancel = threading.Event()
    status = err.status("comparing", spinner="dots") if err.is_terminal and not args.json else None

    where = ""

    def on_event(e) -> None:
        nonlocal where
        if isinstance(e, PassStarted):
            where = f" on {e.device}"
        if status is not None and isinstance(e, Progress) and e.total:
            status.update(f"comparing{where}: {e.component} {e.done / e.total:.0%}")

    try:
        if status is not None:
            status.start()
        try:
            result = compare(reports, reference=args.reference, cancel=cancel, on_event=on_event,
                             use_cache=not args.no_cache, device=args.device)
        finally:
            if status is not None:
                status.stop()
    except (UnknownReference, BadDevice) as e:
        print(f"astolfo compare: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        cancel.set()
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except CompareCancelled:
        return EXIT_INTERRUPTED
    except CompareError as e:
        for x in _left_out_of(reports, e):
            err.print(x)
        print(f"astolfo compare: {e}", file=sys.stderr)
        return EXIT_FAILED
    result = _only(result, args.component)
    if args.csv:
        try:
            write_csv(result, args.csv)
        except OSError as e:
            print(f"astolfo compare: cannot write {args.csv}: {e.strerror or e}", file=sys.stderr)
            return EXIT_USAGE
    if args.png:
        try:
            from ..compare_png import write_png  # matplotlib only when a picture is asked for

            write_png(result, args.png)
        except ImportError as e:
            print(f"astolfo compare: --png needs matplotlib ({e}); pip install matplotlib", file=sys.stderr)
            return EXIT_USAGE
        except OSError as e:
            print(f"astolfo compare: cannot write {args.png}: {e.strerror or e}", file=sys.stderr)
            return EXIT_USAGE
    if args.json:
        sys.stdout.write(json.dumps(result, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    else:
        render(Console(), result)
    return EXIT_OK


def _unwritable(target: str) -> str | None:
    """Why ``target`` cannot be written as a file, or None when it looks writable."""
    path = Path(target).expanduser()
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        return "it is a folder"
    if not parent.is_dir():
        return f"no such folder {parent}"
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        return "permission denied"
    return None


def _left_out_of(reports, error) -> list[str]:
    """When nothing could be compared, the files that were broken, by name and reason."""
    from engine.compare.run import _problem

    out = []
    for r in reports:
        why = _problem(r)
        if why:
            out.append(f"[yellow]left out[/] {escape(r.model_id)} ({escape(str(r.path))}): {escape(why)}")
    return out


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def render(console: Console, result: dict) -> None:
    ref = result["reference"]
    console.print(f"reference: [bold]{escape(ref) if ref else 'the mean of the models'}[/]")
    for comp, entry in result["components"].items():
        codes = model_codes(result, comp)
        table = Table(title=comp, box=box.SIMPLE_HEAD, title_justify="left")
        for name in ("model", "norm", "rel. norm", "consensus", "influence", "findings"):
            table.add_column(name, justify="left" if name in ("model", "findings") else "right")
        for i, m in enumerate(entry["models"]):
            table.add_row(escape(m), _num(entry["norm"][i], ".4g"), _num(entry["relative_norm"][i], ".3%"),
                          _num(entry["consensus"][i], "+.3f"), _num(entry["influence"][i], ".3%"),
                          escape(", ".join(codes.get(m, []))))
        console.print(table)
    if result["findings"]:
        console.print("[bold]findings[/]")
        for f in result["findings"]:
            where = f["component"] + (f" {f['block']}" if f["block"] else "")
            console.print(f"  {escape(where)}  [cyan]{f['code']}[/]  {escape(describe(f))}")
    for x in result["left_out"]:
        what = f" ({x['component']})" if x.get("component") else ""
        console.print(f"[yellow]left out[/] {escape(x['id'])}{escape(what)}: {escape(x['reason'])}")


def write_csv(result: dict, path: str) -> None:
    with open(Path(path), "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["component", "block", "model", "norm", "relative_norm", "consensus", "influence"])
        for comp, entry in result["components"].items():
            groups = [(None, entry), *entry.get("blocks", {}).items()]
            for block, e in groups:
                for i, m in enumerate(e["models"]):
                    w.writerow([comp, block or "", m, e["norm"][i], e["relative_norm"][i], e["consensus"][i],
                                e["influence"][i]])
