"""``astolfo demo [--dir DIR]``: build a folder of small synthetic SDXL models (clean ones, one
of each common breakage, a LoRA, a truncated download) and open the app on it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import platformdirs

from ..launch import launch_app


def default_demo_dir() -> Path:
    """``<user data dir>/demo``; ``ASTOLFO_DATA_DIR`` replaces the user data dir."""
    base = os.environ.get("ASTOLFO_DATA_DIR") or platformdirs.user_data_dir("astolfo")
    return Path(base) / "demo"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="create built-in demo models and open the app on them",
        description="Create a folder of small synthetic SDXL checkpoints (about 100 MB) and open the app on it.",
    )
    parser.add_argument("--dir", type=Path, default=None, help=f"where to put them (default: {default_demo_dir()})")
    parser.set_defaults(run=run)


def run(args) -> int:
    folder = args.dir or default_demo_dir()
    print(f"demo models in {folder}", file=sys.stderr)
    try:
        from engine.synth.demo import make_demo_folder

        paths = make_demo_folder(folder)
    except OSError as e:
        print(f"astolfo demo: cannot create demo models in {folder}: {e.strerror or e}", file=sys.stderr)
        return 1
    _mark_demo_base(paths[0])
    from engine.synth.demo import RECIPE

    return launch_app([folder], recipe=folder / RECIPE)


def _mark_demo_base(path: Path) -> None:
    """The demo's synthetic "SDXL base" plays the real one: mark it as the =sd reference so the
    models that kept its text encoders show =sd (the real base is recognised by its SHA256)."""
    import hashlib

    from engine.hashes.catalog import Catalog, CatalogError

    try:
        with open(path, "rb") as f:
            sha256 = hashlib.file_digest(f, "sha256").hexdigest()
        with Catalog() as catalog:
            catalog.mark_reference(sha256, "demo SDXL base (synthetic)")
    except (OSError, CatalogError) as e:
        print(f"astolfo demo: could not mark {path.name} as the =sd reference: {e}", file=sys.stderr)
