"""``astolfo merge`` with ``device = "cuda"`` on a machine that has a CUDA GPU, end to end in a
subprocess (the device resolved and named, the buffers fitted to the card, its memory figures,
the JSON events): for a mean in each output dtype, the merge methods and the medians, the
output's tensor bytes equal those of the same recipe on the CPU. Skipped where torch sees no
GPU (CI); bench/gpu_check.sh runs it on the card."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from merge_support import method_table, recipe_text, sdxl_output, subprocess_env
from safetensors import safe_open

from engine.synth.checkpoints import SynthSpec, write_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

METHODS = {
    "mean": None,
    "add_difference": {"method": "add_difference", "base": "o", "alpha": 0.7},
    "ties": {"method": "ties", "base": "o", "trim": 0.5, "vote": "count"},
    "dare": {"method": "dare", "base": "o", "drop": 0.3, "seed": 7},
    "della": {"method": "della", "base": "o", "drop": 0.2, "drop_eps": 0.15, "vote": "sum", "trim": 0.6, "seed": 9},
    "model_stock": {"method": "model_stock", "base": "o"},
    "geometric_median": {"method": "geometric_median"},
    "tgmd": {"method": "tgmd", "base": "o", "maxiter": 30},
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A base ``o`` and fine-tunes a, b, c in three stored dtypes."""
    folder = tmp_path_factory.mktemp("card-models")
    for i, (mid, dtype) in enumerate(zip("oabc", ("F16", "F16", "BF16", "F32"))):
        write_checkpoint(folder / f"{mid}.safetensors", SynthSpec(seed=71 + i, scale=64, dtype=dtype))
    return folder


def _recipe(models: Path, folder: Path, device: str, method: dict | None) -> Path:
    ids = {m: str(models / f"{m}.safetensors") for m in "oabc"}
    outputs = [sdxl_output(str(folder / f"{device}-{dtype}.safetensors"), "all", dtype=dtype)
               for dtype in ("fp16", "bf16", "fp32")]
    weights = None if method and method["method"] == "model_stock" else {"a": 1.0, "b": 0.3, "c": 2.0}  # it takes none
    text = recipe_text(ids, {"all": ["a", "b", "c"]}, outputs, weights, device=device)
    if method is not None:
        text += method_table("all", method)
    path = folder / f"{device}.toml"
    path.write_text(text)
    return path


def _merge(recipe: Path) -> list[dict]:
    result = subprocess.run([sys.executable, "-m", "astolfo_tui", "merge", str(recipe), "--json"],
                            capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def _tensor_bytes(path: Path) -> dict[str, bytes]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k).reshape(-1).view(torch.uint8).numpy().tobytes() for k in f.keys()}


@pytest.mark.parametrize("name", list(METHODS))
def test_the_card_writes_the_cpu_bytes(models, tmp_path, name):
    events = {}
    for device in ("cpu", "cuda"):
        events[device] = _merge(_recipe(models, tmp_path, device, METHODS[name]))
    started = [e for e in events["cuda"] if e.get("type") == "started"]
    assert started and started[0].get("device_uuid"), started  # the card, named by its UUID
    for dtype in ("fp16", "bf16", "fp32"):
        cpu = _tensor_bytes(tmp_path / f"cpu-{dtype}.safetensors")
        card = _tensor_bytes(tmp_path / f"cuda-{dtype}.safetensors")
        assert cpu.keys() == card.keys()
        differ = [k for k in cpu if cpu[k] != card[k]]
        assert not differ, f"{name} {dtype}: {len(differ)} of {len(cpu)} tensors differ, e.g. {differ[:3]}"
