"""Where a mix came from: source file hashes and the metadata written into every output.

Metadata values are strings and depend only on the recipe and the input files (never on the
clock or the run), so a rerun writes byte-identical files:

- ModelSpec (``modelspec.sai_model_spec``, ``.architecture``, ``.implementation``, ``.title``,
  ``.resolution``, ``.prediction_type``, ``.date`` when the recipe has one, ``.description``);
- ``astolfo.recipe`` (the recipe as TOML: file names and SHA256s, never a local folder, never
  a run setting) and ``astolfo.sources`` (JSON: each source file with
  its SHA256/AutoV2 and what it fed);
- A1111's ``sd_merge_recipe`` and ``sd_merge_models`` (JSON strings, keyed by SHA256 as A1111
  does, nesting the sources' own merge history), so web UIs show where the model came from;
- the recipe's own ``[metadata]`` entries (they may set ``modelspec.author`` and the like).

Hashes come from the catalog cache when the file is unchanged since it was hashed; otherwise
the merge hashes the file first (one read) and the catalog keeps the result.
"""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from pathlib import Path
from typing import Callable

from engine.recipe.model import ModelEntry
from engine.recipe.toml_file import recipe_to_toml

SPEC_VERSION = "1.0.0"
_IMPLEMENTATION = {
    "sdxl": "https://github.com/Stability-AI/generative-models",
    "sd15": "https://github.com/CompVis/stable-diffusion",
}
_RESOLUTION = {"sdxl": "1024x1024", "sd15": "512x512"}


def engine_version() -> str:
    try:
        from importlib.metadata import version

        return version("astolfo")
    except Exception:
        return "0"


# --------------------------------------------------------------------------- hashes


def _open_catalog():
    try:
        from engine.hashes.catalog import Catalog

        return Catalog()
    except Exception:  # no cache folder, unreadable database, ...: hashes are computed instead
        return None


def cached_hashes(paths: list[Path], model_ids: list[str]) -> dict:
    """model id -> FileHashes for files the catalog has unchanged; reads no file data."""
    catalog = _open_catalog()
    if catalog is None:
        return {}
    try:
        out = {}
        for path, mid in zip(paths, model_ids):
            h = catalog.get(path)
            if h is not None:
                out[mid] = h
        return out
    finally:
        catalog.close()


def compute_hashes(reports: list, on_progress: Callable[[int, int], None] | None,
                   cancel: threading.Event | None, on_file_progress: Callable | None = None,
                   on_file_done: Callable | None = None) -> dict:
    """model id -> FileHashes for ``reports`` (ModelReports), hashing what the catalog lacks and
    storing the results, several files at once where the cores allow (``hashes.parallel``).
    Raises HashCancelled / HashError from engine.hashes.model."""
    catalog = _open_catalog()
    if catalog is not None:
        try:
            return catalog.hash_reports(reports, on_progress=on_progress, cancel=cancel,
                                        on_file_progress=on_file_progress, on_file_done=on_file_done)
        finally:
            catalog.close()
    from engine.hashes.hasher import hash_file
    from engine.hashes.parallel import HashPool, default_jobs

    out: dict = {}

    def done(r, h) -> None:
        out[r.model_id] = h
        if on_file_done:
            on_file_done(r)

    pool = HashPool(lambda r, progress, c: hash_file(r.path, r, on_progress=progress, cancel=c),
                    {id(r): r.file_size for r in reports}, default_jobs(), cancel, on_progress=on_progress,
                    on_file_progress=on_file_progress, on_done=done)
    pool.run(reports)
    return out


# Metadata keys the merge writes itself; a recipe's [metadata] entry may not replace them.
PROVENANCE_KEYS = frozenset({"sd_merge_recipe", "sd_merge_models", "astolfo.recipe", "astolfo.sources",
                             "astolfo.version", "astolfo.outputs"})


def pin_problem(model_id: str, path, pin: str | None, sha256: str | None) -> str | None:
    """The message for a file whose SHA256 is not the one its recipe pins (full or AutoV2
    prefix); None when it matches or when either is unknown."""
    if not pin or sha256 is None or sha256.lower().startswith(pin.lower()):
        return None
    return (f"model {model_id}: {path} has SHA256 {sha256[:10]}..., the recipe pins {pin}: the file was replaced "
            "or renamed")


def plan_hashes(plan, on_stage: Callable[[str], None], on_progress: Callable[[int, int], None] | None,
                cancel: threading.Event | None, on_file_progress: Callable | None = None,
                on_file_done: Callable | None = None) -> dict:
    """model id -> FileHashes for every source of ``plan``: those the plan found in the catalog,
    the rest hashed now (``on_stage`` is told first). Raises HashCancelled / HashError."""
    hashes = dict(plan.hashes)
    todo = [f.report for f in plan.files if f.model_id not in hashes]
    if todo:
        on_stage(f"{len(todo)} source file(s) not in the hash cache")
        hashes.update(compute_hashes(todo, on_progress, cancel, on_file_progress, on_file_done))
    return hashes


def pin_mismatch(plan, hashes: dict) -> tuple[str, str] | None:
    """(model id, message) for the first source whose hash differs from its pin, or None."""
    for f in plan.files:
        h = hashes.get(f.model_id)
        message = pin_problem(f.model_id, f.path, f.sha256_pin, h.sha256 if h else None)
        if message:
            return f.model_id, message
    return None


# --------------------------------------------------------------------------- metadata


def build_metadata(plan, output, hashes: dict) -> dict[str, str]:
    """The ``__metadata__`` of ``output`` (an OutputPlan of ``plan``); ``hashes``: model id ->
    FileHashes for every source file."""
    recipe, arch = plan.recipe, plan.arch
    used = _models_used(plan, output)
    meta: dict[str, str] = {
        "modelspec.sai_model_spec": SPEC_VERSION,
        "modelspec.architecture": arch.modelspec,
        "modelspec.implementation": _IMPLEMENTATION.get(arch.id, ""),
        "modelspec.title": output.title,
        "modelspec.resolution": _RESOLUTION.get(arch.id, ""),
        "modelspec.prediction_type": "epsilon",
        "modelspec.description": _description(recipe, output),
    }
    if recipe.date:
        meta["modelspec.date"] = recipe.date
    scale = plan.files[0].report.scale if plan.files else 1
    if scale > 1:
        meta["astolfo.synthetic_scale"] = str(scale)
    for k, v in recipe.metadata.items():
        if k not in PROVENANCE_KEYS:
            meta[k] = v
    files = {f.model_id: f for f in plan.files}
    sources = []
    for mid, comps in used.items():
        h = hashes.get(mid)
        entry = {"id": mid, "file": files[mid].path.name, "sha256": h.sha256 if h else None,
                 "autov2": h.autov2 if h else None, "weight": recipe.weight(mid), "components": comps}
        title = files[mid].report.metadata.get("modelspec.title")
        if title:
            entry["title"] = title
        sources.append(entry)
    meta["astolfo.recipe"] = portable_recipe_toml(recipe, hashes)
    meta["astolfo.sources"] = json.dumps(sources, ensure_ascii=False)
    meta["astolfo.version"] = engine_version()
    meta["sd_merge_recipe"] = json.dumps(_a1111_recipe(plan, output, used, hashes), ensure_ascii=False)
    meta["sd_merge_models"] = json.dumps(_a1111_models(plan, used, hashes), ensure_ascii=False)
    return meta


def portable_recipe_toml(recipe, hashes: dict) -> str:
    """The recipe as written into outputs: each model by file name and full SHA256, each output
    by file name, and no run settings (device). No local folder ever leaves the machine inside
    a mix, and the same recipe over the same files writes the same bytes wherever they live."""
    models = {
        mid: ModelEntry(mid, Path(Path(e.path).name), hashes[mid].sha256 if mid in hashes else e.sha256)
        for mid, e in recipe.models.items()
    }
    outputs = [replace(o, path=Path(Path(o.path).name)) for o in recipe.outputs]
    return recipe_to_toml(replace(recipe, models=models, outputs=outputs, device="auto", base_dir=Path()),
                          run_settings=False)


def _models_used(plan, output) -> dict[str, dict[str, str]]:
    """model id -> {component: selection} for the models feeding ``output``, in recipe order."""
    recipe = plan.recipe
    used: dict[str, dict[str, str]] = {}
    for mid in recipe.models:
        for cid, sel in output.sources.items():
            if mid in recipe.select.get(sel, ()):
                used.setdefault(mid, {})[cid] = sel
    return used


def _description(recipe, output) -> str:
    parts = []
    for cid, sel in output.sources.items():
        n = len(recipe.select.get(sel, ()))
        method = recipe.methods.get(sel, {}).get("method", "mean")
        how = f", {method}" if method != "mean" else ""
        parts.append(f"{cid} = {sel} ({n} model{'s' * (n != 1)}{how})")
    how = "weighted average" if recipe.weights else "average"
    return f"{recipe.name}: {how} merged by astolfo; " + ", ".join(parts)


def _a1111_recipe(plan, output, used, hashes) -> dict:
    recipe = plan.recipe
    components = {}
    for cid, sel in output.sources.items():
        ids = recipe.select.get(sel, [])
        total = sum(recipe.weight(m) for m in ids) or 1.0
        components[cid] = {
            "selection": sel,
            "models": [
                {"id": m, "sha256": hashes[m].sha256 if m in hashes else None, "weight": recipe.weight(m) / total}
                for m in ids
            ],
        }
        fields = recipe.methods.get(sel)
        if fields and fields.get("method", "mean") != "mean":
            from engine.methods.params import resolve  # the method and every parameter, defaults filled

            components[cid]["method"] = resolve(fields).as_dict()
    return {
        "type": "astolfo",
        "interp_method": "weighted_average" if recipe.weights else "average",
        "custom_name": output.title,
        "save_as_half": output.dtype == "F16",
        "dtype": output.dtype,
        "components": components,
    }


def _a1111_models(plan, used, hashes) -> dict:
    """A1111's shape: {sha256: {name, legacy_hash, sd_merge_recipe}} plus the sources' own
    sd_merge_models, so a mix of mixes keeps its whole history."""
    files = {f.model_id: f for f in plan.files}
    out: dict = {}
    for mid in used:
        h = hashes.get(mid)
        if h is None:
            continue
        meta = files[mid].report.metadata
        out[h.sha256] = {
            "name": files[mid].path.stem,
            "legacy_hash": h.autov1,
            "sd_merge_recipe": _json_or_text(meta.get("sd_merge_recipe")),
        }
        nested = _json_or_text(meta.get("sd_merge_models"))
        if isinstance(nested, dict):
            for k, v in nested.items():
                out.setdefault(k, v)
    return out


def _json_or_text(value: str | None):
    if value is None:
        return None
    try:
        return json.loads(value)
    except ValueError:
        return value
