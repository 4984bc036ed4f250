"""Key names as files store them, against the names an architecture knows: the ``model.``
prefix that some tools add to every key or drop from the UNet's, and ComfyUI's fp8 scale
factors. One place for these rules, so the diagnosis of a file and the merge plan read keys
the same way."""

from __future__ import annotations

from engine.checkpoint.architectures import Architecture

EXTRA_MODEL_PREFIX = "extra_model_prefix"  # every key written as model.<key>
MISSING_MODEL_PREFIX = "missing_model_prefix"  # UNet keys written as diffusion_model.* (no model.)
_PREFIX = "model."
_UNET_BARE = "diffusion_model."


def without_model_prefix(key: str) -> str:
    return key[len(_PREFIX):] if key.startswith(_PREFIX) else key


def prefix_variants(stored: str) -> list[tuple[str, str | None]]:
    """``stored`` itself, then what it would be called with a renaming undone, each with the
    name of that renaming (None for the key as stored)."""
    out: list[tuple[str, str | None]] = [(stored, None)]
    if stored.startswith(_PREFIX):
        out.append((stored[len(_PREFIX):], EXTRA_MODEL_PREFIX))
    if stored.startswith(_UNET_BARE):
        out.append((_PREFIX + stored, MISSING_MODEL_PREFIX))
    return out


def stored_variants(name: str) -> list[str]:
    """The stored keys that ``prefix_variants`` reads as ``name`` (its inverse), ``name`` first."""
    out = [name, _PREFIX + name]
    if name.startswith(_PREFIX + _UNET_BARE):
        out.append(name[len(_PREFIX):])
    return out


def normal_name(arch: Architecture, stored: str) -> str:
    """The name ``stored`` has in ``arch``'s terms: as stored when some component owns it,
    else with the first renaming undone that makes a component own it, else as stored."""
    for variant, _rule in prefix_variants(stored):
        if arch.component_of(variant) is not None:
            return variant
    return stored


def component_of(arch: Architecture, stored: str) -> str | None:
    """The component owning ``stored`` under any of its prefix variants."""
    for variant, _rule in prefix_variants(stored):
        comp = arch.component_of(variant)
        if comp is not None:
            return comp
    return None


def is_fp8_scale(key: str) -> bool:
    """ComfyUI's scaled-fp8 factors (``scaled_fp8``, ``*.scale_weight``, ``*.scale_input``)."""
    return key == "scaled_fp8" or key.endswith((".scale_weight", ".scale_input"))
