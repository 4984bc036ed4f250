"""``astolfo [DIR...]`` (also ``astolfo open DIR...``): open the app on model folders."""

from __future__ import annotations

from ..launch import launch_app


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "open",
        help="open the app on model folders (the default: `astolfo DIR...`)",
        description="Open the astolfo app on folders of checkpoints.",
    )
    parser.add_argument("paths", nargs="*", metavar="DIR", help="folders (searched recursively) or files")
    parser.set_defaults(run=run)


def run(args) -> int:
    return launch_app(args.paths)
