"""Where ``astolfo DIR...`` and ``astolfo demo`` end up: the Textual app on those folders
(with no folder given, the ones opened last time).

Without a terminal to draw on (output piped or redirected, CI) the scan table is printed
instead, so both commands still show what the app would open.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from engine.library.scan import scan

from .config import remembered_folders
from .scan_table import render_scan, scan_summary


def launch_app(paths: Sequence[str | Path], recipe: Path | None = None) -> int:
    """Open the app on ``paths`` (with ``recipe`` loaded when there is no earlier session on
    them); returns the process exit status."""
    if sys.stdin.isatty() and sys.stdout.isatty():
        from .app import run_app  # Textual is imported only when there is a screen to draw on

        return run_app([Path(p) for p in paths], recipe=recipe)
    return print_scan(paths)


def print_scan(paths: Sequence[str | Path]) -> int:
    """The fallback view: the scan table of ``paths``. Broken models are expected here (the demo
    has some on purpose), so only a usage problem gives a non-zero status."""
    paths = list(paths) or [p for p in remembered_folders() if p.exists()]
    if not paths:
        print("usage: astolfo DIR...   (or `astolfo demo` for built-in demo models)", file=sys.stderr)
        return 2
    try:
        reports = scan(paths)
    except FileNotFoundError as e:
        print(f"astolfo: {e}", file=sys.stderr)
        return 2
    console = Console()
    if reports:
        render_scan(console, reports)
    console.print(scan_summary(reports, [str(p) for p in paths]))
    return 0
