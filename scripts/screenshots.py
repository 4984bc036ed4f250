"""Render the README's screenshots from the real app on demo models.

    .venv/bin/python scripts/screenshots.py [--out screenshots]

Writes ``<out>/*.svg`` (Textual's own export) and, when headless Chromium is installed
(Debian: ``apt-get install chromium fonts-firacode``), ``<out>/*.png`` rendered from them.
Everything runs in a temporary folder with its own cache, state and config folders: the
user's catalog and jobs are not touched. The merge dashboard is shot during a real detached
merge of larger synthetic models (1/8 scale, ~100 MB each, written once into the temporary
folder) so that it runs long enough to be seen moving.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZE = (160, 48)
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium() -> str | None:
    return next((shutil.which(n) for n in CHROMIUM_NAMES if shutil.which(n)), None)


def to_png(svg: Path, browser: str) -> Path | None:
    """Chromium renders Textual's SVG faithfully (rsvg shifts cells, cairosvg changes font)."""
    import re

    box = re.search(r'viewBox="0 0 ([\d.]+) ([\d.]+)"', svg.read_text("utf-8"))
    width, height = (int(float(box.group(1))) + 1, int(float(box.group(2))) + 1) if box else (1970, 1222)
    png = svg.with_suffix(".png")
    with tempfile.TemporaryDirectory() as profile:
        cmd = [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--screenshot={png}",
            f"--window-size={width},{height}",
            svg.as_uri(),
        ]
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120, check=False)
    return png if png.exists() else None


def pick_demo(state) -> None:
    """A plausible first mix over the demo folder, in the article's spirit."""
    state.set_many("te0", ["_x01", "_x02", "_x03", "_x05", "_x10"], True)
    state.set_many("te1", ["_x01", "_x02", "_x04", "_x05", "_x07", "_x10"], True)
    state.set_many("unet", ["_x00", "_x01", "_x02", "_x03", "_x04", "_x05", "_x06", "_x07", "_x10", "_x14"], True)
    state.set_many("nsfw", ["_x02", "_x05", "_x07", "_x10"], True)
    state.set("vae", "_x00", True)


async def wait_for(pilot, predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the app did not get there in time")
        await pilot.pause(0.05)


async def shoot_library(demo: Path, out: Path) -> list[Path]:
    from textual.coordinate import Coordinate

    from astolfo_tui.app import AstolfoApp
    from astolfo_tui.widgets.selection_grid import SEL

    shots = []
    app = AstolfoApp([demo], reattach=False)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await wait_for(pilot, lambda: app.library is not None and app.library.hashing_complete)
        lib = app.library
        grid = lib.grid
        grid.cursor_coordinate = Coordinate(grid.get_row_index("_x00"), grid.get_column_index("id"))
        await pilot.press("equals_sign")  # SDXL base (synthetic) as the =sd reference
        await wait_for(pilot, lambda: any(v.same_as_reference for v in grid.hashes.values()))
        pick_demo(lib.state)
        lib.state.set_method("nsfw", {"method": "add_difference", "base": "_x00", "alpha": 0.5})
        lib.state.set_weight("_x02", 1.5)
        grid.rebuild()
        lib._refresh_status()
        grid.cursor_coordinate = Coordinate(grid.get_row_index("_x04"), grid.get_column_index(SEL + "te1"))
        await pilot.pause(0.4)
        app.clear_notifications()
        await pilot.pause(0.2)
        shots.append(save(app, out, "library"))
        grid.cursor_coordinate = Coordinate(grid.get_row_index("_x09"), grid.get_column_index(SEL + "unet"))
        await pilot.press("space")  # refused: NaN in that UNet
        await pilot.pause(0.4)
        shots.append(save(app, out, "refused"))
        app.clear_notifications()
        await pilot.press("w")
        await pilot.pause(0.3)
        shots.append(save(app, out, "notation"))
        await pilot.press("escape", "u")
        await pilot.pause(0.3)
        shots.append(save(app, out, "outputs"))
        await pilot.press("escape")
        grid.cursor_coordinate = Coordinate(grid.get_row_index("_x04"), grid.get_column_index(SEL + "unet"))
        await pilot.press("t")  # the method dialog, as the user fills it in
        await pilot.pause(0.3)
        app.screen.query_one("#method-choice").value = "dare"
        app.screen.query_one("#method-base").value = "_x00"
        app.screen.query_one("#param-drop").value = "0.1"
        app.screen.query_one("#param-seed").value = "114514"
        await pilot.pause(0.3)
        shots.append(save(app, out, "method"))
        await pilot.press("escape", "question_mark")
        await pilot.pause(0.3)
        shots.append(save(app, out, "help"))
        await pilot.press("escape")
        grid.cursor_coordinate = Coordinate(grid.get_row_index("_x01"), grid.get_column_index(SEL + "unet"))
        await pilot.press("v")  # the comparison against SDXL base (marked =sd above), in one read
        await wait_for(pilot, lambda: getattr(app.screen, "result", None) is not None and not app.screen.running)
        await pilot.pause(0.3)
        app.clear_notifications()
        shots.append(save(app, out, "compare"))
        await pilot.press("escape", "m")
        await wait_for(pilot, lambda: getattr(app.screen, "plan", None) is not None)
        await pilot.pause(0.3)
        shots.append(save(app, out, "merge-plan"))
    return shots


async def shoot_merge(big: Path, out: Path) -> list[Path]:
    from astolfo_tui.app import AstolfoApp

    for old in big.glob("mix*"):
        old.unlink()
    shots = []
    app = AstolfoApp([big], reattach=False)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await wait_for(pilot, lambda: app.library is not None and app.library.hashing_complete, timeout=600)
        state = app.library.state
        ids = state.order
        state.set_many("te0", ids[: len(ids) // 2], True)
        state.set_many("te1", ids[1:], True)
        state.set_many("unet", ids, True)
        state.set_many("nsfw", ids[::2], True)
        state.set("vae", ids[0], True)
        await pilot.press("m")
        await wait_for(pilot, lambda: getattr(app.screen, "plan", None) is not None)
        await pilot.press("l")
        screen = app.screen
        await wait_for(
            pilot,
            lambda: screen.job is not None and screen.view.stage == "merging" and screen.view.fraction > 0.55,
            timeout=600,
        )
        app.clear_notifications()
        await pilot.pause(0.1)
        shots.append(save(app, out, "merge-running"))
        await wait_for(pilot, lambda: screen.view.final is not None and not screen.job.is_active, timeout=600)
        await pilot.pause(0.5)
        shots.append(save(app, out, "merge-finished"))
        await pilot.press("j")
        await pilot.pause(0.5)
        shots.append(save(app, out, "jobs"))
    return shots


def save(app, out: Path, name: str) -> Path:
    path = out / f"{name}.svg"
    path.write_text(app.export_screenshot(title=f"astolfo — {name}"), "utf-8")
    return path


def make_big(folder: Path, count: int = 8) -> None:
    from engine.synth import checkpoints as synth

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, count + 1):
        path = folder / f"_x{i:02d}-Tune{i}.safetensors"
        if not path.exists():
            synth.write_checkpoint(path, synth.SynthSpec(scale=8, seed=i))


def main() -> int:
    parser = argparse.ArgumentParser(description="Render screenshots/*.svg (+ .png) from the real app.")
    parser.add_argument("--out", type=Path, default=ROOT / "screenshots")
    parser.add_argument("--skip-merge", action="store_true", help="leave out the running-merge screenshots")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="astolfo-") as tmp:
        tmp = Path(tmp)
        for var in ("ASTOLFO_CACHE_DIR", "ASTOLFO_STATE_DIR", "ASTOLFO_CONFIG_DIR"):
            os.environ[var] = str(tmp / var.lower())
        from engine.synth.demo import make_demo_folder

        demo = tmp / "demo"
        make_demo_folder(demo)
        shots = asyncio.run(shoot_library(demo, args.out))
        if not args.skip_merge:
            print("writing larger synthetic models for the running-merge shot…", file=sys.stderr)
            make_big(tmp / "models")
            shots += asyncio.run(shoot_merge(tmp / "models", args.out))
    browser = chromium()
    for svg in shots:
        png = to_png(svg, browser) if browser else None
        print(f"{svg.relative_to(ROOT) if svg.is_relative_to(ROOT) else svg}" + (f" + {png.name}" if png else ""))
    if not browser:
        print("no chromium found: SVGs only (apt-get install chromium fonts-firacode for PNGs)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
