"""The ``astolfo`` command line. Each subcommand lives in ``astolfo_tui/commands/<name>.py``
and exposes ``register(subparsers)``; the parser it adds sets ``run=function(args) -> int``.

``astolfo [DIR...]`` with no subcommand opens the app on those folders.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from engine.long_lived import freeze_imports

# Subcommand modules, in the order ``astolfo --help`` lists them.
COMMANDS = ["open", "demo", "scan", "hash", "compare", "merge", "jobs", "attach", "cancel", "resume"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # usage errors exit 2, as argparse does, but cleanly
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``only``, just that subcommand's module is imported (each module pulls
    in the engine parts it needs, so ``astolfo jobs`` need not pay for torch)."""
    parser = _Parser(prog="astolfo", description="Build Stable Diffusion XL mixes: scan, select, merge.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in [only] if only else COMMANDS:
        importlib.import_module(f"astolfo_tui.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None, process: bool = False) -> int:
    """Run one command; ``process``: this is the ``astolfo`` process itself (``entry``), not a
    caller such as a test, so the imported modules may be frozen for its lifetime."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["open", *argv]
    parser = build_parser(only=argv[0] if argv[0] in COMMANDS else None)
    args = parser.parse_args(argv)
    if process:
        freeze_imports()  # the command's modules are imported: no collection walks them again
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def entry() -> None:
    sys.exit(main(process=True))


if __name__ == "__main__":
    entry()
