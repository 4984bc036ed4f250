"""What every benchmark shares: naming the machine and replacing its own section of
docs/benchmarks.md (run the scripts as ``python bench/bench_X.py``)."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return 0.0


def write_section(path: Path, text: str) -> None:
    """Replace this bench's section (from its "## " heading to the next) leaving the others alone."""
    heading = text.split("\n", 1)[0]
    old = path.read_text("utf-8") if path.exists() else "# Benchmarks\n\n"
    start = old.find(heading + "\n")
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(heading))
        new = old[:start] + text + (old[end + 1 :] if end >= 0 else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new, "utf-8")


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


class Rows(list):
    """A benchmark's table rows, each also printed to stderr as it is made: a run cut short (a
    lent GPU's time running out) still leaves the rows it finished in its log."""

    def append(self, row: list[str]) -> None:
        super().append(row)
        print("  row: | " + " | ".join(row) + " |", file=sys.stderr, flush=True)


def child_path() -> str:
    """PYTHONPATH for an engine's process: the project first, then what this one was given
    (packages installed beside the system's, as bench/gpu_check.sh does on a lent GPU)."""
    return os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))
