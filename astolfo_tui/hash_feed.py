"""Feeds hash results to the grid as they arrive: cached files at once (no data read), then each
remaining file as ``engine.hashes.catalog.Catalog.hash_file`` finishes it (several files at once where
the cores allow: ``engine.hashes.parallel``), with the relations
(identical-component groups, "=sd") recomputed by the catalog's own functions each time.

Runs in a worker thread; the callbacks hand results to the UI thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from astolfo_tui.widgets.selection_grid import HashView
from engine.hashes.catalog import Catalog
from engine.hashes.model import FileHashes, HashCancelled, HashError
from engine.hashes.parallel import HashPool, default_jobs
from engine.hashes.relations import component_groups, same_as_reference
from engine.library.report import UNREADABLE, ModelReport

PROGRESS_EVERY_S = 0.2  # the hashing thread waits for the UI on each report: not per chunk


@dataclass
class Progress:
    files_done: int
    files_total: int
    bytes_done: int  # of the files that need reading (cache misses)
    bytes_total: int
    rate: str = ""  # e.g. "812 MB/s" while reading


@dataclass
class Results:
    hashes: dict[str, FileHashes] = field(default_factory=dict)  # new this time
    views: dict[str, HashView] = field(default_factory=dict)  # every hashed model (relations move)
    failed: dict[str, str] = field(default_factory=dict)


def views_for(all_hashes: dict[str, FileHashes], references: list[FileHashes]) -> dict[str, HashView]:
    """What the grid shows for each hashed model, relations included."""
    groups: dict[str, dict[str, int]] = {}
    numbers: dict[str, int] = {}
    for g in component_groups(all_hashes, "exact"):
        numbers[g.component] = numbers.get(g.component, 0) + 1
        for mid in g.model_ids:
            groups.setdefault(mid, {})[g.component] = numbers[g.component] - 1
    sd = same_as_reference(all_hashes, references)
    out = {}
    for mid, fh in all_hashes.items():
        out[mid] = HashView(
            short={c: h.exact_short for c, h in fh.components.items()},
            metric={c: h.metric for c, h in fh.components.items() if h.metric},
            group=groups.get(mid, {}),
            same_as_reference=bool(sd.get(mid)),
        )
    return out


def feed(
    reports: list[ModelReport],
    on_result: Callable[[Results], None],
    on_progress: Callable[[Progress], None],
    cancel: threading.Event,
    catalog: Catalog | None = None,
) -> None:
    own = catalog is None
    catalog = catalog or Catalog()
    try:
        _feed(catalog, [r for r in reports if r.kind != UNREADABLE], on_result, on_progress, cancel)
    finally:
        if own:
            catalog.close()


def _feed(catalog, reports, on_result, on_progress, cancel) -> None:
    all_hashes: dict[str, FileHashes] = {}
    shown: dict[str, HashView] = {}

    def changed(views: dict[str, HashView]) -> dict[str, HashView]:
        """Only views that differ from what the grid already shows: one finished file must
        not redraw every row (a new group member changes a few rows, not all)."""
        out = {m: v for m, v in views.items() if shown.get(m) != v}
        shown.update(out)
        return out

    total = len(reports)
    cached = Results()
    todo = []
    for r in reports:
        fh = catalog.get(r.path)
        if fh is None:
            todo.append(r)
        else:
            cached.hashes[r.model_id] = fh
    all_hashes.update(cached.hashes)
    references = catalog.reference_hashes()
    cached.views = changed(views_for(all_hashes, references))
    if cached.hashes:
        on_result(cached)
    done = len(cached.hashes)
    bytes_total = sum(r.file_size for r in todo)
    on_progress(Progress(done, total, 0, bytes_total))
    started = time.monotonic()
    last = [0.0]
    state = {"done": done, "read": 0, "references": references}

    def progress(n: int, _total: int) -> None:  # bytes of all files in flight (one call at a time)
        now = time.monotonic()
        if now - last[0] < PROGRESS_EVERY_S:
            return
        last[0] = now
        rate = f"{n / max(now - started, 1e-6) / 1e6:,.0f} MB/s"
        on_progress(Progress(state["done"], total, n, bytes_total, rate))

    def finished(r, fh: FileHashes | None, reason: str | None = None) -> None:
        result = Results()
        if fh is None:
            result.failed[r.model_id] = reason
            result.views = {r.model_id: HashView(failed=reason)}
        else:
            result.hashes[r.model_id] = fh
            all_hashes[r.model_id] = fh
            if fh.sha256 in catalog.reference_sha256s():
                state["references"] = catalog.reference_hashes()
            result.views = changed(views_for(all_hashes, state["references"]))
        state["read"] += r.file_size
        state["done"] += 1
        on_progress(Progress(state["done"], total, state["read"], bytes_total))
        on_result(result)

    def failed(r, e: BaseException) -> None:
        if not isinstance(e, HashError):
            raise e
        finished(r, None, e.reason)

    # several files at once where the cores allow (one file per three cores; one on 2 cores)
    pool = HashPool(lambda r, prog, c: catalog.hash_file(r.path, r, on_progress=prog, cancel=c),
                    {id(r): r.file_size for r in todo}, default_jobs(), cancel, on_progress=progress,
                    on_done=finished, on_error=failed)
    try:
        pool.run(todo)
    except HashCancelled:
        return


def toggle_reference(sha256: str, label: str, all_hashes: dict[str, FileHashes],
                     catalog: Catalog | None = None) -> tuple[bool, dict[str, HashView]]:
    """Mark a file as an "=sd" reference in the catalog, or unmark it if it was; returns whether
    it is marked now and the grid's views with the flag recomputed."""
    own = catalog is None
    catalog = catalog or Catalog()
    try:
        marked = sha256 in catalog.marked_references()
        if marked:
            catalog.unmark_reference(sha256)
        else:
            catalog.mark_reference(sha256, label)
        return not marked, views_for(all_hashes, catalog.reference_hashes())
    finally:
        if own:
            catalog.close()
