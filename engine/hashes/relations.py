"""What hashes say about a folder of models: groups of identical components, which models
carry SDXL base's text encoders (``=sd``), and duplicates inside a selection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from engine.hashes.model import FileHashes

TEXT_ENCODERS = ("te", "te0", "te1")


# --------------------------------------------------------------------------- relations


@dataclass(frozen=True)
class ComponentGroup:
    """Models whose component ``component`` is identical (``kind`` "exact": byte for byte;
    "fp16": the same weights up to fp16 rounding)."""

    component: str
    kind: str
    digest: str
    model_ids: tuple[str, ...]
    label: str  # e.g. "te0#1", numbered per component in model order


def component_groups(hashes: Mapping[str, FileHashes], kind: str = "exact") -> list[ComponentGroup]:
    """Groups of two or more models sharing a component, in model order."""
    if kind not in ("exact", "fp16"):
        raise ValueError(f"kind must be 'exact' or 'fp16', not {kind!r}")
    members: dict[tuple[str, str], list[str]] = {}
    for model_id, h in hashes.items():
        for cid, comp in h.components.items():
            members.setdefault((cid, getattr(comp, kind)), []).append(model_id)
    out = []
    counters: dict[str, int] = {}
    for (cid, digest), ids in members.items():
        if len(ids) < 2:
            continue
        counters[cid] = counters.get(cid, 0) + 1
        out.append(ComponentGroup(cid, kind, digest, tuple(ids), f"{cid}#{counters[cid]}"))
    return out


def group_labels(groups: Iterable[ComponentGroup]) -> dict[str, list[str]]:
    """Model id -> labels of the groups it belongs to."""
    out: dict[str, list[str]] = {}
    for g in groups:
        for model_id in g.model_ids:
            out.setdefault(model_id, []).append(g.label)
    return out


def same_as_reference(hashes: Mapping[str, FileHashes], references: Iterable[FileHashes]) -> dict[str, bool | None]:
    """The "=sd" flag per model: True when every text encoder it has (te0 and te1 for SDXL)
    equals, up to fp16, those of a reference model with the same text encoders; None when the
    model has no text encoder or no such reference is known."""
    refs = []
    for r in references:
        tes = {cid: c.fp16 for cid, c in r.components.items() if cid in TEXT_ENCODERS}
        if tes:
            refs.append(tes)
    out: dict[str, bool | None] = {}
    for model_id, h in hashes.items():
        tes = {cid: c.fp16 for cid, c in h.components.items() if cid in TEXT_ENCODERS}
        comparable = [r for r in refs if set(r) == set(tes)]
        if not tes or not comparable:
            out[model_id] = None
        else:
            out[model_id] = any(r == tes for r in comparable)
    return out


@dataclass(frozen=True)
class DuplicateWarning:
    selection: str
    component: str
    model_ids: tuple[str, ...]
    exact: bool  # byte-identical, not just equal up to fp16
    message: str


def selection_duplicates(
    selections: Mapping[str, Sequence[str]],
    components: Mapping[str, str],
    hashes: Mapping[str, FileHashes],
) -> list[DuplicateWarning]:
    """Warnings for selections that would average the same component more than once, giving
    those weights double say. ``selections`` maps a selection name to model ids, ``components``
    the selection name to the component it takes (e.g. "nsfw" -> "unet"). Models not hashed yet
    are not judged."""
    out = []
    for name, ids in selections.items():
        cid = components.get(name)
        if cid is None:
            continue
        same: dict[str, list[str]] = {}
        for model_id in dict.fromkeys(ids):
            comp = hashes.get(model_id, None)
            comp = comp.components.get(cid) if comp else None
            if comp is not None:
                same.setdefault(comp.fp16, []).append(model_id)
        for group in same.values():
            if len(group) < 2:
                continue
            exact = len({hashes[m].components[cid].exact for m in group}) == 1
            how = "identical" if exact else "identical up to fp16"
            out.append(
                DuplicateWarning(
                    name,
                    cid,
                    tuple(group),
                    exact,
                    f"selection {name} includes the same {cid} {len(group)} times ({how}): {', '.join(group)}",
                )
            )
    return out
