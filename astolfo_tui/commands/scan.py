"""``astolfo scan DIR... [--json]``: what each model file is, read from headers only.

Exit status: 0 when every file is fine (warnings allowed), 1 when any file has an error, 2 on
usage errors (no paths, a path that does not exist).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace

from rich.console import Console

from engine.library.report import Severity
from engine.library.scan import scan

from ..cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from ..scan_table import render_scan, scan_summary


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "scan",
        help="list model files and what is wrong with them (reads headers only)",
        description="Scan folders (recursively) for model files and report, per file, its architecture, "
        "dtype, size, the state of each component and every problem found. Reads headers only.",
    )
    parser.add_argument("paths", nargs="+", metavar="DIR", help="folders (searched recursively) or files")
    parser.add_argument("--json", action="store_true", help="one JSON object per file (JSON lines)")
    parser.add_argument("-v", "--verbose", action="store_true", help="also show informational findings")
    parser.set_defaults(run=run)


def add_known_value_findings(reports) -> int:
    """The NaN/Inf findings the hash catalog already has for unchanged files, added to their
    reports (the scan reads headers only; values are checked by ``astolfo hash``). Returns how
    many of the files the catalog knows."""
    from engine.hashes.catalog import Catalog, default_catalog_path
    from engine.hashes.model import nonfinite_findings

    if not default_catalog_path().exists():
        return 0
    try:
        catalog = Catalog(read_only=True)
    except Exception:  # an unreadable catalog: the scan is still the scan
        return 0
    known = 0
    try:
        for report in reports:
            try:
                hashes = catalog.get(report.path)
            except Exception:
                hashes = None
            if hashes is None:
                continue
            known += 1
            for finding in nonfinite_findings(hashes):
                finding = replace(finding, message=f"{finding.message} (found by `astolfo hash`)")
                comp = report.components.get(finding.component or "")
                (comp.findings if comp is not None else report.findings).append(finding)
    finally:
        catalog.close()
    return known


def run(args) -> int:
    try:
        reports = scan(args.paths)
    except FileNotFoundError as e:
        print(f"astolfo scan: {e}", file=sys.stderr)
        return EXIT_USAGE
    hashed = add_known_value_findings(reports)
    if args.json:
        try:
            for report in reports:
                sys.stdout.write(json.dumps(report.to_dict(), ensure_ascii=False) + "\n")
            sys.stdout.flush()
        except BrokenPipeError:  # `astolfo scan --json | head`: the reader has all it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    else:
        console = Console()
        if reports:
            render_scan(console, reports, verbose=args.verbose)
        console.print(scan_summary(reports, args.paths, hashed=hashed))
    return EXIT_FAILED if any(r.severity >= Severity.ERROR for r in reports) else EXIT_OK
