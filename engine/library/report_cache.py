"""A SQLite cache of inspection reports, so reopening a folder of 200 models reads no headers.

Keyed like the hash catalog (path, size, mtime_ns, inode) plus a fingerprint of the inspection
code, so a changed file or a newer astolfo re-inspects. It lives beside the catalog in the user's
cache folder but in its own file: scanning must not import the hashing stack (and torch).
A cache that cannot be opened or written is simply not used: it never stops a scan.
"""

from __future__ import annotations

import json
import os
import sqlite3
import zlib
from pathlib import Path

from engine.cache_dir import cache_dir
from engine.checkpoint import architectures as architectures
from engine.library import diagnose as inspect
from engine.library import report as report
from engine.library.report import ComponentStatus, Finding, ModelReport, Severity
from engine.sqlite_open import open_wal

_SCHEMA = """
CREATE TABLE IF NOT EXISTS reports (
    path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, inode INTEGER, code TEXT, data TEXT
)
"""


def _code_fingerprint() -> str:
    """Changes whenever the code that makes reports changes."""
    crc = 0
    for module in (inspect, report, architectures):
        crc = zlib.crc32(Path(module.__file__).read_bytes(), crc)
    return f"{crc:08x}"


CODE = _code_fingerprint()


def default_path() -> Path:
    return cache_dir() / "reports.sqlite"


class ReportCache:
    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else default_path()
        self._db: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = open_wal(self.path, 2.0, _SCHEMA)
        except (OSError, sqlite3.Error):
            self._db = None

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def get(self, path: Path, st: os.stat_result) -> ModelReport | None:
        if self._db is None:
            return None
        try:
            row = self._db.execute(
                "SELECT size, mtime_ns, inode, code, data FROM reports WHERE path = ?", (str(path),)
            ).fetchone()
        except sqlite3.Error:
            return None
        if row is None or tuple(row[:4]) != (st.st_size, st.st_mtime_ns, st.st_ino, CODE):
            return None
        try:
            return report_from_record(json.loads(row[4]), path)
        except (ValueError, KeyError, TypeError):
            return None

    def put(self, rep: ModelReport, st: os.stat_result) -> None:
        if self._db is None or (rep.file_size, rep.mtime_ns) != (st.st_size, st.st_mtime_ns):
            return  # the file changed while it was inspected: don't cache
        data = json.dumps(report_to_record(rep), separators=(",", ":"))
        try:
            self._db.execute(
                "INSERT OR REPLACE INTO reports VALUES (?, ?, ?, ?, ?, ?)",
                (str(rep.path), st.st_size, st.st_mtime_ns, st.st_ino, CODE, data),
            )
        except sqlite3.Error:
            pass


# --------------------------------------------------------------------------- records


def _finding(f: Finding) -> list:
    return [int(f.severity), f.code, f.message, f.component]


def _unfinding(r: list) -> Finding:
    return Finding(Severity(r[0]), r[1], r[2], r[3])


def report_to_record(rep: ModelReport) -> dict:
    rec = {
        "kind": rep.kind, "arch": rep.arch, "scale": rep.scale, "arch_name": rep.arch_name,
        "size": rep.file_size, "mtime_ns": rep.mtime_ns,
        "components": [
            [c.id, c.label, c.state, c.keys_found, c.keys_expected, c.nbytes, c.dtypes,
             [_finding(f) for f in c.findings]]
            for c in rep.components.values()
        ],
        "dtypes": rep.dtypes, "extra_keys": rep.extra_keys, "extra_bytes": rep.extra_bytes,
        "metadata": rep.metadata, "metadata_summary": rep.metadata_summary,
        "findings": [_finding(f) for f in rep.findings],
    }
    rec.update(_key_map_record(rep))
    return rec


def _key_map_record(rep: ModelReport) -> dict:
    """Most key maps are the architecture's keys, a few renamed or missing: store just that."""
    if rep.arch is None:
        return {"key_map": rep.key_map}
    canonical = architectures.get_architecture(rep.arch).tensors
    renamed = {k: v for k, v in rep.key_map.items() if k != v}
    missing = [k for k in canonical if k not in rep.key_map]
    if _rebuild_key_map(canonical, renamed, missing) == list(rep.key_map.items()):
        return {"renamed": renamed, "missing": missing}
    return {"key_map": rep.key_map}


def _rebuild_key_map(canonical, renamed: dict, missing: list) -> list:
    gone = set(missing)
    return [(k, renamed.get(k, k)) for k in canonical if k not in gone]


def report_from_record(rec: dict, path: Path, model_id: str = "") -> ModelReport:
    if "key_map" in rec:
        key_map = rec["key_map"]
    else:
        canonical = architectures.get_architecture(rec["arch"]).tensors
        key_map = dict(_rebuild_key_map(canonical, rec["renamed"], rec["missing"]))
    return ModelReport(
        path=path, model_id=model_id, file_size=rec["size"], mtime_ns=rec["mtime_ns"], kind=rec["kind"],
        arch=rec["arch"], scale=rec["scale"], arch_name=rec["arch_name"],
        components={
            c[0]: ComponentStatus(c[0], c[1], c[2], c[3], c[4], c[5], c[6], [_unfinding(f) for f in c[7]])
            for c in rec["components"]
        },
        dtypes=rec["dtypes"], extra_keys=rec["extra_keys"], extra_bytes=rec["extra_bytes"],
        metadata=rec["metadata"], metadata_summary=rec["metadata_summary"],
        findings=[_unfinding(f) for f in rec["findings"]], key_map=key_map,
    )
