"""Small helpers for driving the real app under ``run_test``."""

from __future__ import annotations

import time

from textual.coordinate import Coordinate
from textual.widgets.data_table import ColumnKey, RowKey


async def wait_for(pilot, predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await pilot.pause(0.05)


def library_ready(app, hashed: bool = True) -> bool:
    lib = app.library
    if lib is None or not lib.scan_complete:
        return False
    return lib.hashing_complete if hashed else True


async def open_library(pilot, hashed: bool = True) -> None:
    await wait_for(pilot, lambda: library_ready(pilot.app, hashed), what="scan and hashing")
    await pilot.pause(0.1)


def put_cursor(grid, model_id: str, column_key: str) -> None:
    grid.cursor_coordinate = Coordinate(
        grid.get_row_index(RowKey(model_id)), grid.get_column_index(ColumnKey(column_key))
    )
