"""Model ids that never drift: once a file has an id, it keeps it.

The exported notation holds only ids (``unet = 01,03,m02``), so an id given by position would
silently change meaning when a file is added. Files named in the article's style (``_x01-...``)
take their id from the name; every other file gets ``mNN`` on first sight, recorded in SQLite
(``ids.sqlite3`` beside the hash catalog, under ``$ASTOLFO_CACHE_DIR`` or the user cache dir)
and kept:

- by path;
- after a rename or move: by inode, size and mtime of a recorded file whose path is gone;
- once hashed (``record_sha256``), by SHA256: a file copied elsewhere and the old one deleted
  takes the old id back when it is hashed.

A number once given is never given to another file. When the database cannot be used, ids fall
back to the scan order (``m01``, ``m02``...) and the caller is none the worse.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time
from pathlib import Path

from engine.sqlite_open import open_wal

_FILE = "ids.sqlite3"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS ids (
    id TEXT PRIMARY KEY,
    path TEXT UNIQUE,
    size INTEGER,
    mtime_ns INTEGER,
    inode INTEGER,
    sha256 TEXT,
    given_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS ids_sha256 ON ids(sha256);
"""
_NUMBERED = re.compile(r"^m([0-9]+)$")


def default_ids_path() -> Path:
    from engine.cache_dir import cache_dir

    return cache_dir() / _FILE


def _real(path: Path | str) -> str:
    return os.path.realpath(path)


class IdStore:
    """The id database. One connection, shared by the threads of one process."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else default_ids_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = open_wal(self.path, 30.0, _SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "IdStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- giving ids --------------------------------------------------------------------------

    def assign(self, paths: list[Path], taken: set[str] | None = None) -> list[str]:
        """An id per file of ``paths`` (files without an article-style name), recording new ones.
        ``taken``: ids already used in this scan (case-folded), which none of these may get."""
        taken = set(taken or ())
        out: list[str] = []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for path in paths:
                    model_id = self._id_for(Path(path), taken)
                    taken.add(model_id.casefold())
                    out.append(model_id)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return out

    def _id_for(self, path: Path, taken: set[str]) -> str:
        real = _real(path)
        try:
            st = os.stat(real)
            stat = (st.st_size, st.st_mtime_ns, st.st_ino)
        except OSError:
            stat = (None, None, None)
        row = self._db.execute("SELECT id FROM ids WHERE path = ?", (real,)).fetchone()
        if row and row[0].casefold() not in taken:
            self._db.execute("UPDATE ids SET size = ?, mtime_ns = ?, inode = ? WHERE id = ?", (*stat, row[0]))
            return row[0]
        if stat[0] is not None:
            for (gone_id, gone_path) in self._db.execute(
                "SELECT id, path FROM ids WHERE size = ? AND mtime_ns = ? AND inode = ?", stat
            ).fetchall():
                if gone_path and gone_id.casefold() not in taken and not os.path.exists(gone_path):
                    self._move(gone_id, real, stat)
                    return gone_id
        model_id = self._next_id(taken)
        self._db.execute(
            "INSERT INTO ids (id, path, size, mtime_ns, inode, sha256, given_at) VALUES (?, ?, ?, ?, ?, NULL, ?)",
            (model_id, real, *stat, time.time()),
        )
        return model_id

    def _move(self, model_id: str, real: str, stat: tuple) -> None:
        self._db.execute("UPDATE ids SET path = NULL WHERE path = ? AND id != ?", (real, model_id))
        self._db.execute("UPDATE ids SET path = ?, size = ?, mtime_ns = ?, inode = ? WHERE id = ?",
                         (real, *stat, model_id))

    def _next_id(self, taken: set[str]) -> str:
        numbers = [int(m.group(1)) for (i,) in self._db.execute("SELECT id FROM ids") if (m := _NUMBERED.match(i))]
        n = max(numbers, default=0) + 1
        while f"m{n:02d}".casefold() in taken:
            n += 1
        return f"m{n:02d}"

    # -- after hashing -----------------------------------------------------------------------

    def record_sha256(self, path: Path | str, sha256: str) -> str | None:
        """Note a file's SHA256. When the file is new to the store since its last hash and a file
        with this SHA256 had an id whose path is gone, the file takes that id back (it was
        moved); returns the id the file has now (None when it has none here)."""
        real = _real(path)
        with self._lock:
            row = self._db.execute("SELECT id, sha256 FROM ids WHERE path = ?", (real,)).fetchone()
            if row is None:
                return None
            model_id, known = row
            if known is None:
                for (old_id, old_path) in self._db.execute(
                    "SELECT id, path FROM ids WHERE sha256 = ? AND id != ?", (sha256, model_id)
                ).fetchall():
                    if old_path is None or not os.path.exists(old_path):
                        self._db.execute("UPDATE ids SET path = NULL WHERE id = ?", (model_id,))  # number kept
                        self._db.execute("UPDATE ids SET path = ? WHERE id = ?", (real, old_id))
                        model_id = old_id
                        break
            self._db.execute("UPDATE ids SET sha256 = ? WHERE id = ?", (sha256, model_id))
            return model_id


def open_store() -> IdStore | None:
    try:
        return IdStore()
    except (OSError, sqlite3.Error):
        return None


def record_sha256(path: Path | str, sha256: str) -> None:
    """``IdStore.record_sha256`` on the default store; never fails."""
    store = open_store()
    if store is None:
        return
    try:
        store.record_sha256(path, sha256)
    except sqlite3.Error:
        pass
    finally:
        store.close()
