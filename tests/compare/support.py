"""Synthetic SDXL models with known relations for the compare tests, and an fp64 reference
computed independently of the engine (safetensors' loader, plain torch arithmetic)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from engine.checkpoint.architectures import get_architecture
from engine.checkpoint.writer import write_file
from engine.synth.checkpoints import SynthSpec, make_state_dict

SCALE = 64
ARCH = get_architecture("sdxl")
POSITION_IDS = ARCH.position_ids_key

# file name -> what it is (grid order is the name order)
RELATIONS = {
    "a00_base": "the reference",
    "a01_ft_a": "independent fine-tune",
    "a02_ft_b": "independent fine-tune",
    "a03_ft_c": "independent fine-tune",
    "a04_mix_ab": "exact 50/50 mix of ft_a and ft_b",
    "a05_clone_c": "ft_c with another VAE",
    "a06_big": "a 10x delta",
    "a07_te0_base": "fine-tune whose te0 is the base's",
}


def _delta(base: dict[str, torch.Tensor], seed: int, only: set[str] | None = None) -> dict[str, torch.Tensor]:
    out = {}
    for i, (key, t) in enumerate(base.items()):
        comp = ARCH.component_of(key)
        if key == POSITION_IDS or not t.is_floating_point() or (only is not None and comp not in only):
            out[key] = torch.zeros(t.shape, dtype=torch.float64)
            continue
        g = torch.Generator().manual_seed(seed * 100_003 + i)
        out[key] = torch.randn(t.shape, generator=g, dtype=torch.float64) * 0.01
    return out


def build_models(folder: Path) -> dict[str, Path]:
    """Write the models of RELATIONS (F32, every SDXL key at 1/64 scale) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    base32 = make_state_dict(SynthSpec(seed=1, scale=SCALE, dtype="F32"))
    base = {k: v.to(torch.float64) for k, v in base32.items()}
    no_vae = {"unet", "te0", "te1"}
    d = {k: _delta(base, k, no_vae) for k in (1, 2, 3, 5, 6)}
    other_vae = _delta(base, 4, {"vae"})
    models = {
        "a00_base": base,
        "a01_ft_a": {k: base[k] + d[1][k] for k in base},
        "a02_ft_b": {k: base[k] + d[2][k] for k in base},
        "a03_ft_c": {k: base[k] + d[3][k] for k in base},
        "a05_clone_c": {k: base[k] + d[3][k] + other_vae[k] for k in base},
        "a06_big": {k: base[k] + 10 * d[5][k] for k in base},
        "a07_te0_base": {k: base[k] + (0 if ARCH.component_of(k) == "te0" else d[6][k]) for k in base},
    }
    # the mix is of the stored (F32) parents, in fp64, then stored: exact up to one rounding
    a32 = {k: v.to(torch.float32) for k, v in models["a01_ft_a"].items()}
    b32 = {k: v.to(torch.float32) for k, v in models["a02_ft_b"].items()}
    models["a04_mix_ab"] = {k: (a32[k].double() + b32[k].double()) / 2 for k in base}
    paths = {}
    for name, sd in sorted(models.items()):
        out = {k: (v.to(base32[k].dtype)) for k, v in sd.items()}
        out[POSITION_IDS] = base32[POSITION_IDS]
        paths[name] = write_file(folder / f"{name}.safetensors", out, {"modelspec.architecture": ARCH.modelspec,
                                                                       "astolfo.synthetic_scale": str(SCALE)})
    return paths


def reference_deltas(paths: dict[str, Path], reference: str | None, component: str,
                     block_of=None, block: str | None = None) -> dict[str, torch.Tensor]:
    """Each model's flattened fp64 delta over the component's (or block's) float tensors."""
    sds = {n: load_file(str(p)) for n, p in paths.items()}
    names = [n for n in sorted(sds) if n != reference]
    keys = [k for k in ARCH.tensors if ARCH.component_of(k) == component and k != POSITION_IDS
            and (block is None or block_of(k) == block)]
    flat = {n: torch.cat([sds[n][k].double().flatten() for k in keys]) for n in sorted(sds)}
    ref = flat[reference] if reference else torch.stack([flat[n] for n in names]).mean(0)
    return {n: flat[n] - ref for n in names}


def cosine_matrix(deltas: dict[str, torch.Tensor]) -> list[list[float]]:
    names = list(deltas)
    return [[float(torch.dot(deltas[a], deltas[b]) / (deltas[a].norm() * deltas[b].norm())) for b in names]
            for a in names]


def dtype_variants(paths: dict[str, Path], folder: Path) -> tuple[list[Path], list[Path]]:
    """Five of the models stored as fp16, bf16, fp32, fp64 and fp8, and the same values stored
    as fp64: a pass that widens each dtype exactly gives both lists the same bits."""
    meta = {"modelspec.architecture": ARCH.modelspec}
    stored, wide = [], []
    names = ["a00_base", "a01_ft_a", "a02_ft_b", "a03_ft_c", "a06_big"]
    for name, dtype in zip(names, (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn)):
        sd = load_file(str(paths[name]))
        narrow = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
        stored.append(write_file(folder / f"{name}.safetensors", narrow, meta))
        wide.append(write_file(folder / f"{name}_f64.safetensors",
                               {k: v.double() if v.is_floating_point() else v for k, v in narrow.items()}, meta))
    return stored, wide
