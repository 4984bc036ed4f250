"""Snapshot testing for the app's screens without extra plugins: the SVG that
``App.export_screenshot()`` gives is compared with the one stored in ``tests/tui/snapshots/``.

(pytest-textual-snapshot would pin pytest below 9 for the whole project, so this small harness
does the same job.) What varies from run to run is made fixed before comparing: the random part
of the session's temporary folder (its length is fixed, so layouts do not move) and the SVG's
content-derived ids.

Screens are drawn by Textual and Rich, so the stored SVGs hold for the versions recorded in
``snapshots/VERSIONS``; under other versions the comparison is skipped (with the reason) rather
than failing on a library's drawing change.

To accept new screens after a deliberate change, run
    ASTOLFO_UPDATE_SNAPSHOTS=1 .venv/bin/pytest tests/tui/test_snapshots.py
and look at the SVGs (a browser renders them) before committing them.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import os
import re
from pathlib import Path

import pytest

SNAPSHOT_DIR = Path(__file__).parent / "snapshots"
UPDATE_ENV = "ASTOLFO_UPDATE_SNAPSHOTS"


def normalise(svg: str, tmp_root: Path) -> str:
    svg = svg.replace(
        str(tmp_root), re.sub(r"[^/]+$", lambda m: "astolfo-tui-" + "X" * (len(m.group(0)) - 12), str(tmp_root))
    )
    return re.sub(r"terminal-\d+", "terminal", svg)


def _visible_text(svg: str) -> list[str]:
    """The text lines of an SVG screenshot, for a readable diff."""
    rows: dict[str, list[str]] = {}
    for match in re.finditer(r'<text class="[^"]*" x="[^"]*" y="([^"]*)"[^>]*>([^<]*)</text>', svg):
        rows.setdefault(match.group(1), []).append(match.group(2).replace("&#160;", " "))
    return ["".join(parts).rstrip() for parts in rows.values()]


VERSIONS = SNAPSHOT_DIR / "VERSIONS"


def drawing_versions() -> str:
    return "".join(f"{name} {importlib.metadata.version(name)}\n" for name in ("textual", "rich"))


def assert_snapshot(app, name: str, tmp_root: Path, out_dir: Path) -> None:
    actual = normalise(app.export_screenshot(title="astolfo"), tmp_root)
    path = SNAPSHOT_DIR / f"{name}.svg"
    if os.environ.get(UPDATE_ENV) == "1":
        SNAPSHOT_DIR.mkdir(exist_ok=True)
        VERSIONS.write_text(drawing_versions(), "utf-8")
    elif VERSIONS.exists() and VERSIONS.read_text("utf-8") != drawing_versions():
        pytest.skip(
            f"snapshots were drawn by {VERSIONS.read_text('utf-8').strip()!r}, this is {drawing_versions().strip()!r}; "
            f"{UPDATE_ENV}=1 redraws them"
        )
    if os.environ.get(UPDATE_ENV) == "1" or not path.exists():
        if os.environ.get(UPDATE_ENV) != "1":
            got = out_dir / f"{name}.svg"
            got.write_text(actual, "utf-8")
            raise AssertionError(f"no stored snapshot {path}; this run's is {got} (set {UPDATE_ENV}=1 to store it)")
        SNAPSHOT_DIR.mkdir(exist_ok=True)
        path.write_text(actual, "utf-8")
        return
    expected = path.read_text("utf-8")
    if actual != expected:
        got = out_dir / f"{name}.svg"
        got.write_text(actual, "utf-8")
        diff = "\n".join(
            difflib.unified_diff(_visible_text(expected), _visible_text(actual), "stored", "now", lineterm="", n=1)
        )
        raise AssertionError(
            f"screen {name!r} differs from {path} (this run's: {got}; "
            f"{UPDATE_ENV}=1 accepts it)\n{diff or '(same text, different styles or layout)'}"
        )
