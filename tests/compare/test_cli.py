"""``astolfo compare`` as a user runs it: a subprocess, the real catalog in the test's cache
folder, the JSON shape of the issue, the CSV, exit codes and escaped names."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.compare.blocks import UNET_BLOCKS
from engine.synth.checkpoints import truncate
from tests.merge_support import recipe_text, sdxl_output

from .support import build_models

ROOT = Path(__file__).resolve().parents[2]
GROUP_KEYS = {"models", "cosine", "norm", "relative_norm", "consensus", "influence"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("compare-cli")
    build_models(d)
    return d


def astolfo(*args, cache: Path):
    env = dict(os.environ, ASTOLFO_CACHE_DIR=str(cache))
    return subprocess.run([sys.executable, "-m", "astolfo_tui.cli", "compare", *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


def test_json_has_the_issue_shape_and_a_second_run_is_cached(folder, tmp_path):
    done = astolfo(folder, "--reference", "m01", "--json", cache=tmp_path)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["reference"] == "m01"
    assert list(out["components"]) == ["unet", "te0", "te1", "vae"]
    unet = out["components"]["unet"]
    assert GROUP_KEYS | {"blocks"} <= set(unet)
    assert unet["models"] == [f"m0{i}" for i in range(2, 9)]
    assert len(unet["cosine"]) == 7 and all(len(row) == 7 for row in unet["cosine"])
    assert list(unet["blocks"]) == list(UNET_BLOCKS)
    assert all(GROUP_KEYS <= set(b) for b in unet["blocks"].values())
    for f in out["findings"]:
        assert {"code", "component", "block", "models"} <= set(f)
    assert {"code": "combination", "component": "unet", "block": None,
            "models": ["m05", "m02", "m03"]}.items() <= next(
        f for f in out["findings"] if f["code"] == "combination" and f["component"] == "unet").items()
    again = astolfo(folder, "--reference", "m01", "--json", cache=tmp_path)
    assert again.returncode == 0
    assert json.loads(again.stdout) == out


def test_table_csv_and_one_component(folder, tmp_path):
    sheet = tmp_path / "out.csv"
    done = astolfo(folder, "--reference", "m01", "--component", "te0", "--csv", sheet, cache=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "te0" in done.stdout and "unchanged" in done.stdout and "m05 ~ 0.50 m02 + 0.50 m03" in done.stdout
    assert "unet" not in done.stdout
    rows = list(csv.DictReader(sheet.open()))
    assert {r["component"] for r in rows} == {"te0"}
    assert [r["model"] for r in rows] == [f"m0{i}" for i in range(2, 9)]
    assert float(rows[-1]["norm"]) == 0.0  # m08's te0 is the base's


def test_a_recipe_and_a_reference_path_with_markup_in_its_name(folder, tmp_path):
    ref = tmp_path / "[red]base.safetensors"
    shutil.copy(folder / "a00_base.safetensors", ref)
    models = {"fa": folder / "a01_ft_a.safetensors", "fb": folder / "a02_ft_b.safetensors",
              "mix": folder / "a04_mix_ab.safetensors"}
    recipe = tmp_path / "r.toml"
    recipe.write_text(recipe_text({k: str(v) for k, v in models.items()}, {"all": list(models)},
                                  [sdxl_output(str(tmp_path / "out.safetensors"))]))
    done = astolfo(recipe, "--reference", ref, cache=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "reference: [red]base" in done.stdout
    assert "mix ~ 0.50 fa + 0.50 fb" in done.stdout


def test_exit_codes(folder, tmp_path):
    assert astolfo(folder, "--reference", "nope", cache=tmp_path).returncode == 2
    assert astolfo(tmp_path / "missing", cache=tmp_path).returncode == 2
    assert astolfo(cache=tmp_path).returncode == 2
    bad = astolfo(folder, "--device", "gpu", cache=tmp_path)
    assert bad.returncode == 2 and "not one of auto, cpu, cuda" in bad.stderr
    import torch

    if not torch.cuda.is_available():
        none = astolfo(folder, "--device", "cuda", cache=tmp_path)
        assert none.returncode == 2 and "no CUDA GPU is available" in none.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("a01_ft_a", "a02_ft_b"):
        shutil.copy(folder / f"{name}.safetensors", broken / f"{name}.safetensors")
        truncate(broken / f"{name}.safetensors")
    done = astolfo(broken, cache=tmp_path)
    assert done.returncode == 1
    assert "a01_ft_a.safetensors" in done.stderr and "no model could be compared" in done.stderr


def test_a_cached_run_of_the_command_imports_no_torch(folder, tmp_path):
    assert astolfo(folder, "--reference", "m01", "--json", cache=tmp_path).returncode == 0
    code = ("import sys\nfrom astolfo_tui.cli import main\n"
            f"rc = main(['compare', {str(folder)!r}, '--reference', 'm01', '--json'])\n"
            "print(rc, 'torch' in sys.modules, 'numba' in sys.modules, 'matplotlib' in sys.modules, "
            "file=sys.stderr)\n")
    env = dict(os.environ, ASTOLFO_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.stderr.split()[-4:] == ["0", "False", "False", "False"], done.stderr


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's header, which must be a PNG's."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_png_is_drawn_and_a_bad_path_is_a_usage_error(folder, tmp_path):
    picture = tmp_path / "all.png"
    done = astolfo(folder, "--reference", "m01", "--png", picture, cache=tmp_path)
    assert done.returncode == 0, done.stderr
    width, height = _png_size(picture)
    assert picture.stat().st_size > 50_000 and width > 600
    one = tmp_path / "te0.png"
    assert astolfo(folder, "--reference", "m01", "--component", "te0", "--png", one, cache=tmp_path).returncode == 0
    one_width, one_height = _png_size(one)
    assert one_height < height / 2  # one row of panels instead of four
    for bad, why in ((tmp_path / "no" / "such" / "x.png", "no such folder"), (tmp_path, "it is a folder")):
        done = astolfo(folder, "--png", bad, cache=tmp_path)
        assert done.returncode == 2
        assert f"cannot write --png {bad}: {why}" in done.stderr and "Traceback" not in done.stderr


def test_png_has_a_heatmap_and_a_dendrogram_per_component(tmp_path):
    """Drawn from a result by hand: two components, one with a model whose delta is zero (no
    cosine) and one with a single changed model (no tree to draw)."""
    from astolfo_tui.compare_png import write_png

    def entry(cos):
        return {"models": ["a", "b", "c"], "cosine": cos}

    result = {"reference": "base", "thresholds": {"family": 0.3}, "components": {
        "unet": entry([[1.0, 0.9, 0.1], [0.9, 1.0, 0.2], [0.1, 0.2, 1.0]]),
        "te0": entry([[1.0, None, None], [None, None, None], [None, None, None]])}}
    path = tmp_path / "two.png"
    assert write_png(result, path) == 4
    width, height = _png_size(path)
    assert width > 600 and height > 400
