"""``astolfo hash DIR... [--json] [--reference MODEL]``: file hashes users know (AutoV2, SHA256),
per-component fingerprints, the model-toolkit metric, the "=sd" flag, models sharing a
component, and NaN/Inf findings. Results are cached, so a second run reads no tensor data.

Exit status: 0 when all is well, 1 when any file has NaN/Inf values or cannot be read or hashed,
2 on usage errors (no paths, a path or reference that does not exist).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from engine.checkpoint.architectures import component_ids
from engine.hashes.catalog import SDXL_BASE_SHA256, Catalog, CatalogError
from engine.hashes.model import FileHashes, nonfinite_findings
from engine.hashes.relations import ComponentGroup, component_groups, same_as_reference
from engine.library.diagnose import inspect_file
from engine.library.report import UNREADABLE, ModelReport
from engine.library.scan import scan

from ..cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "hash",
        help="file hashes, component fingerprints, shared components, NaN checks (cached)",
        description="Hash every model file under the folders: SHA256/AutoV2 (as CivitAI and A1111 show "
        "them), a fingerprint per component, the model-toolkit metric, whether the text encoders "
        "are SDXL base's (=sd), which models share a component, and NaN/Inf values. Reads each "
        "file once; results are cached, so unchanged files are not read again.",
    )
    parser.add_argument("paths", nargs="+", metavar="DIR", help="folders (searched recursively) or files")
    parser.add_argument("--json", action="store_true", help="one JSON object per file (JSON lines)")
    parser.add_argument(
        "--reference",
        metavar="MODEL",
        action="append",
        default=[],
        help="mark a model (id or path) as a reference for =sd; remembered in the catalog "
        "(SDXL base, by its SHA256, always is one)",
    )
    parser.add_argument("--jobs", type=int, default=0, metavar="N",
                        help="files hashed at once (default: one per three usable cores)")
    parser.set_defaults(run=run)


def run(args) -> int:
    try:
        reports = scan(args.paths)
    except FileNotFoundError as e:
        print(f"astolfo hash: {e}", file=sys.stderr)
        return EXIT_USAGE
    references: list[ModelReport] = []
    for name in args.reference:
        ref = _find_reference(name, reports)
        if ref is None:
            print(f"astolfo hash: --reference {name}: no model with that id or path", file=sys.stderr)
            return EXIT_USAGE
        references.append(ref)
    try:
        catalog = Catalog()
    except CatalogError as e:
        print(f"astolfo hash: cannot open the hash catalog: {e}", file=sys.stderr)
        return EXIT_FAILED
    with catalog:
        if catalog.recovered_from is not None:
            print(f"astolfo hash: the catalog was unreadable; moved to {catalog.recovered_from}", file=sys.stderr)
        extra = [r for r in references if not any(r is m for m in reports)]
        errors: dict[str, str] = {}
        try:
            hashes = _hash_all(catalog, reports + extra, errors, args.jobs or None)
            for ref in references:
                if ref.model_id in hashes:
                    catalog.mark_reference(hashes[ref.model_id].sha256, ref.model_id or ref.path.name)
            known_refs = catalog.reference_hashes()
        except CatalogError as e:
            print(f"astolfo hash: {e}", file=sys.stderr)
            return EXIT_FAILED
        in_folder = {r.model_id: hashes[r.model_id] for r in reports if r.model_id in hashes}
    flags = same_as_reference(in_folder, known_refs)
    groups, labels = _shared(in_folder)
    if args.json:
        _print_json(reports, hashes, errors, flags, labels)
    else:
        _print_table(reports, hashes, errors, flags, labels, groups, known_refs)
    failed = bool(errors) or any(r.kind == UNREADABLE for r in reports)
    failed = failed or any(nonfinite_findings(h) for h in in_folder.values())
    return EXIT_FAILED if failed else EXIT_OK


def _find_reference(name: str, reports: list[ModelReport]) -> ModelReport | None:
    for r in reports:
        if r.model_id == name:
            return r
    for r in reports:
        if r.model_id.casefold() == name.casefold():
            return r
    path = Path(name)
    if not path.is_file():
        return None
    real = os.path.realpath(path)
    for r in reports:
        if os.path.realpath(r.path) == real:
            return r
    return inspect_file(path, "")


def _hash_all(catalog: Catalog, reports: list[ModelReport], errors: dict[str, str],
              jobs: int | None = None) -> dict[str, FileHashes]:
    """Hash what the catalog lacks, several files at once: an overall bar and one per file."""
    console = Console(stderr=True)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("hashing", total=None)
        per_file: dict[int, object] = {}

        def on_file(report: ModelReport, cached: bool) -> None:
            if not cached:
                per_file[id(report)] = progress.add_task(f"  {report.model_id or report.path.name}",
                                                         total=report.file_size or None)

        def on_file_progress(report: ModelReport, done: int, total: int) -> None:
            if id(report) in per_file:
                progress.update(per_file[id(report)], completed=done, total=total)

        def on_file_done(report: ModelReport) -> None:
            if id(report) in per_file:
                progress.remove_task(per_file.pop(id(report)))

        def on_progress(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        def on_error(report: ModelReport, message: str) -> None:
            errors[report.model_id] = message
            console.print(Text(f"cannot hash {report.path}: {message}", style="red"))

        return catalog.hash_reports(reports, on_progress=on_progress, on_error=on_error, on_file=on_file, jobs=jobs,
                                    on_file_progress=on_file_progress, on_file_done=on_file_done)


def _shared(hashes: dict[str, FileHashes]) -> tuple[list[ComponentGroup], dict[str, list[str]]]:
    """Groups of models with the same weights (fp16 hash) and, per model, its group labels:
    "te0#1" where its bytes equal another member's, "≈te0#1" where only the values up to fp16
    do (an fp32 copy of an fp16 model, a copy without position_ids)."""
    groups = component_groups(hashes, "fp16")
    labels: dict[str, list[str]] = {}
    for g in groups:
        exact = [hashes[m].components[g.component].exact for m in g.model_ids]
        for m, digest in zip(g.model_ids, exact):
            mark = "" if exact.count(digest) > 1 else "≈"
            labels.setdefault(m, []).append(mark + g.label)
    return groups, labels


def _legend(g: ComponentGroup, hashes: dict[str, FileHashes]) -> str:
    exact = [hashes[m].components[g.component].exact for m in g.model_ids]
    same = [m for m, d in zip(g.model_ids, exact) if exact.count(d) > 1]
    near = [m for m in g.model_ids if m not in same]
    parts = []
    if same:
        parts.append(f"byte-identical in {', '.join(same)}")
    if near:
        parts.append(f"{'also ' if same else ''}identical up to fp16 in {', '.join(near)}")
    return f"  {g.label}: {g.component} " + "; ".join(parts)


def _metric(h: FileHashes) -> str:
    te = h.components.get("te0") or h.components.get("te")
    vae = h.components.get("vae")
    if te is None and vae is None:
        return ""
    return f"{(te.metric if te else None) or '----'}/{(vae.metric if vae else None) or '----'}"


def _flag(value: bool | None) -> Text:
    if value is None:
        return Text("-", style="dim")
    return Text("yes", style="green") if value else Text("no")


def _print_table(reports, hashes, errors, flags, labels, groups, known_refs) -> None:
    """The table, then the shared-component legend, then the problems, one line each. Where one
    table would not fit the terminal, component hashes get a table of their own."""
    console = Console()
    cids = [c for c in component_ids() if any(c in h.components for h in hashes.values())]
    id_width = max((len(r.model_id) for r in reports), default=2)
    shared_width = max((len(" ".join(v)) for v in labels.values()), default=6)
    one_table = id_width + 10 + 8 * len(cids) + 9 + 3 + shared_width + 2 * (len(cids) + 6) <= console.width
    main = _table(id_width, ["AutoV2", *(cids if one_table else []), "CLIP/VAE", "=sd", "shared"])
    side = None if one_table else _table(id_width, cids)
    problems: list[tuple[str, str]] = []
    for r in reports:
        h = hashes.get(r.model_id)
        if r.kind == UNREADABLE:
            problems.append((r.model_id, "not a readable safetensors file (file hashes only)"))
        if h is None:
            problems.append((r.model_id, f"cannot hash: {errors.get(r.model_id, 'not hashed')}"))
            main.add_row(Text(r.model_id), Text("-", style="red"))
            continue
        problems.extend((r.model_id, f.message) for f in nonfinite_findings(h))
        cells = [Text(h.components[c].exact_short) if c in h.components else Text("·", style="dim") for c in cids]
        flag, metric, shared = _flag(flags.get(r.model_id)), _metric(h), " ".join(labels.get(r.model_id, []))
        if one_table:
            main.add_row(Text(r.model_id), h.autov2, *cells, metric, flag, shared)
        else:
            main.add_row(Text(r.model_id), h.autov2, metric, flag, shared)
            if h.components:
                side.add_row(Text(r.model_id), *cells)
    if reports:
        console.print(main)
    if side is not None and side.row_count:
        console.print(side)
    for g in groups:
        console.print(_legend(g, hashes))
    for model_id, message in problems:
        console.print(Text(f"  {model_id}: {message}", style="bold red"))
    bad = len({m for m, _ in problems})
    summary = f"{len(reports)} model file(s), {len(hashes)} hashed"
    if bad:
        summary += f", {bad} with problems"
    console.print(summary, style="red" if bad else None)
    if not known_refs:
        console.print(
            f"=sd: no reference model known yet: hash SDXL base (sha256 {SDXL_BASE_SHA256[:12]}…) "
            "once, or pass --reference MODEL",
            style="dim",
        )


def _table(id_width: int, columns: list[str]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))
    table.add_column("id", style="bold", no_wrap=True, min_width=id_width)
    for name in columns:
        table.add_column(name, no_wrap=name != "shared", overflow="fold" if name == "shared" else "ellipsis")
    return table


def _print_json(reports, hashes, errors, flags, labels) -> None:
    try:
        for r in reports:
            h = hashes.get(r.model_id)
            findings = [f.to_dict() for f in nonfinite_findings(h)] if h else []
            obj = {
                "id": r.model_id,
                "path": str(r.path),
                "hashes": h.to_dict() if h else None,
                "same_as_reference": flags.get(r.model_id),
                "groups": labels.get(r.model_id, []),
                "findings": findings,
                "error": errors.get(r.model_id),
            }
            sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
