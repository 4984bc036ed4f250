"""Opening astolfo's SQLite files while another connection sets one up: the retry on
"locked", the errors it does not retry, and every store opening one new file from many
threads at once."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from engine.compare.cache import ResultCache
from engine.library.ids import IdStore
from engine.library.report_cache import ReportCache
from engine.sqlite_open import open_wal, retry_while_locked


def test_locked_is_retried_until_it_opens():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise sqlite3.OperationalError("database is locked")
        return "db"

    assert retry_while_locked(flaky, 5.0) == "db" and len(calls) == 3


def test_other_errors_and_a_lock_past_the_timeout_are_raised():
    def broken():
        raise sqlite3.OperationalError("unable to open database file")

    with pytest.raises(sqlite3.OperationalError, match="unable to open"):
        retry_while_locked(broken, 5.0)

    def locked():
        raise sqlite3.OperationalError("database is locked")

    with pytest.raises(sqlite3.OperationalError, match="locked"):
        retry_while_locked(locked, 0.05)


def test_open_wal_sets_up_the_schema_in_wal(tmp_path):
    db = open_wal(tmp_path / "x.sqlite", 2.0, "CREATE TABLE IF NOT EXISTS t (a INTEGER)")
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.execute("INSERT INTO t VALUES (1)")
    finally:
        db.close()


@pytest.mark.parametrize("store", [IdStore, ReportCache, ResultCache])
def test_many_threads_open_one_new_file_together(tmp_path, store):
    """Eight connections set up the same new file at once: each opens (a cache that gave up
    would leave ``_db`` None), none raises."""
    path = tmp_path / "new.sqlite"
    start = threading.Barrier(8)
    opened, errors = [], []

    def open_one():
        start.wait()
        try:
            s = store(path)
            opened.append(s._db is not None)
            s.close()  # in its own thread: a cache connection is not shared between threads
        except Exception as e:  # noqa: BLE001 (the assertion below names it)
            errors.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert opened == [True] * 8
