"""Which group a tensor is compared in: its component, and for the SDXL UNet the block users
know from supermerger (BASE, IN00-IN08, M00, OUT00-OUT08).

The rules follow supermerger's ``blockfromkey`` for SDXL: ``input_blocks.N.`` is INnn,
``middle_block.`` is M00, ``output_blocks.N.`` is OUTnn and the final ``out.`` layers belong to
OUT08. Supermerger's BASE is the text encoders, which are their own components here (te0, te1);
the UNet keys supermerger leaves unmerged (``time_embed``, ``label_emb``) go to BASE, so that
every UNet tensor is in exactly one block and the blocks add up to the whole UNet.
"""

from __future__ import annotations

import re

COMPONENTS = ("unet", "te0", "te1", "vae")
UNET_BLOCKS = ("BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9)))
UNET_PREFIX = "model.diffusion_model."

_INPUT = re.compile(r"input_blocks\.(\d+)\.")
_OUTPUT = re.compile(r"output_blocks\.(\d+)\.")


def unet_block(canonical_key: str) -> str | None:
    """The block of a canonical UNet key, or None for a key outside the UNet or an index
    outside SDXL's nine input and nine output blocks."""
    if not canonical_key.startswith(UNET_PREFIX):
        return None
    rest = canonical_key[len(UNET_PREFIX):]
    if rest.startswith(("time_embed.", "label_emb.")):
        return "BASE"
    if rest.startswith("middle_block."):
        return "M00"
    if rest.startswith("out."):
        return "OUT08"
    for pattern, name in ((_INPUT, "IN"), (_OUTPUT, "OUT")):
        m = pattern.match(rest)
        if m:
            n = int(m.group(1))
            return f"{name}{n:02d}" if n < 9 else None
    return None
