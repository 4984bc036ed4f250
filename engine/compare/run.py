"""``compare``: from model reports to a result dict, with the reference chosen, broken files
left out (by name and reason), the cache consulted first and filled after.

The reference is the one named (an id among the models, or a path), else the first model whose
SHA256 is a reference (SDXL base, or one the user marked "=sd"), else the mean of the models. A
reference that is among the models is not compared against itself. A file that fails while it
is read is left out and the pass rerun without it (against the mean every delta depends on
every model), so the rest is still compared.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable

from engine.compare.events import BadDevice, CacheHit, CompareError, LeftOut, UnknownReference
from engine.compare.findings import Thresholds
from engine.library.report import ModelReport, Severity

Event = Callable[[object], None]


def _problem(report: ModelReport) -> str | None:
    if report.severity >= Severity.ERROR:
        errors = [f.message for f in report.all_findings if f.severity >= Severity.ERROR]
        return "; ".join(dict.fromkeys(errors)) or "unreadable"  # one reason per tensor kind, said once
    if report.arch != "sdxl":
        return f"not an SDXL checkpoint ({report.arch_label or report.kind})"
    if not report.key_map:
        return "no tensors recognised"
    return None


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def resolve_reference(reports: list[ModelReport], reference: str) -> ModelReport:
    """The report of ``reference``: a model id among ``reports``, else a file path."""
    for r in reports:
        if r.model_id == reference:
            return r
    if os.path.isfile(reference):
        for r in reports:
            if _same_file(r.path, reference):
                return r
        from engine.library.diagnose import inspect_file

        return inspect_file(reference, model_id=Path(reference).stem)
    raise UnknownReference(f"reference {reference!r} is neither a model id nor a file")


def compare(
    reports: list[ModelReport],
    reference: str | None = None,
    cancel: threading.Event | None = None,
    on_event: Event | None = None,
    thresholds: Thresholds = Thresholds(),
    use_cache: bool = True,
    catalog_path: str | os.PathLike | None = None,
    budget_bytes: int | None = None,
    device: str = "auto",
) -> dict:
    """Compare the models of ``reports`` (grid order) and return the result dict (see
    ``engine.compare.result``); raises CompareError when nothing can be compared, BadDevice
    when ``device`` (auto, cpu, cuda, cuda:N) cannot be used here. A cached result is the same
    whichever device computed it (the devices agree to fp64 rounding)."""
    from engine.merge.devices import device_problem

    problem = device_problem(device)  # before any file is read; imports torch only for "cuda..."
    if problem:
        raise BadDevice(problem)
    emit = on_event or (lambda e: None)
    left_out: list[dict] = []

    def leave_out(r: ModelReport, reason: str) -> None:
        left_out.append({"id": r.model_id, "component": None, "reason": reason, "path": str(r.path)})
        emit(LeftOut(r.model_id, str(r.path), reason))

    ref_report = resolve_reference(reports, reference) if reference else None
    if ref_report is not None:
        why = _problem(ref_report)
        if why:
            raise CompareError(f"reference {ref_report.model_id}: {why}")
    models: list[ModelReport] = []
    for r in reports:
        if ref_report is not None and (r is ref_report or _same_file(r.path, ref_report.path)):
            continue
        why = _problem(r)
        if why:
            leave_out(r, why)
        else:
            models.append(r)

    cache = catalog = None
    shas: dict[str, str] = {}
    nonfinite: dict[str, dict[str, str]] = {}  # path -> component -> reason, from the hashes
    exact: dict[str, dict[str, str]] = {}  # path -> component -> exact hash, for "identical"
    try:
        if use_cache:
            from engine.compare.cache import ResultCache
            from engine.hashes.catalog import Catalog, CatalogError
            from engine.hashes.model import HashError

            cache = ResultCache(catalog_path)
            try:
                catalog = Catalog(catalog_path)
            except CatalogError:
                catalog = None
            if catalog is not None:
                for r in [*models, *([ref_report] if ref_report else [])]:
                    try:
                        hashes = catalog.hash_file(r.path, r, cancel=cancel)
                        shas[str(r.path)] = hashes.sha256
                        exact[str(r.path)] = {cid: c.exact for cid, c in hashes.components.items()}
                        for cid, c in hashes.components.items():
                            if c.nonfinite:
                                nonfinite.setdefault(str(r.path), {})[cid] = (
                                    f"{c.nan_count} NaN and {c.inf_count} Inf values in {cid}")
                    except HashError as e:
                        if cancel is not None and cancel.is_set():
                            from engine.compare.events import CompareCancelled

                            raise CompareCancelled() from None
                        if r is ref_report:
                            raise CompareError(f"reference {r.model_id}: {e.reason}") from None
                        leave_out(r, e.reason)
                models = [r for r in models if str(r.path) in shas]
                if ref_report is None:
                    marks = catalog.reference_sha256s()
                    ref_report = next((r for r in models if shas[str(r.path)] in marks), None)
                    if ref_report is not None:
                        models = [r for r in models if r is not ref_report]

        def key_for(ms: list[ModelReport]) -> str | None:
            if cache is None or catalog is None:
                return None
            from engine.compare.cache import result_key

            ref_sha = shas[str(ref_report.path)] if ref_report is not None else None
            return result_key([(r.model_id, shas[str(r.path)]) for r in ms], ref_sha, thresholds.to_dict())

        key = key_for(models)
        if key is not None:
            hit = cache.get(key)
            if hit is not None:
                emit(CacheHit(key))
                hit["left_out"] = left_out + hit.get("left_out", [])
                return hit
        result = _compute(models, ref_report, cancel, emit, thresholds, budget_bytes, leave_out, nonfinite, exact,
                          device)
        # the models actually compared (a read failure drops one): key and store on those
        compared = [r for r in models if not any(x["id"] == r.model_id and x["component"] is None
                                                 for x in left_out)]
        key = key_for(compared)
        if key is not None:
            cache.put(key, result)  # its left_out holds only the per-component ones
        return dict(result, left_out=left_out + result["left_out"])
    finally:
        if cache is not None:
            cache.close()
        if catalog is not None:
            catalog.close()


def _compute(models, ref_report, cancel, emit, thresholds, budget_bytes, leave_out, nonfinite, exact,
             device) -> dict:
    from engine.checkpoint.format import SafetensorsError
    from engine.compare.gather import ReadFailure, Source, gather
    from engine.compare.result import build_result

    live = list(models)
    while True:
        need = 1 if ref_report is not None else 2
        if len(live) < need:
            raise CompareError("no model could be compared" if not live else
                               "one model and no reference: nothing to compare it with")
        sources = [Source(r.model_id, Path(r.path), r.key_map) for r in live]
        ref = Source(ref_report.model_id, Path(ref_report.path), ref_report.key_map) if ref_report else None
        if ref_report is not None and nonfinite.get(str(ref_report.path)):
            raise CompareError(f"reference {ref_report.model_id}: "
                               + "; ".join(nonfinite[str(ref_report.path)].values()))
        skip = {i: nonfinite[str(r.path)] for i, r in enumerate(live) if str(r.path) in nonfinite}
        try:
            gathered = gather(sources, ref, cancel=cancel, on_event=emit,
                              budget_bytes=budget_bytes, skip=skip, device=device)
        except ReadFailure as e:
            leave_out(live[e.index], e.reason)
            del live[e.index]
            continue
        except SafetensorsError as e:  # a header that no longer reads (file replaced meanwhile)
            bad = next((r for r in live if str(r.path) == str(e.path)), None)
            if bad is None:
                raise CompareError(str(e)) from None
            leave_out(bad, e.reason)
            live.remove(bad)
            continue
        ids = [r.model_id for r in live]
        result = build_result(gathered, ids, ref_report.model_id if ref_report else None, thresholds, [],
                              [exact.get(str(r.path), {}) for r in live])
        return result
