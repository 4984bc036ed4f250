"""The checks ``plan.planner`` runs before building a plan, each adding ``Problem`` values to the
planner so that one run lists every problem of a recipe: settings, model files and components,
pinned hashes and NaN counts known to the catalog, output paths and free disk space."""

from __future__ import annotations

import math
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import humanize

from engine.checkpoint.architectures import architectures
from engine.checkpoint.writer import partial_path
from engine.library.report import CHECKPOINT, Severity
from engine.merge.devices import device_problem
from engine.methods.params import problems as method_problems
from engine.methods.params import resolve as resolve_method
from engine.plan.provenance import PROVENANCE_KEYS, cached_hashes, pin_problem

# Problems after which nodes cannot be built (a reference to something that does not exist).
STRUCTURAL = frozenset({
    "unknown_model", "unknown_selection", "unknown_component", "empty_selection", "duplicate_model",
    "bad_dtype", "bad_weight", "no_outputs", "no_sources", "unknown_arch",
    "bad_method", "bad_method_param", "bad_method_combination", "base_unusable",
})

_HEX = re.compile(r"^[0-9a-f]+$")


def _near(word: str, choices) -> str:
    """ "; did you mean '_x02'?" for an id or name close to one that exists (``_x2`` -> ``_x02``)."""
    from engine.recipe.toml_file import did_you_mean

    hint = did_you_mean(word, list(choices))
    if hint:
        return hint
    m = re.fullmatch(r"(_?[a-z]*)0*([0-9]+)", word, re.IGNORECASE)  # the number written another way
    if m:
        for c in choices:
            n = re.fullmatch(r"(_?[a-z]*)0*([0-9]+)", str(c), re.IGNORECASE)
            if n and (n.group(1).casefold(), n.group(2)) == (m.group(1).casefold(), m.group(2)):
                return f"; did you mean {str(c)!r}?"
    return ""


def check_settings(p, r) -> None:
    from engine.plan.model import OUTPUT_DTYPE

    if not r.name.strip():
        p.warn("name is empty: outputs get no title from it", code="no_name")
    if r.dtype not in OUTPUT_DTYPE:
        p.error(f"dtype {r.dtype!r} is not one of {', '.join(OUTPUT_DTYPE)}", code="bad_dtype")
    problem = device_problem(r.device)
    if problem:
        p.error(problem, code="device")
    if r.arch is not None and r.arch not in architectures():
        p.error(f"arch {r.arch!r} is not one of {', '.join(architectures())}", code="unknown_arch")
    if not r.models:
        p.error("[models] lists no models", code="no_models")
    for mid, entry in r.models.items():
        pin = entry.sha256
        if pin is not None and not (_HEX.match(pin) and len(pin) in (10, 64)):
            p.error(
                f"models.{mid}: sha256 {pin!r} is neither a full SHA256 (64 hex digits) nor an AutoV2 (10)",
                mid,
                code="bad_pin",
            )
    for sel, ids in r.select.items():
        if not ids:
            p.error(f"selection {sel!r} is empty", code="empty_selection")
        for mid in ids:
            if mid not in r.models:
                p.error(
                    f"selection {sel!r} names model {mid!r}, which is not in [models]{_near(mid, r.models)}",
                    mid,
                    code="unknown_model",
                )
        for mid, n in Counter(ids).items():
            if n > 1:
                p.error(
                    f"selection {sel!r} lists model {mid!r} {n} times (use [weights] to weigh a model more)",
                    mid,
                    code="duplicate_model",
                )
    for mid, w in r.weights.items():
        if mid not in r.models:
            p.error(f"weights.{mid}: no model {mid!r} in [models]{_near(mid, r.models)}", mid, code="unknown_weight")
        if not (math.isfinite(w) and w > 0):
            p.error(f"weights.{mid} = {w}: weights must be positive numbers", mid, code="bad_weight")
    for key in r.metadata:
        if key in PROVENANCE_KEYS:
            p.warn(
                f"metadata.{key} is written by the merge itself; the recipe's value is ignored",
                code="metadata_reserved",
            )
    if not r.outputs:
        p.error("no [[output]]: nothing to write", code="no_outputs")
    used = set()
    for out in r.outputs:
        label = str(out.path)
        if out.dtype is not None and out.dtype not in OUTPUT_DTYPE:
            p.error(
                f"output {label}: dtype {out.dtype!r} is not one of {', '.join(OUTPUT_DTYPE)}",
                output=label,
                code="bad_dtype",
            )
        if not out.sources:
            p.error(f'output {label} names no component (e.g. unet = "unet")', output=label, code="no_sources")
        for cid, sel in out.sources.items():
            used.add(sel)
            if sel not in r.select:
                p.error(
                    f"output {label}: {cid} = {sel!r}, but there is no selection {sel!r} in [select]"
                    f"{_near(sel, r.select)}",
                    output=label,
                    code="unknown_selection",
                )
    for sel in r.select:
        if sel not in used:
            p.note(f"selection {sel!r} feeds no output", code="unused_selection")
    check_methods(p, r)


def check_methods(p, r) -> None:
    """Every ``[methods.<selection>]`` table: each bad field named with the value given, the
    combinations that are not defined, and the settings not supported yet."""
    for sel, fields in r.methods.items():
        if sel not in r.select:
            p.error(f"methods.{sel}: there is no selection {sel!r} in [select]", code="unknown_selection")
            continue
        found = method_problems(sel, fields, r.models, r.weights, r.select[sel])
        for code, message in found:
            p.error(message, code=code)
        if found or fields.get("method") == "mean":
            continue
        base = resolve_method(fields).base
        if base in r.select[sel]:
            p.warn(f"methods.{sel}: the base {base} is also a model of the selection: it contributes a zero delta "
                   "(probably a mistake)", base, code="base_in_selection")


def method_bases(r) -> dict[str, str]:
    """selection -> the base model of its method (selections with a valid method and base)."""
    out = {}
    for sel, fields in r.methods.items():
        base = fields.get("base")
        if fields.get("method", "mean") != "mean" and isinstance(base, str) and base in r.models:
            out[sel] = base
    return out


def check_models(p, r, used: list[str]):
    """Every used model must be a readable checkpoint of one architecture and scale, and every
    component taken from it mergeable. Returns the architecture (None when none is readable)."""
    reports = p.reports
    good = [m for m in used if reports[m].kind == CHECKPOINT and reports[m].arch]
    for m in used:
        rep = reports[m]
        if m not in good:
            errors = [f.message for f in rep.all_findings if f.severity >= Severity.ERROR]
            why = errors[0] if errors else f"not a checkpoint astolfo knows ({rep.kind})"
            p.error(f"model {m}: {rep.path}: {why}", m, code="unreadable")
    if not good:
        return None
    arch_id = r.arch if r.arch in architectures() else Counter(reports[m].arch for m in good).most_common(1)[0][0]
    arch = architectures()[arch_id]
    for m in good:
        if reports[m].arch != arch_id:
            p.error(
                f"model {m}: {reports[m].path.name} is {reports[m].arch_label}, not {arch.name}",
                m,
                code="arch_mismatch",
            )
    scales = Counter(reports[m].scale for m in good if reports[m].arch == arch_id)
    if len(scales) > 1:
        common = scales.most_common(1)[0][0]
        for m in good:
            if reports[m].arch == arch_id and reports[m].scale != common:
                p.error(
                    f"model {m}: {reports[m].path.name} is {reports[m].arch_label}; the other models are "
                    f"{'full size' if common == 1 else f'1/{common} scale'}",
                    m,
                    code="scale_mismatch",
                )
    seen = set()
    for out in r.outputs:
        label = str(out.path)
        for cid, sel in out.sources.items():
            if cid not in arch.components:
                p.error(
                    f"output {label}: {arch.name} has no component {cid!r} (it has {', '.join(arch.components)})",
                    output=label,
                    code="unknown_component",
                )
                continue
            base = method_bases(r).get(sel)
            if base is not None and base in good and reports[base].arch == arch_id:
                status = reports[base].components.get(cid)
                if status is None or not status.mergeable:
                    why = status.problem if status is not None else f"{cid} not found"
                    p.error(f"methods.{sel}.base = {base!r}: the base has no usable {cid}, which selection "
                            f"{sel!r} feeds to output {label} ({why})", base, output=label, code="base_unusable")
            for m in r.select.get(sel, ()):
                if m not in good or (m, cid) in seen or reports[m].arch != arch_id:
                    continue
                seen.add((m, cid))
                status = reports[m].components.get(cid)
                if status is None or not status.mergeable:
                    why = status.problem if status is not None else f"{cid} not found"
                    p.error(f"model {m}: {cid} cannot be merged: {why}", m, code="component_unusable")
    for out in r.outputs:
        missing = [c for c in arch.components if c not in out.sources]
        if missing and out.sources:
            p.warn(
                f"output {out.path} takes no {', '.join(missing)}: the file will not contain "
                f"{'it' if len(missing) == 1 else 'them'}",
                output=str(out.path),
                code="component_left_out",
            )
    return arch


def check_hashes(p, r, used: list[str]) -> dict:
    """Hashes the catalog already has (no file is read): pins are checked against them, and
    NaN/Inf counts of the components used are reported before any merging."""
    hashes = cached_hashes([p.recipe.model_path(m) for m in used], used)
    components_used: dict[str, set[str]] = {}
    bases = method_bases(r)
    for out in r.outputs:
        for cid, sel in out.sources.items():
            for m in [*r.select.get(sel, ()), *([bases[sel]] if sel in bases else [])]:
                components_used.setdefault(m, set()).add(cid)
    for m in used:
        pin = r.models[m].sha256
        h = hashes.get(m)
        if pin and h is None:
            p.note(
                f"model {m}: pinned hash not checked yet (file not in the hash cache); "
                "the merge hashes it before writing anything",
                m,
                code="pin_unverified",
            )
        elif pin:
            mismatch = pin_problem(m, r.model_path(m), pin, h.sha256)
            if mismatch:
                p.error(mismatch, m, code="pin_mismatch")
        if h is None:
            continue
        for cid in sorted(components_used.get(m, ())):
            ch = h.components.get(cid)
            if ch is not None and ch.nan_count + ch.inf_count:
                what = f"{ch.nan_count} NaN and {ch.inf_count} Inf values"
                if r.skip_nan:
                    p.warn(
                        f"model {m}: {cid} holds {what}; skip_nan leaves this model out of those keys", m, code="nan"
                    )
                else:
                    p.error(
                        f"model {m}: {cid} holds {what} (set skip_nan = true to leave it out of the affected keys)",
                        m,
                        code="nan",
                    )
    return hashes


def check_outputs(p, r) -> None:
    inputs = {}
    for mid in r.models:
        inputs[os.path.realpath(r.model_path(mid))] = mid
    seen: dict[str, str] = {}
    for out in r.outputs:
        label = str(out.path)
        path = r.output_path(out)
        real = os.path.realpath(path)
        if real in seen:
            p.error(f"output {label}: the same file as output {seen[real]}", output=label, code="output_duplicate")
        seen[real] = label
        if real in inputs or _same_file_as_any(path, r):
            mid = inputs.get(real) or "an input"
            p.error(
                f"output {label} is the input file of model {mid}: inputs are never overwritten",
                mid if mid in r.models else None,
                output=label,
                code="output_is_input",
            )
            continue
        if path.suffix.lower() != ".safetensors":
            p.warn(f"output {label} does not end in .safetensors", output=label, code="output_suffix")
        if path.is_dir():
            p.error(f"output {label} is a folder", output=label, code="output_unwritable")
            continue
        folder = nearest_existing(path.parent)
        if folder is None or not folder.is_dir():
            p.error(f"output {label}: {folder or path.parent} is not a folder", output=label, code="output_unwritable")
        elif not os.access(folder, os.W_OK | os.X_OK):
            p.error(f"output {label}: cannot write in {folder}", output=label, code="output_unwritable")
        elif path.exists():
            p.note(
                f"output {label} exists and will be replaced when the merge completes",
                output=label,
                code="output_exists",
            )


def _same_file_as_any(path: Path, r) -> bool:
    if not path.exists():
        return False
    for mid in r.models:
        try:
            if os.path.samefile(path, r.model_path(mid)):
                return True
        except OSError:
            continue
    return False


def nearest_existing(path: Path) -> Path | None:
    path = Path(os.path.abspath(path))
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return None


def check_disk(p, plan) -> None:
    """Outputs must fit in the free space of their file systems (partials of an interrupted
    run count as free: they are reused or replaced)."""
    need: dict[int, list] = {}
    for out in plan.outputs:
        folder = nearest_existing(out.path.parent)
        if folder is None:
            continue
        try:
            dev = folder.stat().st_dev
        except OSError:
            continue
        entry = need.setdefault(dev, [folder, 0, 0, []])
        entry[1] += out.data_bytes + (1 << 20)
        try:
            entry[2] += partial_path(out.path).stat().st_size
        except OSError:
            pass
        entry[3].append(str(out.path.name))
    for folder, wanted, reusable, names in need.values():
        try:
            free = shutil.disk_usage(folder).free + reusable
        except OSError:
            continue
        if wanted > free:
            p.error(
                f"not enough free disk in {folder}: {', '.join(names)} need {humanize.naturalsize(wanted)}, "
                f"{humanize.naturalsize(free)} free",
                code="disk_full",
            )
