"""Shared test fixtures. Append new fixtures; keep others' as they are."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _isolated_cache_dir(tmp_path_factory, monkeypatch):
    """Every test gets its own hash catalog folder, never the user's ~/.cache/astolfo."""
    monkeypatch.setenv("ASTOLFO_CACHE_DIR", str(tmp_path_factory.mktemp("astolfo-cache")))


@pytest.fixture(autouse=True)
def _isolated_state_dir(tmp_path_factory, monkeypatch):
    """Every test gets its own job state folder (ASTOLFO_STATE_DIR), never ~/.local/state/astolfo."""
    monkeypatch.setenv("ASTOLFO_STATE_DIR", str(tmp_path_factory.mktemp("astolfo-state")))
