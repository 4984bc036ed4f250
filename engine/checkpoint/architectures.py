"""Known checkpoint architectures (SDXL base, SD 1.5), built from the schemas shipped in
``engine/schemas``: their components, key prefixes, every key's shape and stored dtype.

Component ids are the same everywhere in astolfo: ``unet``, ``te0``, ``te1``, ``vae`` for SDXL
and ``unet``, ``te``, ``vae`` for SD 1.5. They are labelled by key prefix, never by a tool's name
for them (tools disagree on which CLIP is "AUX").
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources


@dataclass(frozen=True)
class TensorSpec:
    key: str
    shape: tuple[int, ...]
    dtype: str  # stored dtype in the reference file

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Component:
    id: str
    prefix: str
    label: str
    keys: tuple[str, ...]  # full keys (prefix included), reference order

    def owns(self, key: str) -> bool:
        return key.startswith(self.prefix)


@dataclass(frozen=True)
class Architecture:
    id: str
    name: str
    modelspec: str  # modelspec.architecture value
    float_dtype: str
    components: dict[str, Component]
    tensors: dict[str, TensorSpec]  # every reference key, reference order
    buffers: frozenset[str]  # keys that are not weights (never averaged)
    position_ids_key: str
    reference_sha256: str | None
    reference_size: int

    def component_of(self, key: str) -> str | None:
        for comp in self.components.values():
            if comp.owns(key):
                return comp.id
        return None

    @property
    def component_ids(self) -> tuple[str, ...]:
        return tuple(self.components)

    @property
    def display_order(self) -> tuple[str, ...]:
        """Components as the grid and reports list them: text encoders first (the article's
        te0, te1 columns), then the rest in schema order."""
        ids = self.component_ids
        return tuple(c for c in ids if c.startswith("te")) + tuple(c for c in ids if not c.startswith("te"))


_LABELS = {
    "unet": "UNet",
    "te0": "CLIP ViT-L/14 text encoder (te0)",
    "te1": "OpenCLIP ViT-bigG/14 text encoder (te1)",
    "te": "CLIP ViT-L/14 text encoder",
    "vae": "VAE",
}

_SCHEMAS = {
    "sdxl": ("sdxl_base.json", "SDXL 1.0", "stable-diffusion-xl-v1-base"),
    "sd15": ("sd15.json", "SD 1.5", "stable-diffusion-v1"),
}


def _load(arch_id: str) -> Architecture:
    filename, name, modelspec = _SCHEMAS[arch_id]
    raw = json.loads(resources.files("engine.checkpoint.schemas").joinpath(filename).read_text("utf-8"))
    tensors = {
        key: TensorSpec(key, tuple(entry["shape"]), entry["dtype"]) for key, entry in raw["tensors"].items()
    }
    components = {}
    for cid, prefix in raw["components"].items():
        keys = tuple(k for k in tensors if k.startswith(prefix))
        components[cid] = Component(cid, prefix, _LABELS.get(cid, cid), keys)
    position_ids = next(k for k in tensors if k.endswith("embeddings.position_ids"))
    return Architecture(
        id=arch_id,
        name=name,
        modelspec=modelspec,
        float_dtype=raw["float_dtype"],
        components=components,
        tensors=tensors,
        buffers=frozenset(raw.get("buffers", [])),
        position_ids_key=position_ids,
        reference_sha256=raw["file"].get("sha256"),
        reference_size=raw["file"]["size"],
    )


@lru_cache(maxsize=None)
def architectures() -> dict[str, Architecture]:
    return {arch_id: _load(arch_id) for arch_id in _SCHEMAS}


def component_ids() -> tuple[str, ...]:
    """Every component id of any known architecture (what a recipe may name), SDXL's first."""
    seen: dict[str, None] = {}
    for arch in architectures().values():
        for cid in arch.components:
            seen.setdefault(cid, None)
    return tuple(seen)


def get_architecture(arch_id: str) -> Architecture:
    try:
        return architectures()[arch_id]
    except KeyError:
        raise KeyError(f"unknown architecture {arch_id!r} (known: {', '.join(architectures())})") from None


# Dimensions below this are kept as they are when shrinking (kernel sizes, 77 tokens, 4 latent
# channels); larger ones are divided by the scale. Synthetic files and the shape check agree on it.
SCALE_MIN_DIM = 64


def scaled_shape(shape: tuple[int, ...], scale: int) -> tuple[int, ...]:
    """The shape a tensor has in a file shrunk by ``scale`` (1 = real size)."""
    if scale <= 1:
        return tuple(shape)
    return tuple(d if d < SCALE_MIN_DIM else max(1, -(-d // scale)) for d in shape)


def infer_scale(arch: Architecture, shapes: dict[str, tuple[int, ...]]) -> int | None:
    """The scale at which ``shapes`` match ``arch``, judged from a few large tensors."""
    candidates: dict[int, int] = {}
    for key, spec in arch.tensors.items():
        shape = shapes.get(key)
        if shape is None or len(shape) != len(spec.shape) or len(shape) < 2:
            continue
        big = [i for i, d in enumerate(spec.shape) if d >= SCALE_MIN_DIM]
        if not big:
            continue
        i = big[0]
        if shape[i] <= 0:
            continue
        scale = round(spec.shape[i] / shape[i])
        if scale >= 1 and scaled_shape(spec.shape, scale) == tuple(shape):
            candidates[scale] = candidates.get(scale, 0) + 1
        if sum(candidates.values()) >= 16:
            break
    if not candidates:
        return None
    return max(candidates, key=candidates.get)
