"""Shared test fixtures. Append new fixtures; keep others' as they are."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

# CI must be repeatable: the same examples every run (locally, hypothesis keeps exploring).
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _isolated_cache_dir(tmp_path_factory, monkeypatch):
    """Every test gets its own hash catalog folder, never the user's ~/.cache/astolfo."""
    monkeypatch.setenv("ASTOLFO_CACHE_DIR", str(tmp_path_factory.mktemp("astolfo-cache")))


@pytest.fixture(autouse=True)
def _isolated_state_dir(tmp_path_factory, monkeypatch):
    """Every test gets its own job state folder (ASTOLFO_STATE_DIR), never ~/.local/state/astolfo."""
    monkeypatch.setenv("ASTOLFO_STATE_DIR", str(tmp_path_factory.mktemp("astolfo-state")))


@pytest.fixture(autouse=True)
def _isolated_data_dir(tmp_path_factory, monkeypatch):
    """`astolfo demo` writes under ASTOLFO_DATA_DIR: never the user's ~/.local/share/astolfo."""
    monkeypatch.setenv("ASTOLFO_DATA_DIR", str(tmp_path_factory.mktemp("astolfo-data")))


# --------------------------------------------------------------------------- synthetic models
# (foundation) One small real file per deviation, written once per test session.


def _write_synth_models(folder):
    from engine.synth import checkpoints as synth
    from engine.synth.checkpoints import BASE_SEED, SynthSpec

    specs = {
        "clean": SynthSpec(seed=1),
        "clean2": SynthSpec(seed=2),
        "base": SynthSpec(seed=BASE_SEED),
        "sd15": SynthSpec(arch="sd15", seed=1),
        "sd15_corrupted_ids": SynthSpec(arch="sd15", seed=2, deviations=("position_ids_corrupted",)),
        "no_vae": SynthSpec(seed=4, drop_components=("vae",)),
        "fp32": SynthSpec(seed=5, dtype="F32"),
        "bf16": SynthSpec(seed=5, dtype="BF16"),
        "fp8": SynthSpec(seed=6, dtype="F8_E4M3"),
        "nan_unet": SynthSpec(seed=7, nan_in=("unet",)),
    }
    for deviation in synth.DEVIATIONS:
        specs[deviation] = SynthSpec(seed=3, deviations=(deviation,))
    paths = {}
    for name, spec in specs.items():
        paths[name] = synth.write_checkpoint(folder / f"{name}.safetensors", spec)
    paths["lora"] = synth.write_lora(folder / "lora.safetensors")
    paths["lycoris"] = synth.write_lora(folder / "lycoris.safetensors", lycoris=True)
    paths["diffusers"] = synth.write_diffusers_style(folder / "diffusers.safetensors")
    truncated = synth.write_checkpoint(folder / "truncated.safetensors", SynthSpec(seed=8))
    paths["truncated"] = synth.truncate(truncated)
    paths["garbage"] = synth.write_garbage(folder / "garbage.safetensors")
    return paths


@pytest.fixture(scope="session")
def synth_models(tmp_path_factory):
    """name -> path of a synthetic model (scale 32): clean SDXL/SD1.5 files, one per entry of
    ``synth.DEVIATIONS``, dtypes, a LoRA, a LyCORIS, a diffusers file, a truncated file and
    garbage. Session-wide and read-only: copy a file before changing it."""
    return _write_synth_models(tmp_path_factory.mktemp("synth-models"))


@pytest.fixture(scope="session")
def demo_folder(tmp_path_factory):
    """The `astolfo demo` folder, built once per session (read-only)."""
    from engine.synth.demo import make_demo_folder

    folder = tmp_path_factory.mktemp("demo") / "demo"
    make_demo_folder(folder)
    return folder
