"""How fast the app opens and reacts with a big folder: 200 (or --models N) small synthetic SDXL
checkpoints (real key set, shapes shrunk by 256), the real app under ``run_test``.

Measured side by side in one run:
- scan: ``engine.library.scan.scan`` of the folder (headers only), with the report cache empty and warm;
- open: app start until every row is in the grid (scan included, hashing not waited for), on
  a first visit (report cache empty) and on a reopen (unchanged files come from the cache);
- toggle: one space press until the cell and the header total are updated (``update_cell``),
  against rebuilding the whole table for the same change (what a naive grid would do);
- column: ``c`` on a 200-row column.

Prints a table and writes the "## tui" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import write_section  # noqa: E402 (bench/ is on sys.path when run as a script)

from engine.library.scan import scan
from engine.synth import checkpoints as synth

SECTION = "## tui"


def make_folder(folder: Path, n: int) -> None:
    for i in range(n):
        path = folder / f"_x{i + 1:03d}-model.safetensors"
        if not path.exists():
            synth.write_checkpoint(path, synth.SynthSpec(scale=256, seed=i + 1))


async def measure(folder: Path, n: int, repeats: int) -> dict[str, list[float]]:
    from textual.coordinate import Coordinate

    from astolfo_tui.app import AstolfoApp
    from astolfo_tui.screens import library
    from astolfo_tui.widgets.selection_grid import SEL, SelectionGrid
    from engine.library.report_cache import default_path as report_cache_path

    out: dict[str, list[float]] = {
        k: [] for k in ("cold", "first", "open", "whole", "build", "noop", "toggle", "update_cell", "rebuild", "column")
    }
    streaming = library.STREAM_FIRST_S
    for _ in range(repeats):  # the two ways of opening, interleaved so that load hits both alike
        for variant in ("cold", "whole", "open"):
            if variant == "cold":  # a first visit: nothing cached yet
                for suffix in ("", "-wal", "-shm"):
                    Path(str(report_cache_path()) + suffix).unlink(missing_ok=True)
            library.STREAM_FIRST_S = 1e9 if variant == "whole" else streaming
            app = AstolfoApp([folder], reattach=False)
            start = time.perf_counter()
            async with app.run_test(size=(160, 48)):
                while not (app.library and app.library.query_one(SelectionGrid).row_count > 0):
                    await asyncio.sleep(0.002)
                if variant == "open":
                    out["first"].append(time.perf_counter() - start)
                while not (app.library and app.library.query_one(SelectionGrid).row_count == n):
                    await asyncio.sleep(0.002)
                out[variant].append(time.perf_counter() - start)
    library.STREAM_FIRST_S = streaming
    app = AstolfoApp([folder], reattach=False)  # one session for the per-key timings
    async with app.run_test(size=(160, 48)) as pilot:
        while not (app.library and app.library.scan_complete):
            await asyncio.sleep(0.002)
        grid = app.library.query_one(SelectionGrid)
        for i in range(3):
            t = time.perf_counter()
            grid.rebuild()
            out["build"].append(time.perf_counter() - t)
        while not app.library.hashing_complete:
            await asyncio.sleep(0.01)  # toggles are timed with hashing finished
        await pilot.pause(0.2)
        grid.cursor_coordinate = Coordinate(0, grid.get_column_index(SEL + "te0"))
        await pilot.pause(0.2)
        for key, name in (("z", "noop"), ("space", "toggle")):
            for i in range(10):
                t = time.perf_counter()
                await pilot.press(key)
                out[name].append(time.perf_counter() - t)
        for i in range(10):
            t = time.perf_counter()
            grid.toggle("te0", grid.state.order[1])
            out["update_cell"].append(time.perf_counter() - t)
        for i in range(3):
            t = time.perf_counter()
            grid.state.toggle("te0", grid.state.order[1])
            grid.rebuild()
            out["rebuild"].append(time.perf_counter() - t)
        grid.cursor_coordinate = Coordinate(0, grid.get_column_index(SEL + "unet"))
        await pilot.pause(0.2)
        for i in range(4):
            t = time.perf_counter()
            await pilot.press("c")
            out["column"].append(time.perf_counter() - t)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "astolfo-bench-tui")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    folder = args.dir / str(args.models)
    folder.mkdir(parents=True, exist_ok=True)
    make_folder(folder, args.models)
    with tempfile.TemporaryDirectory() as tmp:  # private cache/state/config: never the user's
        for var in ("ASTOLFO_CACHE_DIR", "ASTOLFO_STATE_DIR", "ASTOLFO_CONFIG_DIR"):
            os.environ[var] = str(Path(tmp) / var.lower())
        scans: dict[str, list[float]] = {"scan_cold": [], "scan": []}
        for _ in range(args.repeats):
            for name, use_cache in (("scan_cold", False), ("scan", True)):
                t = time.perf_counter()
                scan([folder], use_cache=use_cache)
                scans[name].append(time.perf_counter() - t)
        timings = asyncio.run(measure(folder, args.models, args.repeats))
    timings.update(scans)
    med = {k: statistics.median(v) * 1000 for k, v in timings.items()}
    rows = [
        (
            "scan, every header read (engine.library.scan, no cache)",
            med["scan_cold"],
            "the engine's share of a first visit",
        ),
        ("scan, unchanged files from the report cache", med["scan"], "the engine's share of a reopen"),
        ("first visit: app start until every row is in the grid", med["cold"], "report cache empty"),
        ("reopen: app start until the first rows show", med["first"], "rows stream in while the scan goes on"),
        ("reopen: app start until every row is in the grid", med["open"], "includes the whole scan"),
        ("reopen, rows shown only when the scan is done", med["whole"], "what streaming costs or saves in total"),
        (f"build the grid from {args.models} reports", med["build"], "the app's own share of opening"),
        ("key press that does nothing (Pilot's own waits)", med["noop"], "baseline for the next two rows"),
        ("space: toggle one cell, screen redrawn", med["toggle"], "only the changed cell and total re-render"),
        (f"c: toggle a whole column ({args.models} cells), screen redrawn", med["column"], ""),
        (
            "toggle call alone (the cell and its column total)",
            med["update_cell"],
            "rendering happens on the next frame",
        ),
        (
            "same change by rebuilding the table",
            med["rebuild"],
            f"{med['rebuild'] / med['update_cell']:.0f}x the toggle call",
        ),
    ]
    machine = (
        f"{platform.node() or 'this machine'}: {os.cpu_count()} CPUs, {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}, load average {load_before:.1f} at the start and "
        f"{os.getloadavg()[0]:.1f} at the end "
        "(other work on the machine shows up in every row)"
    )
    lines = [
        SECTION,
        "",
        f"`python bench/bench_tui.py --models {args.models}` — {args.models} synthetic SDXL files "
        "(full key set, 1/256 shapes), "
        f"the real app under Textual's run_test at 160x48, median of {args.repeats} opens each way / "
        "10 key presses / 4 column toggles. "
        f"Machine: {machine}.",
        "",
        "| what | ms | note |",
        "|---|---:|---|",
        *[f"| {what} | {ms:,.2f} | {note} |" for what, ms, note in rows],
        "",
    ]
    text = "\n".join(lines)
    print(text)
    write_section(ROOT / "docs" / "benchmarks.md", text)


if __name__ == "__main__":
    main()
