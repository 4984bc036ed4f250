"""The demo folder: a dozen small synthetic SDXL models that show what a real mix folder holds.

Clean fine-tunes, "SDXL base" itself, fine-tunes that kept base's text encoders, one of each
common breakage, a LoRA dropped among the checkpoints and an interrupted download. Names use the
AstolfoMix article's ``_x01``-style prefixes so the ids read like the article's.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from engine.recipe.model import ModelEntry, OutputSpec, Recipe
from engine.recipe.toml_file import save_recipe
from engine.synth import checkpoints as synth
from engine.synth.checkpoints import BASE_SEED, SynthSpec

DEMO_SCALE = 32
MANIFEST = ".astolfo-demo.json"  # hidden, so scans skip it
RECIPE = "demo-recipe.toml"
_VERSION = 1  # bump when the models below change, so old demo folders are rebuilt

BASE_ENCODERS = {"te0": BASE_SEED, "te1": BASE_SEED}


@dataclass(frozen=True)
class DemoModel:
    name: str
    what: str  # one line for the README and the app's help
    write: Callable[[Path], object]


def _checkpoint(**spec) -> Callable[[Path], object]:
    return lambda path: synth.write_checkpoint(path, SynthSpec(scale=DEMO_SCALE, **spec))


def _truncated(seed: int) -> Callable[[Path], object]:
    def write(path: Path) -> None:
        temp = path.with_name(path.name + ".tmp")
        synth.write_checkpoint(temp, SynthSpec(scale=DEMO_SCALE, seed=seed))
        synth.truncate(temp, 0.55)
        os.replace(temp, path)

    return write


def _lora(seed: int) -> Callable[[Path], object]:
    return lambda path: synth.write_lora(path, seed=seed)


DEMO_MODELS: tuple[DemoModel, ...] = (
    DemoModel("_x00-SDXL-Base.safetensors", "SDXL base 1.0 (synthetic)", _checkpoint(seed=BASE_SEED)),
    DemoModel("_x01-AnimagineLike.safetensors", "a clean fine-tune", _checkpoint(seed=1)),
    DemoModel("_x02-PonyLike.safetensors", "a clean fine-tune", _checkpoint(seed=2)),
    DemoModel(
        "_x03-BaseClipTune.safetensors",
        "a fine-tune that kept SDXL base's text encoders exactly (=sd)",
        _checkpoint(seed=3, component_seeds=BASE_ENCODERS),
    ),
    DemoModel(
        "_x04-KohyaTrained.safetensors",
        "kohya-trained: position_ids missing, ss_* metadata holding JSON text",
        _checkpoint(seed=4, component_seeds=BASE_ENCODERS, deviations=("position_ids_missing", "json_metadata")),
    ),
    DemoModel(
        "_x05-OldMerge.safetensors",
        "an old merge whose position_ids drifted (76 became 75.9975)",
        _checkpoint(seed=5, deviations=("position_ids_corrupted",)),
    ),
    DemoModel(
        "_x06-PrunedClip.safetensors",
        "te1's last layer pruned",
        _checkpoint(seed=6, deviations=("pruned_te1_last_layer",)),
    ),
    DemoModel(
        "_x07-NovelAIStyle.safetensors",
        "NAI-style CLIP keys (no 'text_model.') and EMA keys",
        _checkpoint(seed=7, deviations=("nai_clip_keys", "ema_keys")),
    ),
    DemoModel("_x08-NoVAE.safetensors", "no VAE", _checkpoint(seed=8, drop_components=("vae",))),
    DemoModel("_x09-BrokenUNet.safetensors", "NaN and Inf in its UNet", _checkpoint(seed=9, nan_in=("unet",))),
    DemoModel("_x10-FullPrecision.safetensors", "stored as fp32", _checkpoint(seed=10, dtype="F32")),
    DemoModel(
        "_x11-ComfyScaledFP8.safetensors",
        "ComfyUI scaled fp8 (weights need their scales applied)",
        _checkpoint(seed=11, deviations=("scaled_fp8",)),
    ),
    DemoModel("_x12-DetailTweaker-LoRA.safetensors", "a LoRA, not a checkpoint", _lora(seed=12)),
    DemoModel("_x13-Interrupted.safetensors", "an interrupted download (truncated)", _truncated(seed=13)),
    DemoModel(
        "_x14-ExtraPrefix.safetensors",
        "every key with an extra 'model.' prefix",
        _checkpoint(seed=14, deviations=("extra_model_prefix",)),
    ),
)


def make_demo_folder(folder: str | os.PathLike) -> list[Path]:
    """Create (or complete) the demo folder; returns the model paths in demo order.

    Idempotent: a model already there with the size recorded when it was written is kept, so a
    second run takes milliseconds. Each file appears only when complete."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = _read_manifest(folder)
    sizes: dict[str, int] = {}
    paths = []
    for model in DEMO_MODELS:
        path = folder / model.name
        recorded = manifest.get(model.name)
        if recorded is None or not path.is_file() or path.stat().st_size != recorded:
            model.write(path)
        sizes[model.name] = path.stat().st_size
        paths.append(path)
    _write_manifest(folder, sizes)
    recipe_path = folder / RECIPE
    if not recipe_path.exists() or _is_old_default(recipe_path, folder):
        save_recipe(demo_recipe(folder), recipe_path)
    return paths


# The demo mix, in the article's style: every selection leaves out the models whose component is
# broken (NaN UNet, scaled fp8, LoRA, truncated file), "nsfw" is a second UNet selection, and
# the VAE comes from base.
DEMO_SELECTIONS = {
    "te0": ["_x01", "_x02", "_x04", "_x05", "_x07", "_x10", "_x14"],
    "te1": ["_x01", "_x02", "_x05", "_x06", "_x07", "_x10", "_x14"],
    "unet": ["_x01", "_x02", "_x03", "_x04", "_x05", "_x06", "_x07", "_x08", "_x10", "_x14"],
    "nsfw": ["_x02", "_x05", "_x07", "_x08"],
    "vae": ["_x00"],
}


def demo_recipe(folder: str | os.PathLike) -> Recipe:
    """A recipe for the demo folder: two outputs (base and nsfw) sharing both text encoders."""
    models = {}
    for model in DEMO_MODELS:
        model_id = model.name.split("-", 1)[0]
        models[model_id] = ModelEntry(model_id, Path(model.name))
    used = {m for ids in DEMO_SELECTIONS.values() for m in ids}
    outputs = [
        OutputSpec(Path(f"../mixes/demo-AstolfoMix-{variant}.safetensors"),
                   {"unet": unet, "te0": "te0", "te1": "te1", "vae": "vae"})
        for variant, unet in (("base", "unet"), ("nsfw", "nsfw"))
    ]
    return Recipe(
        name="demo-AstolfoMix",
        arch="sdxl",
        models={k: v for k, v in models.items() if k in used},
        select={k: list(v) for k, v in DEMO_SELECTIONS.items()},
        outputs=outputs,
        base_dir=Path(folder),
    )


def _is_old_default(path: Path, folder: Path) -> bool:
    """The recipe an earlier astolfo wrote here, untouched: it sent outputs to ``out/`` inside
    the scanned folder, where they came back as models. A recipe the user edited is kept."""
    from engine.recipe.toml_edit import portable
    from engine.recipe.toml_file import recipe_to_toml

    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    new = recipe_to_toml(portable(demo_recipe(folder), folder))
    return text == new.replace('path = "../mixes/', 'path = "out/')


def _read_manifest(folder: Path) -> dict[str, int]:
    try:
        data = json.loads((folder / MANIFEST).read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != _VERSION or not isinstance(data.get("sizes"), dict):
        return {}
    return {k: v for k, v in data["sizes"].items() if isinstance(v, int)}


def _write_manifest(folder: Path, sizes: dict[str, int]) -> None:
    temp = folder / (MANIFEST + ".tmp")
    temp.write_text(json.dumps({"version": _VERSION, "sizes": sizes}, indent=1), "utf-8")
    os.replace(temp, folder / MANIFEST)
