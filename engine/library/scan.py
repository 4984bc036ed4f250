"""Find model files under folders, put them in one explicit order, and give each a short id.

The order must be the same on every machine: the AstolfoMix author once released a mix built
from the wrong model because two platforms sorted file names differently. So names are compared
part by part, numbers as numbers, case-folded and Unicode-normalised (macOS stores decomposed
names), never by the file system's listing order or the locale.
"""

from __future__ import annotations

import os
import re
import unicodedata
from pathlib import Path
from typing import Callable, Iterable

from engine.library.diagnose import MODEL_SUFFIXES, inspect_file
from engine.library.report import UNREADABLE, ModelReport
from engine.library.report_cache import ReportCache

_NUMBER = re.compile(r"([0-9]+)")
# The article's model ids: "_x01-AnimagineXL.safetensors" -> "_x01", "x39a-AstolfoMix" -> "x39a".
_ARTICLE_ID = re.compile(r"^(_?x[0-9]+[a-z0-9]*)(?=[-_. ]|$)", re.IGNORECASE)


def natural_key(name: str) -> tuple:
    """Sort key for one name: digit runs compare as numbers ("m2" < "m10"), text case-folded.

    Ties (``a01`` vs ``a1``, ``A`` vs ``a``) are broken by the exact name, so the order is total
    and the same on every OS."""
    name = unicodedata.normalize("NFC", name)
    parts = []
    for i, chunk in enumerate(_NUMBER.split(name)):
        if not chunk:
            continue
        if i % 2:  # a digit run
            parts.append((0, int(chunk), ""))
        else:
            parts.append((1, 0, chunk.casefold()))
    return (tuple(parts), name)


def path_key(relative: Path | str) -> tuple:
    """Sort key for a relative path: folder by folder, each part in natural order."""
    return tuple(natural_key(part) for part in Path(relative).parts)


def is_model_file(path: Path) -> bool:
    """A name astolfo lists: safetensors or pickle extensions, not hidden, not a ``.partial``."""
    return not path.name.startswith(".") and path.suffix.lower() in MODEL_SUFFIXES


def find_model_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Model files in ``paths`` (files, or folders searched recursively), in natural order.

    Folders come in the order given; inside each, files are ordered by their path relative to
    it. A file named explicitly is kept whatever its extension. Hidden files and folders and
    unfinished ``*.partial`` outputs are skipped; a file reached twice is listed once.
    Raises FileNotFoundError naming a path that does not exist."""
    found: list[Path] = []
    seen: set[Path] = set()
    for given in paths:
        root = Path(given)
        if root.is_file():
            candidates = [root]
        elif root.is_dir():
            candidates = sorted(_walk(root), key=lambda p: path_key(p.relative_to(root)))
        else:
            raise FileNotFoundError(f"{root}: no such file or folder")
        for path in candidates:
            identity = _identity(path)
            if identity not in seen:
                seen.add(identity)
                found.append(path)
    return found


def _walk(root: Path) -> Iterable[Path]:
    for folder, dirnames, filenames in os.walk(root, onerror=None):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            path = Path(folder, name)
            if is_model_file(path):
                yield path


def _identity(path: Path) -> Path:
    try:
        return path.resolve()
    except OSError:
        return path.absolute()


def article_id(path: Path | str) -> str | None:
    """The ``_x01``-style id a file name starts with, if any."""
    m = _ARTICLE_ID.match(Path(path).name)
    return m.group(1) if m else None


def assign_ids(paths: list[Path], store=None) -> list[str]:
    """A short, unique id per path: its article-style prefix when it has one (a repeated prefix
    gets ``-2``, ``-3``), else the id the id store gave the file on first sight
    (``engine.library.ids``: it never moves to another file). Without a store, ``m`` and the
    1-based position (``m01``, or ``m001`` past 99 files)."""
    width = max(2, len(str(len(paths))))
    ids: list[str | None] = []
    taken: set[str] = set()
    for path in paths:
        base = article_id(path)
        if base is None:
            ids.append(None)
            continue
        model_id, n = base, 1
        while model_id.casefold() in taken:
            n += 1
            model_id = f"{base}-{n}"
        taken.add(model_id.casefold())
        ids.append(model_id)
    rest = [i for i, m in enumerate(ids) if m is None]
    given: list[str] | None = None
    if store is not None and rest:
        try:
            given = store.assign([paths[i] for i in rest], taken)
        except Exception:  # a locked or broken database: positions, as before
            given = None
    if given is None:
        given = []
        for i in rest:
            model_id, n = f"m{i + 1:0{width}d}", 1
            while model_id.casefold() in taken:
                n += 1
                model_id = f"m{i + 1:0{width}d}-{n}"
            taken.add(model_id.casefold())
            given.append(model_id)
    for i, model_id in zip(rest, given):
        ids[i] = model_id
    return ids  # type: ignore[return-value]


def scan(
    paths: Iterable[str | os.PathLike],
    on_report: Callable[[ModelReport], None] | None = None,
    use_cache: bool = True,
) -> list[ModelReport]:
    """Inspect every model file under ``paths`` (headers only), in natural order, with ids that
    stay with their files (``engine.library.ids``). Files a live merge job is writing are left out.
    ``on_report`` gets each report as soon as it is made, so a screen can fill in while a big
    folder is still being read. Reports of unchanged files come from the report cache
    (``use_cache=False`` inspects every file afresh)."""
    from engine.library.ids import open_store
    from engine.library.outputs import busy_outputs

    busy = busy_outputs()
    files = [f for f in find_model_files(paths) if os.path.realpath(f) not in busy]
    reports = []
    cache = ReportCache() if use_cache else None
    store = open_store()
    try:
        try:
            ids = assign_ids(files, store)
        finally:
            if store is not None:
                store.close()
        for path, model_id in zip(files, ids):
            report = _inspect_cached(path, model_id, cache)
            reports.append(report)
            if on_report is not None:
                on_report(report)
    finally:
        if cache is not None:
            cache.close()
    return reports


def _inspect_cached(path: Path, model_id: str, cache: ReportCache | None) -> ModelReport:
    """The file's report from the cache when it is unchanged, else a fresh inspection."""
    try:
        st = path.stat()
    except OSError:
        return inspect_file(path, model_id)  # reports the file as unreadable
    cached = cache.get(path, st) if cache is not None else None
    if cached is not None:
        cached.model_id = model_id
        return cached
    report = inspect_file(path, model_id)
    if cache is not None and report.kind != UNREADABLE:
        cache.put(report, st)
    return report
