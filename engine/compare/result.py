"""A comparison's result as the plain dict ``astolfo compare --json`` prints and the cache
stores: ``{"reference", "components": {comp: {models, cosine, norm, relative_norm, consensus,
influence, blocks: {block: same keys}}}, "findings": [...], "left_out": [...]}``.

Findings of a UNet block are kept only where they say something the whole UNet's do not (the
same code and models as a UNet finding is dropped), so a clone is not reported twenty times.
"""

from __future__ import annotations

import numpy as np

from engine.compare.blocks import COMPONENTS
from engine.compare.findings import Thresholds, group_findings
from engine.compare.gather import Gathered
from engine.compare.stats import group_stats


def build_result(gathered: Gathered, ids: list[str], reference: str | None, th: Thresholds,
                 left_out: list[dict], hashes: list[dict[str, str]] | None = None) -> dict:
    """``hashes``: per source, its components' exact hashes from the catalog (empty if unknown)."""
    hashes = hashes or [{} for _ in ids]
    components: dict[str, dict] = {}
    findings: list[dict] = []
    for comp in COMPONENTS:
        if comp not in gathered.grams:
            continue
        members = list(gathered.members[comp])
        blocks = gathered.grams[comp]
        total = np.zeros_like(next(iter(blocks.values())))
        for g in blocks.values():  # fixed order: UNET_BLOCKS, then keys outside them
            total = total + g
        if not np.all(np.isfinite(total)):  # NaN/Inf values the hashes did not already rule out
            bad = [k for k in range(len(members)) if not np.isfinite(total[k, k])]
            keep = [k for k in range(len(members) + 1) if k not in bad]
            names = ", ".join(ids[members[k]] for k in bad)
            for k in bad:
                left_out.append({"id": ids[members[k]], "component": comp, "reason": f"NaN or Inf values in {comp}"})
            total = total[np.ix_(keep, keep)]
            blocks = {b: g[np.ix_(keep, keep)] for b, g in blocks.items()}
            members = [members[k] for k in keep[:-1]]
            if not np.all(np.isfinite(total)) or not members:  # against the mean, every delta has them
                for i in members:
                    left_out.append({"id": ids[i], "component": comp,
                                     "reason": f"{comp} not compared: NaN or Inf values in {names or 'the reference'}"})
                continue
        models = [ids[i] for i in members]
        same = [hashes[i].get(comp) for i in members]
        stats = group_stats(total, mean_reference=reference is None)
        entry = stats.to_dict(models)
        found = [dict(f, component=comp, block=None) for f in group_findings(stats, models, th, same)]
        seen = {(f["code"], tuple(f["models"])) for f in found}
        findings.extend(found)
        if comp == "unet":
            entry["blocks"] = {}
            for block, g in blocks.items():
                if block is None:
                    continue
                bstats = group_stats(g, mean_reference=reference is None)
                entry["blocks"][block] = bstats.to_dict(models)
                for f in group_findings(bstats, models, th, same):  # equal components: equal blocks
                    if (f["code"], tuple(f["models"])) not in seen:
                        findings.append(dict(f, component=comp, block=block))
        components[comp] = entry
    for i, why in sorted(gathered.left_out.items()):
        for comp, reason in why.items():
            left_out.append({"id": ids[i], "component": comp, "reason": reason})
    return {"reference": reference, "components": components, "findings": findings,
            "left_out": left_out, "thresholds": th.to_dict()}


def model_codes(result: dict, component: str) -> dict[str, list[str]]:
    """Per model, the codes of the whole-component findings naming it (first seen first): the
    "findings" column of the CLI's table and of the app's compare screen."""
    codes: dict[str, list[str]] = {}
    for f in result["findings"]:
        if f["component"] == component and f["block"] is None:
            for m in f["models"]:
                have = codes.setdefault(m, [])
                if f["code"] not in have:
                    have.append(f["code"])
    return codes


def findings_of(result: dict, model_id: str) -> list[dict]:
    """The findings naming ``model_id``, whole components first (for the details pane)."""
    found = [f for f in result["findings"] if model_id in f["models"]]
    return sorted(found, key=lambda f: (f["block"] is not None, f["component"], f["block"] or ""))


def describe(f: dict) -> str:
    """One finding in words, e.g. ``_x07 ~ 0.50 _x02 + 0.50 _x05 (residual 2%)``."""
    m = f["models"]
    code = f["code"]
    if code == "combination":
        terms = " + ".join(f"{w:.2f} {x}" for w, x in zip(f["weights"], m[1:]))
        return f"{m[0]} ~ {terms} (residual {f['residual']:.0%})"
    if code == "near_duplicate":
        return f"{m[0]} and {m[1]}: cosine {f['cosine']:.4f}"
    if code == "outlier":
        return f"{m[0]}: {f['measure']} z = {f['z']:+.1f}"
    if code == "unchanged":
        return f"the reference's: {', '.join(m)}"
    if code == "identical":
        return ", ".join(m) + (" (same component hash)" if f.get("basis") == "hashes" else " (zero distance)")
    return ", ".join(m)
