"""Keeping astolfo's own outputs apart from the models they are made from.

A folder that is scanned recursively must not fill up with earlier mixes posing as new models
(ticked by a bulk action into the next mix, hashed while a running merge writes them). So:

- ``default_output_dir``: where outputs go unless the user says otherwise: a configured folder,
  else ``mixes/`` beside the first opened folder; never inside any opened folder;
- ``is_astolfo_output``: a file astolfo wrote, recognised by the metadata every output carries
  (``astolfo.version`` and ``astolfo.sources``), whatever it is called and wherever it lies;
- ``busy_outputs``: the files live merges are writing now (their held output locks), which the
  scan leaves out. ``*.partial`` files are never listed at all (``engine.library.scan``).
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

OUTPUT_MARKERS = ("astolfo.version", "astolfo.sources")
MIXES = "mixes"


def is_astolfo_output(metadata: dict[str, str] | None) -> bool:
    """Whether a file's safetensors metadata says astolfo wrote it."""
    return bool(metadata) and all(k in metadata for k in OUTPUT_MARKERS)


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def default_output_dir(folders: list[Path], configured: str | os.PathLike | None = None) -> Path:
    """The folder new outputs go in: ``configured`` when given, else ``mixes/`` beside the
    first opened folder (beside the file when a file was opened); when that lies inside an
    opened folder, ``mixes/`` under the user data dir."""
    if configured:
        return Path(os.path.abspath(Path(configured).expanduser()))
    opened = [Path(os.path.abspath(Path(p).expanduser())) for p in folders]
    roots = [p if p.is_dir() else p.parent for p in opened]
    candidates = [roots[0].parent / MIXES] if roots else []
    base = os.environ.get("ASTOLFO_DATA_DIR") or platformdirs.user_data_dir("astolfo")
    candidates.append(Path(os.path.abspath(base)) / MIXES)
    for candidate in candidates:
        if not any(_inside(candidate, r) for r in roots):
            return candidate
    return candidates[-1]


def busy_outputs() -> set[str]:
    """Resolved paths of the files live merges are writing (empty when none or unknown)."""
    try:
        from engine.jobs.store import busy_outputs as held  # here: a scan that finds no job pays nothing

        return held()
    except Exception:  # an unreadable state dir must not stop a scan
        return set()
