"""Rich rendering of scan results: one row per model file, one glyph per component.

Shared by ``astolfo scan`` and by ``launch_app`` when the app cannot start.
"""

from __future__ import annotations

from collections.abc import Sequence

import humanize
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from engine.library.report import ABSENT, CHECKPOINT, PARTIAL, ComponentStatus, Finding, ModelReport, Severity

_SEVERITY_STYLE = {Severity.OK: "green", Severity.WARNING: "yellow", Severity.ERROR: "red"}
_KIND_LABEL = {
    "lora": "LoRA",
    "diffusers": "diffusers",
    "pickle": "pickle",
    "unreadable": "unreadable",
    "unknown": "unknown",
}
LEGEND = "✓ present  ! with a warning  ◐ partial  · absent  ✗ cannot be merged"
_MAX_FINDINGS = 3


def component_glyph(status: ComponentStatus | None) -> Text:
    """One cell: what state a component is in and whether it can be merged."""
    if status is None:
        return Text("")
    if status.state == ABSENT:
        return Text("·", style="dim red")
    severity = status.severity
    if severity >= Severity.ERROR:
        return Text("✗", style="bold red")
    if status.state == PARTIAL:
        return Text("◐", style="yellow")
    if severity >= Severity.WARNING:
        return Text("!", style="yellow")
    return Text("✓", style="green")


def findings_text(report: ModelReport, verbose: bool = False) -> Text:
    """Worst findings first, one per line, with the component they concern."""
    shown = _findings(report, verbose)
    text = Text()
    for i, (where, finding) in enumerate(shown[:_MAX_FINDINGS]):
        if i:
            text.append("\n")
        text.append_text(_finding_line(where, finding))
    if len(shown) > _MAX_FINDINGS:
        text.append(f"\n+{len(shown) - _MAX_FINDINGS} more (astolfo scan --json shows all)", style="dim")
    return text


def _findings(report: ModelReport, verbose: bool) -> list[tuple[str, Finding]]:
    """(where, finding) worst first; one line for a message that several components share
    (a scaled-fp8 file says the same of all four)."""
    groups: dict[tuple, list[Finding]] = {}
    for f in report.all_findings:
        if verbose or f.severity > Severity.OK:
            groups.setdefault((f.severity, f.code, f.message), []).append(f)
    lines = []
    for same in groups.values():
        components = [f.component for f in same if f.component]
        lines.append((", ".join(components) + ": " if components else "", same[0]))
    return sorted(lines, key=lambda line: -line[1].severity)


def _finding_line(where: str, finding: Finding) -> Text:
    style = _SEVERITY_STYLE[finding.severity] if finding.severity > Severity.OK else "dim"
    return Text(where + finding.message, style=style)


def scan_table(reports: Sequence[ModelReport], verbose: bool = False, with_findings: bool = True) -> Table:
    component_ids: list[str] = []
    for report in reports:
        for cid in report.components:
            if cid not in component_ids:
                component_ids.append(cid)
    rows = []
    for report in reports:
        if report.kind == CHECKPOINT:
            arch = Text(report.arch_label if with_findings else _short_arch(report))
        else:
            arch = Text(_KIND_LABEL.get(report.kind, report.kind), style="red")
        if report.is_astolfo_output:
            arch.append(" mix", style="magenta")  # written by astolfo: an output, not a source model
        rows.append(
            [
                Text(report.model_id, style="bold"),
                Text(report.file_name),
                arch,
                Text(report.main_dtype or ""),
                Text(humanize.naturalsize(report.file_size)),
                *(component_glyph(report.components.get(cid)) for cid in component_ids),
                *([findings_text(report, verbose)] if with_findings else []),
            ]
        )

    def fixed(i: int, header: str) -> int:  # columns that must never shrink or vanish
        return max([len(header)] + [row[i].cell_len for row in rows])

    table = Table(header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True)
    table.add_column("id", width=fixed(0, "id"))
    table.add_column("file", overflow="ellipsis", min_width=10, max_width=40)  # the one that gives way
    for i, header in enumerate(["arch", "dtype", "size", *component_ids], start=2):
        table.add_column(header, width=fixed(i, header), justify="right" if header == "size" else "left")
    for cid in component_ids:
        table.columns[-len(component_ids) + component_ids.index(cid)].justify = "center"
    if with_findings:
        table.add_column("findings", overflow="fold", min_width=40, ratio=1)
    for row in rows:
        table.add_row(*row)
    return table


def _short_arch(report: ModelReport) -> str:
    """"SDXL 1.0 1/32" for "SDXL 1.0 (1/32 scale)", to fit 80 columns."""
    name = report.arch_name or ""
    return f"{name} 1/{report.scale}" if report.scale > 1 else name


def scan_summary(reports: Sequence[ModelReport], paths: Sequence[str] = (), hashed: int | None = None) -> Text:
    """The counts line. Headers say nothing about the weights' values, so it says where NaN/Inf
    are checked, and (``hashed``) for how many files the hash catalog already has them."""
    if not reports:
        where = ", ".join(str(p) for p in paths) or "the given paths"
        return Text(f"no model files (.safetensors, .sft, .ckpt, .pt, .pth, .bin) in {where}", style="yellow")
    counts = {s: sum(1 for r in reports if r.severity == s) for s in Severity}
    text = Text(f"{len(reports)} files: ")
    text.append(f"{counts[Severity.OK]} fine", style="green")
    text.append(", ")
    text.append(f"{counts[Severity.WARNING]} with warnings", style="yellow")
    text.append(", ")
    text.append(f"{counts[Severity.ERROR]} with errors", style="red" if counts[Severity.ERROR] else "")
    note = "headers only: weight values (NaN/Inf) are checked by `astolfo hash`"
    if hashed is not None:
        note += f" ({hashed} of {len(reports)} already hashed, their findings included)"
    text.append(f"\n{note}", style="dim")
    return text


# Narrower than this, findings go in a list under the table instead of a column.
WIDE = 150


def render_scan(console: Console, reports: Sequence[ModelReport], verbose: bool = False) -> None:
    wide = console.width >= WIDE
    console.print(scan_table(reports, verbose, with_findings=wide))
    console.print(Text(LEGEND, style="dim"))
    if wide:
        return
    for report in reports:
        for where, finding in _findings(report, verbose):
            line = Text(f"{report.model_id:<6} ", style="bold")
            line.append_text(_finding_line(where, finding))
            console.print(line)
