"""Comparison results kept in the catalog database (``catalog.sqlite3`` beside the hashes),
in a table of their own, keyed by the files' SHA256, the reference and the thresholds, so a
second run on the same files answers without reading them (and without importing torch).

The table is created on first use; a result is one JSON row written in one statement, so a
killed run leaves it whole or absent. Cache trouble (a locked or read-only database) never
fails a comparison: the result is computed and simply not stored.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from pathlib import Path

from engine.hashes.catalog import default_catalog_path
from engine.sqlite_open import open_wal

VERSION = 3  # bump when the numbers or the result's shape change
_SCHEMA = """CREATE TABLE IF NOT EXISTS compare_results (
    key TEXT PRIMARY KEY, computed_at REAL NOT NULL, data TEXT NOT NULL)"""


def result_key(model_sha256: list[tuple[str, str]], reference: str | None, options: dict) -> str:
    """``model_sha256``: (id, SHA256) in grid order; ``reference``: its SHA256 or None (the
    mean). Ids are part of the key since they are part of the result."""
    blob = json.dumps({"v": VERSION, "models": model_sha256, "reference": reference, "options": options},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class ResultCache:
    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else default_catalog_path()
        self._db: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = open_wal(self.path, 10.0, _SCHEMA, threads=False)
        except (OSError, sqlite3.Error):
            self._db = None

    def get(self, key: str) -> dict | None:
        if self._db is None:
            return None
        try:
            row = self._db.execute("SELECT data FROM compare_results WHERE key = ?", (key,)).fetchone()
            return json.loads(row[0]) if row else None
        except (sqlite3.Error, ValueError):
            return None

    def put(self, key: str, result: dict) -> None:
        if self._db is None:
            return
        try:
            self._db.execute("INSERT OR REPLACE INTO compare_results VALUES (?, ?, ?)",
                             (key, time.time(), json.dumps(result)))
        except sqlite3.Error:
            pass

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
