"""The model catalog: hashes cached in SQLite, and what they say about a folder of models.

The cache lives in ``catalog.sqlite3`` under the user's cache directory (platformdirs), or under
``$ASTOLFO_CACHE_DIR``. A row is trusted only while the file's path, size, mtime_ns and inode are
unchanged, so a re-scan of unchanged files reads no tensor data and a changed file is re-hashed.
Each file's result is written in one transaction (WAL journal), so killing a hash run at any
moment leaves every row either complete or absent, and readers in other processes never wait.

Relations computed from hashes: groups of models sharing a component, the "=sd" flag (text
encoders equal to a reference model's: SDXL base by SHA256, or any model the user marks), and
warnings when one selection would average the same component twice.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from engine.cache_dir import CACHE_DIR_ENV, cache_dir  # noqa: F401 (CACHE_DIR_ENV: part of this module's API)
from engine.checkpoint.architectures import get_architecture
from engine.hashes.model import HASH_VERSION, FileHashes, HashError, ProgressFn
from engine.library.report import ModelReport
from engine.sqlite_open import retry_while_locked

CATALOG_FILE = "catalog.sqlite3"
SDXL_BASE_SHA256 = get_architecture("sdxl").reference_sha256 or ""

_SCHEMA_VERSION = 1
_BUSY_TIMEOUT_S = 30.0  # how long to wait for another process's write before giving up
_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    hash_version INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    hashed_at REAL NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS files_sha256 ON files(sha256);
CREATE TABLE IF NOT EXISTS components (
    path TEXT NOT NULL REFERENCES files(path) ON DELETE CASCADE,
    component TEXT NOT NULL,
    exact TEXT NOT NULL,
    fp16 TEXT NOT NULL,
    metric TEXT,
    nan_count INTEGER NOT NULL,
    inf_count INTEGER NOT NULL,
    PRIMARY KEY (path, component)
);
CREATE INDEX IF NOT EXISTS components_exact ON components(component, exact);
CREATE INDEX IF NOT EXISTS components_fp16 ON components(component, fp16);
CREATE TABLE IF NOT EXISTS reference_marks (
    sha256 TEXT PRIMARY KEY,
    label TEXT NOT NULL,
    marked_at REAL NOT NULL
);
"""


class CatalogError(Exception):
    """The catalog database cannot be used. The message names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def default_catalog_path() -> Path:
    return cache_dir() / CATALOG_FILE


@dataclass(frozen=True)
class FileKey:
    """What must be unchanged for a cached row to describe the file on disk."""

    path: str
    size: int
    mtime_ns: int
    inode: int


def file_key(path: str | os.PathLike) -> FileKey:
    real = os.path.realpath(path)
    st = os.stat(real)
    return FileKey(real, st.st_size, st.st_mtime_ns, st.st_ino)


def _note_sha256(folder: Path, path: str, sha256: str) -> None:
    """Tell the id store beside the catalog (``engine.library.ids``) this file's SHA256, so its
    id follows it through a move. Never fails: ids are a convenience on top of the hashes."""
    from engine.library.ids import IdStore

    try:
        with IdStore(folder / "ids.sqlite3") as store:
            store.record_sha256(path, sha256)
    except Exception:
        pass


class Catalog:
    """The SQLite hash cache. Safe to share between threads of one process; any number of
    processes may read while one writes."""

    def __init__(self, path: str | os.PathLike | None = None, read_only: bool = False):
        self.path = Path(path) if path is not None else default_catalog_path()
        self.read_only = read_only
        self.recovered_from: Path | None = None  # where an unreadable old database was moved
        self._lock = threading.RLock()
        if read_only:  # a reader beside a writer (or on a read-only disk): never creates or moves
            try:
                uri = self.path.absolute().as_uri() + "?mode=ro"
                self._db = sqlite3.connect(uri, uri=True, timeout=_BUSY_TIMEOUT_S, isolation_level=None,
                                           check_same_thread=False)
                self._db.execute("SELECT count(*) FROM files").fetchone()
            except sqlite3.Error as e:
                raise CatalogError(self.path, f"cannot read the catalog: {e}") from None
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CatalogError(self.path.parent, f"cannot create the cache folder: {e.strerror or e}") from None
        try:
            self._db = self._open_when_free()
        except sqlite3.OperationalError as e:  # locked, no permission: the file itself is fine
            raise CatalogError(self.path, f"cannot open the catalog: {e}") from None
        except sqlite3.DatabaseError as e:
            # It is a cache: set an unreadable one aside (never delete it) and start afresh.
            aside = self.path.with_name(f"{self.path.name}.unreadable-{int(time.time())}")
            try:
                os.replace(self.path, aside)
            except OSError:
                raise CatalogError(self.path, f"not a usable database ({e}) and cannot be moved aside") from None
            self.recovered_from = aside
            self._db = self._open()

    def _open_when_free(self) -> sqlite3.Connection:
        """``_open``, tried again while another connection holds the lock (engine.sqlite_open)."""
        return retry_while_locked(self._open, _BUSY_TIMEOUT_S)

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, _SCHEMA_VERSION):
                raise CatalogError(self.path, f"written by a newer astolfo (schema {version}); not touched")
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
        except BaseException:
            db.close()
            raise
        return db

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ lookups

    def get(self, path: str | os.PathLike) -> FileHashes | None:
        """Cached hashes of ``path`` if the file is unchanged since they were computed."""
        try:
            key = file_key(path)
        except OSError:
            return None
        return self._get(key)

    def _get(self, key: FileKey) -> FileHashes | None:
        with self._lock:
            row = self._db.execute(
                "SELECT size, mtime_ns, inode, hash_version, data FROM files WHERE path = ?", (key.path,)
            ).fetchone()
        if row is None or tuple(row[:4]) != (key.size, key.mtime_ns, key.inode, HASH_VERSION):
            return None
        return FileHashes.from_dict(json.loads(row[4]))

    def by_sha256(self, sha256: str) -> FileHashes | None:
        """Hashes of any file ever catalogued with this SHA256 (it need not exist any more)."""
        with self._lock:
            row = self._db.execute(
                "SELECT data FROM files WHERE sha256 = ? AND hash_version = ? LIMIT 1", (sha256.lower(), HASH_VERSION)
            ).fetchone()
        return FileHashes.from_dict(json.loads(row[0])) if row else None

    def files(self) -> dict[str, FileHashes]:
        """Every catalogued path and its hashes (current hash version only)."""
        with self._lock:
            rows = self._db.execute("SELECT path, data FROM files WHERE hash_version = ?", (HASH_VERSION,)).fetchall()
        return {path: FileHashes.from_dict(json.loads(data)) for path, data in rows}

    # ------------------------------------------------------------------ storing

    def put(self, key: FileKey, hashes: FileHashes) -> None:
        """Store one file's hashes in a single transaction."""
        rows = [
            (key.path, cid, c.exact, c.fp16, c.metric, c.nan_count, c.inf_count)
            for cid, c in hashes.components.items()
        ]
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.execute("DELETE FROM components WHERE path = ?", (key.path,))
                    self._db.execute(
                        "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            key.path,
                            key.size,
                            key.mtime_ns,
                            key.inode,
                            hashes.version,
                            hashes.sha256,
                            time.time(),
                            json.dumps(hashes.to_dict()),
                        ),
                    )
                    self._db.executemany("INSERT INTO components VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as e:  # disk full, read-only, locked for too long
                raise CatalogError(self.path, f"cannot store the hashes of {key.path}: {e}") from None
        _note_sha256(self.path.parent, key.path, hashes.sha256)

    def hash_file(
        self,
        path: str | os.PathLike,
        report: ModelReport | None = None,
        on_progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
    ) -> FileHashes:
        """Cached hashes of an unchanged file, else hash it (one read) and store the result."""
        try:
            key = file_key(path)
        except OSError as e:
            raise HashError(path, f"cannot read: {e.strerror or e}") from None
        cached = self._get(key)
        if cached is not None:
            return cached
        # here, not at the top: the hasher needs torch, and opening the catalog must not pay its import
        from engine.hashes.hasher import hash_file

        hashes = hash_file(key.path, report, on_progress=on_progress, cancel=cancel)
        try:
            after = file_key(key.path)
        except OSError as e:
            raise HashError(path, f"cannot read: {e.strerror or e}") from None
        if after != key:
            raise HashError(path, "file changed while it was being hashed")
        self.put(key, hashes)
        return hashes

    def hash_reports(
        self,
        reports: Iterable[ModelReport],
        on_progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
        on_error: Callable[[ModelReport, str], None] | None = None,
        on_file: Callable[[ModelReport, bool], None] | None = None,
        jobs: int | None = None,
        on_file_progress: Callable[[ModelReport, int, int], None] | None = None,
        on_file_done: Callable[[ModelReport], None] | None = None,
    ) -> dict[str, FileHashes]:
        """Hashes for each report's file, by model id: cached ones first (no data read), then
        the rest hashed, ``jobs`` files at once (default: ``parallel.default_jobs()``, one per
        three usable cores), each stored as soon as it is done (one transaction, under the
        connection's lock: concurrent writers stay consistent). ``on_progress`` counts the
        bytes of the files that need hashing; ``on_file(report, cached)`` announces each file
        as it starts, ``on_file_progress(report, done, total)`` follows it and
        ``on_file_done(report)`` ends it; ``on_error(report, message)`` gets files that cannot
        be hashed (the rest go on). Callbacks come one at a time, possibly from worker
        threads. Cancelling raises ``HashCancelled``; files finished before it stay stored."""
        from engine.hashes.parallel import HashPool, default_jobs

        out: dict[str, FileHashes] = {}
        todo: list[ModelReport] = []
        for r in reports:
            cached = self.get(r.path)
            if cached is not None:
                out[r.model_id] = cached
                if on_file:
                    on_file(r, True)
            else:
                todo.append(r)
        sizes = {}
        for r in todo:
            try:
                sizes[id(r)] = os.stat(r.path).st_size
            except OSError:
                sizes[id(r)] = 0

        def hash_one(r: ModelReport, progress, pool_cancel) -> FileHashes:
            return self.hash_file(r.path, r, on_progress=progress, cancel=pool_cancel)

        def done(r: ModelReport, hashes: FileHashes) -> None:
            out[r.model_id] = hashes
            if on_file_done:
                on_file_done(r)

        def failed(r: ModelReport, e: BaseException) -> None:
            if isinstance(e, HashError) and on_error is not None:
                on_error(r, e.reason)
                if on_file_done:
                    on_file_done(r)
                return
            raise e

        pool = HashPool(hash_one, sizes, jobs if jobs is not None else default_jobs(), cancel,
                        on_progress=on_progress, on_file_progress=on_file_progress,
                        on_start=(lambda r: on_file(r, False)) if on_file else None,
                        on_done=done, on_error=failed if on_error is not None else None)
        pool.run(todo)
        if on_progress:
            total = sum(sizes.values())
            on_progress(total, total)
        return out

    # ------------------------------------------------------------------ reference marks

    def mark_reference(self, sha256: str, label: str = "") -> None:
        """Remember that files with this SHA256 are a reference for the "=sd" flag."""
        self._write("INSERT OR REPLACE INTO reference_marks VALUES (?, ?, ?)", (sha256.lower(), label, time.time()))

    def unmark_reference(self, sha256: str) -> None:
        self._write("DELETE FROM reference_marks WHERE sha256 = ?", (sha256.lower(),))

    def _write(self, sql: str, params: tuple) -> None:
        with self._lock:
            try:
                self._db.execute(sql, params)
            except sqlite3.Error as e:
                raise CatalogError(self.path, f"cannot write: {e}") from None

    def marked_references(self) -> dict[str, str]:
        """User marks: SHA256 -> label."""
        with self._lock:
            return dict(self._db.execute("SELECT sha256, label FROM reference_marks").fetchall())

    def reference_sha256s(self) -> set[str]:
        return {SDXL_BASE_SHA256, *self.marked_references()}

    def reference_hashes(self) -> list[FileHashes]:
        """Hashes of every catalogued file that is a reference (SDXL base or marked), whether or
        not it is in the folders being looked at now."""
        out = []
        for sha in sorted(self.reference_sha256s()):
            h = self.by_sha256(sha)
            if h is not None:
                out.append(h)
        return out
