"""The details pane: everything known about the highlighted model, in full — each component's
state and findings, every hash in full form, the file's metadata (ModelSpec, training tags),
its path and size."""

from __future__ import annotations

import json

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Static

from astolfo_tui.widgets.selection_grid import DIM, ERROR, OK, WARN
from engine.library.report import ModelReport, Severity

SEVERITY_STYLE = {Severity.OK: OK, Severity.WARNING: WARN, Severity.ERROR: ERROR}
SEVERITY_GLYPH = {Severity.OK: "·", Severity.WARNING: "!", Severity.ERROR: "✗"}
STATE_STYLE = {"present": OK, "partial": WARN, "absent": DIM}
MODELSPEC = "modelspec."
TRAINING_PREFIXES = ("ss_", "sshs_")


class DetailsPane(Horizontal):
    """Two scrollable halves: the model (state, findings, metadata) and its hashes in full."""

    def compose(self):
        with VerticalScroll(id="details-main"):
            yield Static(id="details-body")
        with VerticalScroll(id="details-hashes"):
            yield Static(id="details-hash-body")

    def show(self, report: ModelReport | None, hashes=None, comparison: dict | None = None,
             weight: float = 1.0) -> None:
        body = self.query_one("#details-body", Static)
        hash_body = self.query_one("#details-hash-body", Static)
        if report is None:
            body.update(Text("No model.", style=DIM))
            hash_body.update("")
            return
        body.update(render_details(report, hashes, comparison, weight))
        hash_body.update(render_hashes(report, hashes))


def render_details(report: ModelReport, hashes, comparison: dict | None = None, weight: float = 1.0) -> RenderableType:
    """``hashes`` is the engine's FileHashes for this file, or None while hashing is pending;
    ``comparison`` the last compare result over the library, if any; ``weight`` its [weights]
    entry in the recipe (1 when it has none, and then not shown)."""
    parts: list[RenderableType] = [_title(report, weight), _components_table(report, hashes)]
    findings = _findings(report, hashes)
    if findings.plain:
        parts.append(findings)
    compared = _compare_findings(report.model_id, comparison)
    if compared.plain:
        parts.append(compared)
    meta = _metadata(report)
    if meta is not None:
        parts.append(meta)
    return Group(*parts)


def render_hashes(report: ModelReport, hashes) -> RenderableType:
    """Every hash in full: the file's (as web UIs and CivitAI show them) and each component's."""
    t = Text(no_wrap=True, overflow="ellipsis")
    t.append("hashes\n", style="bold underline")
    if hashes is None:
        t.append("computing…" if report.kind != "unreadable" else "not hashed: the file cannot be read", style=DIM)
        return t
    for label, value in (
        ("SHA256", hashes.sha256),
        ("AutoV2", hashes.autov2),
        ("AutoV1", hashes.autov1),
        ("AutoV3", hashes.autov3),
    ):
        t.append(f"{label:<7}", style="bold")
        t.append(f"{value or '-'}\n")
    for cid, ch in hashes.components.items():
        t.append(f"{cid:<5}", style="bold")
        t.append("exact ", style=DIM)
        t.append(f"{ch.exact}\n")
        t.append(" " * 5)
        t.append("fp16  ", style=DIM)
        t.append(f"{ch.fp16}\n", style=DIM)
    t.rstrip()
    return t


def _title(report: ModelReport, weight: float = 1.0) -> Text:
    t = Text()
    t.append(report.model_id, style="bold #7aa2f7")
    t.append("  ")
    t.append(report.file_name, style="bold")
    if weight != 1.0:
        t.append(f"  weight {weight:g}", style=f"bold {WARN}")
    t.append("\n")
    facts = [f"{report.file_size:,} bytes"]
    if report.arch:
        facts.append(report.arch + (f" (synthetic, 1/{report.scale} size)" if report.scale > 1 else ""))
    else:
        facts.append(report.kind)
    if report.dtypes:
        facts.append(" ".join(f"{d}×{n}" for d, n in sorted(report.dtypes.items(), key=lambda x: -x[1])))
    if report.extra_keys:
        facts.append(f"{len(report.extra_keys)} extra keys ({report.extra_bytes / 1e6:,.1f} MB)")
    t.append(" · ".join(facts), style=DIM)
    t.append("\n")
    t.append(str(report.path), style=DIM)
    return t


def _components_table(report: ModelReport, hashes) -> Table:
    table = Table(box=None, pad_edge=False, expand=False, header_style="bold", padding=(0, 1))
    for name in ("", "state", "keys", "dtype", "size", "hash", "metric", "NaN/Inf"):
        table.add_column(name, no_wrap=True)
    comps = hashes.components if hashes is not None else {}
    for cid, comp in report.components.items():
        ch = comps.get(cid)
        severity = comp.severity
        state = Text(comp.state, style=STATE_STYLE.get(comp.state, ""))
        if severity > Severity.OK:
            state.append(f" {SEVERITY_GLYPH[severity]}", style=f"bold {SEVERITY_STYLE[severity]}")
        bad = (ch.nan_count + ch.inf_count) if ch is not None else 0
        table.add_row(
            Text(cid, style="bold"),
            state,
            f"{comp.keys_found}/{comp.keys_expected}",
            ",".join(comp.dtypes) or "",
            _mb(comp.nbytes),
            Text(ch.exact_short if ch else ("…" if hashes is None else ""), style="" if ch else DIM),
            (ch.metric or "") if ch else "",
            Text(str(bad), style=f"bold {ERROR}") if bad else Text("0" if ch else "", style=DIM),
        )
    return table


def _findings(report: ModelReport, hashes) -> Text:
    out = Text()
    for f in sorted(report.all_findings, key=lambda f: -f.severity):
        out.append(f" {SEVERITY_GLYPH[f.severity]} ", style=f"bold {SEVERITY_STYLE[f.severity]}")
        if f.component:
            out.append(f"{f.component}: ", style="bold")
        out.append(f.message)
        out.append(f"  [{f.code}]\n", style=DIM)
    if hashes is not None:
        for cid, ch in hashes.components.items():
            if ch.nan_count or ch.inf_count:
                out.append(" ✗ ", style=f"bold {ERROR}")
                out.append(f"{cid}: ", style="bold")
                out.append(f"{ch.nan_count} NaN and {ch.inf_count} Inf values: this component cannot be merged\n")
    out.rstrip()
    return out


def _compare_findings(model_id: str, comparison: dict | None) -> Text:
    """What the comparison found about this model, in words (component and block first)."""
    from engine.compare.result import describe, findings_of

    out = Text()
    if not comparison:
        return out
    found = findings_of(comparison, model_id)
    left = [x for x in comparison.get("left_out", []) if x.get("id") == model_id]
    if not found and not left:
        return out
    out.append("compare\n", style="bold underline")
    for f in found:
        where = f["component"] + (f" {f['block']}" if f["block"] else "")
        out.append(f" {where:<10}", style="bold")
        out.append(f"{f['code']:<15}", style="#7dcfff")
        out.append(describe(f) + "\n")
    for x in left:
        out.append(f" {x.get('component') or 'all':<10}", style="bold")
        out.append(f"{'left out':<15}", style=WARN)
        out.append(x["reason"] + "\n")
    out.rstrip()
    return out


def _metadata(report: ModelReport) -> RenderableType | None:
    meta = report.metadata
    if not meta:
        return None
    table = Table(box=None, pad_edge=False, show_header=False, padding=(0, 1))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    spec = {k: v for k, v in meta.items() if k.startswith(MODELSPEC)}
    training = {k: v for k, v in meta.items() if k.startswith(TRAINING_PREFIXES)}
    for key, value in spec.items():
        table.add_row(Text(key), Text(_short(value)))  # a file's own text: never markup
    tags = _top_tags(training.get("ss_tag_frequency"))
    if tags:
        table.add_row("training tags", Text(tags))
    for key in sorted(training):
        if key != "ss_tag_frequency":
            table.add_row(Text(key), Text(_short(training[key])))
    others = len(meta) - len(spec) - len(training)
    if others:
        rest = ", ".join(sorted(k for k in meta if not k.startswith((MODELSPEC, *TRAINING_PREFIXES)))[:12])
        table.add_row("other keys", Text(rest, style=DIM))
    return Group(Text("metadata", style="bold underline"), table)


def _top_tags(raw: str | None, limit: int = 12) -> str:
    """kohya's ``ss_tag_frequency`` is JSON text: {dataset: {tag: count}}; show the top tags."""
    if not raw:
        return ""
    try:
        data = json.loads(raw)
        counts: dict[str, int] = {}
        for tags in data.values():
            for tag, n in tags.items():
                counts[tag.strip()] = counts.get(tag.strip(), 0) + int(n)
    except (ValueError, AttributeError, TypeError):
        return _short(raw)
    top = sorted(counts.items(), key=lambda x: -x[1])[:limit]
    return ", ".join(f"{tag} ({n})" for tag, n in top)


def _short(value: str, limit: int = 240) -> str:
    return value if len(value) <= limit else value[:limit] + f"… ({len(value):,} chars)"


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n else ""
