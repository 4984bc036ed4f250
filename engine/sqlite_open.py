"""Opening astolfo's SQLite files (catalog, ids, report cache, compare results) when another
connection may be setting up the same file at the same moment.

SQLite answers "database is locked" at once, without waiting in its busy handler, when two
connections switch a new database to WAL together (two app windows, a CLI job beside the app,
a test's threads). Every opener here therefore retries, with a short growing pause, until its
timeout; any other error is raised at once.
"""

from __future__ import annotations

import os
import sqlite3
import time
from typing import Callable, TypeVar

T = TypeVar("T")


def retry_while_locked(open_fn: Callable[[], T], timeout_s: float) -> T:
    """``open_fn()``, tried again while it fails with SQLite's "locked" or "busy"."""
    deadline = time.monotonic() + timeout_s
    delay = 0.01
    while True:
        try:
            return open_fn()
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e) or time.monotonic() >= deadline:
                raise
        time.sleep(delay)
        delay = min(0.2, delay * 2)


def open_wal(path: str | os.PathLike, timeout_s: float, schema: str, threads: bool = True) -> sqlite3.Connection:
    """A connection in autocommit mode and WAL, with ``schema`` (statements) applied; shared by
    threads when ``threads``. The connection is closed again if the set-up fails."""

    def attempt() -> sqlite3.Connection:
        db = sqlite3.connect(str(path), timeout=timeout_s, isolation_level=None, check_same_thread=not threads)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(schema)
        except BaseException:
            db.close()
            raise
        return db

    return retry_while_locked(attempt, timeout_s)
