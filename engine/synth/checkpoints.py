"""Synthetic checkpoints for tests, benchmarks and the demo.

Files carry the real key names of a known architecture with every large dimension divided by a
common ``scale`` (see ``architectures.scaled_shape``), deterministic values from a seed, and can
carry each deviation real checkpoints show in the wild (see ``DEVIATIONS``).
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.checkpoint.architectures import Architecture, get_architecture, scaled_shape
from engine.checkpoint.format import DTYPES
from engine.checkpoint.writer import write_file

# Seed whose text encoders and VAE play "SDXL base": models built with it share them exactly.
BASE_SEED = 1000

DEVIATIONS = {
    "position_ids_missing": "te position_ids key left out (transformers >= 4.31, kohya)",
    "position_ids_corrupted": "position_ids stored as F32 with merge drift (76 -> 75.9975)",
    "position_ids_int64": "position_ids stored as I64 (the code dtype)",
    "pruned_te0_last_layer": "te0 encoder.layers.11.* removed",
    "pruned_te1_last_layer": "te1 transformer.resblocks.31.* removed",
    "nai_clip_keys": "CLIP keys without 'text_model.'",
    "ema_keys": "model_ema.* EMA copies of UNet weights (dots removed)",
    "extra_model_prefix": "every key has an extra 'model.' in front",
    "missing_model_prefix": "'model.diffusion_model.' written as 'diffusion_model.'",
    "scaled_fp8": "ComfyUI scaled fp8: F8_E4M3 weights, a 'scaled_fp8' key and .scale_weight tensors",
    "junk_keys": "unrelated extra tensors at top level",
    "json_metadata": "metadata values that are JSON text (kohya ss_* tags)",
}


@dataclass
class SynthSpec:
    arch: str = "sdxl"
    scale: int = 32
    seed: int = 0
    dtype: str = "F16"  # storage for floating tensors
    component_seeds: dict[str, int] = field(default_factory=dict)  # e.g. {"te0": BASE_SEED}
    drop_components: tuple[str, ...] = ()
    deviations: tuple[str, ...] = ()
    nan_in: tuple[str, ...] = ()  # components that get NaN / Inf values
    metadata: dict[str, str] = field(default_factory=dict)


def _tensor_seed(seed: int, key: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63)


def _values(key: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(_tensor_seed(seed, key))
    t = torch.randn(shape, generator=g, dtype=torch.float32) * 0.05
    if key.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight", "ln_final.weight")):
        t += 1.0
    if key.endswith("logit_scale"):
        t = torch.full(shape, 4.6052)
    return t


def make_state_dict(spec: SynthSpec) -> dict[str, torch.Tensor]:
    """The tensors of a synthetic checkpoint (before file-level deviations like truncation)."""
    arch = get_architecture(spec.arch)
    fdtype = DTYPES["F8_E4M3" if "scaled_fp8" in spec.deviations else spec.dtype].torch_dtype
    out: dict[str, torch.Tensor] = {}
    for key, ts in arch.tensors.items():
        comp = arch.component_of(key)
        if comp in spec.drop_components:
            continue
        shape = scaled_shape(ts.shape, spec.scale)
        if key == arch.position_ids_key:
            out[key] = _position_ids(arch, spec)
            continue
        if not DTYPES[ts.dtype].is_float:  # e.g. SD1 model_ema.num_updates
            out[key] = torch.zeros(shape, dtype=DTYPES[ts.dtype].torch_dtype)
            continue
        seed = spec.component_seeds.get(comp or "", spec.seed)
        t = _values(key, shape, seed)
        if comp in spec.nan_in and t.numel() and key.endswith("weight"):
            t.view(-1)[0] = float("nan")
            t.view(-1)[-1] = float("inf")
        store = fdtype if ts.dtype in ("F16", "F32") else DTYPES[ts.dtype].torch_dtype
        if comp is None:  # SD1 schedule buffers stay F32 like the reference
            store = DTYPES[ts.dtype].torch_dtype
        out[key] = t.to(store)
    if "position_ids_missing" in spec.deviations:
        out.pop(arch.position_ids_key, None)
    _apply_key_deviations(arch, spec, out)
    return out


def _position_ids(arch: Architecture, spec: SynthSpec) -> torch.Tensor:
    ids = torch.arange(77, dtype=torch.float64).reshape(1, 77)
    if "position_ids_corrupted" in spec.deviations:
        ids = ids - 0.0025 * (ids / 76)  # 76 -> 75.9975: truncates to 75
        return ids.to(torch.float32)
    if "position_ids_int64" in spec.deviations:
        return ids.to(torch.int64)
    return ids.to(DTYPES[arch.tensors[arch.position_ids_key].dtype].torch_dtype)


def _apply_key_deviations(arch: Architecture, spec: SynthSpec, sd: dict[str, torch.Tensor]) -> None:
    dev = set(spec.deviations)
    if "pruned_te0_last_layer" in dev:
        for k in [k for k in sd if ".text_model.encoder.layers.11." in k and k.startswith("conditioner.embedders.0.")]:
            del sd[k]
    if "pruned_te1_last_layer" in dev:
        for k in [k for k in sd if k.startswith("conditioner.embedders.1.model.transformer.resblocks.31.")]:
            del sd[k]
    if "nai_clip_keys" in dev:
        for k in [k for k in sd if ".transformer.text_model." in k]:
            sd[k.replace(".transformer.text_model.", ".transformer.")] = sd.pop(k)
    if "ema_keys" in dev:
        unet = arch.components["unet"].prefix
        for k in [k for k in sd if k.startswith(unet)][:64]:
            sd["model_ema." + k[len("model."):].replace(".", "")] = sd[k].clone()
        sd["model_ema.decay"] = torch.tensor(0.9999, dtype=torch.float32)
        sd["model_ema.num_updates"] = torch.tensor(12345, dtype=torch.int32)
    if "scaled_fp8" in dev:
        sd["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
        for k in [k for k in sd if k.endswith(".weight") and sd[k].dtype == torch.float8_e4m3fn][:32]:
            sd[k[: -len("weight")] + "scale_weight"] = torch.ones((), dtype=torch.float32)
    if "junk_keys" in dev:
        sd["lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"] = torch.tensor(1.0)
        sd["junk.optimizer_state"] = torch.zeros(256, dtype=torch.float32)
    if "extra_model_prefix" in dev:
        for k in list(sd):
            sd["model." + k] = sd.pop(k)
    if "missing_model_prefix" in dev:
        for k in [k for k in sd if k.startswith("model.diffusion_model.")]:
            sd[k[len("model."):]] = sd.pop(k)


def write_checkpoint(path: str | os.PathLike, spec: SynthSpec) -> Path:
    """Write a synthetic checkpoint for ``spec`` to ``path``."""
    meta = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": get_architecture(spec.arch).modelspec,
        "modelspec.title": Path(path).stem,
        "astolfo.synthetic_scale": str(spec.scale),
        **spec.metadata,
    }
    if "json_metadata" in spec.deviations:
        meta["ss_tag_frequency"] = '{"1_astolfo": {"astolfo": 120, "1boy": 80}}'
        meta["ss_network_dim"] = "None"
        meta["ss_training_comment"] = '{"nested": {"json": [1, 2, 3]}}'
    return write_file(path, make_state_dict(spec), meta)


def write_lora(path: str | os.PathLike, seed: int = 0, lycoris: bool = False) -> Path:
    """A small LoRA (or LyCORIS LoHa) file: the kind that gets dropped in a checkpoint folder."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for i in range(8):
        base = f"lora_unet_down_blocks_{i % 3}_attentions_0_transformer_blocks_0_attn1_to_{'qkvo'[i % 4]}"
        if lycoris:
            for part in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
                sd[f"{base}.{part}"] = torch.randn(8, 8, generator=g).half()
        else:
            sd[f"{base}.lora_down.weight"] = torch.randn(8, 64, generator=g).half()
            sd[f"{base}.lora_up.weight"] = torch.randn(64, 8, generator=g).half()
        sd[f"{base}.alpha"] = torch.tensor(8.0).half()
    meta = {"ss_network_module": "lycoris.kohya" if lycoris else "networks.lora", "ss_network_dim": "8"}
    return write_file(path, sd, meta)


def write_diffusers_style(path: str | os.PathLike, seed: int = 0) -> Path:
    """A single file in diffusers layout (``down_blocks.*``, separate q/k/v)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for b in range(3):
        for part in ("to_q", "to_k", "to_v", "to_out.0"):
            sd[f"unet.down_blocks.{b}.attentions.0.transformer_blocks.0.attn1.{part}.weight"] = torch.randn(
                10, 10, generator=g
            ).half()
    sd["unet.mid_block.resnets.0.conv1.weight"] = torch.randn(10, 10, 3, 3, generator=g).half()
    sd["text_encoder.text_model.embeddings.token_embedding.weight"] = torch.randn(1544, 24, generator=g).half()
    sd["text_encoder_2.text_projection.weight"] = torch.randn(40, 40, generator=g).half()
    return write_file(path, sd, {"format": "pt"})


def truncate(path: str | os.PathLike, keep_fraction: float = 0.6) -> Path:
    """Cut a file short, as an interrupted download does."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(int(size * keep_fraction))
    return path


def write_garbage(path: str | os.PathLike, data: bytes = b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}  ") -> Path:
    path = Path(path)
    path.write_bytes(data)
    return path
