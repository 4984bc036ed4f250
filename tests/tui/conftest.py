"""Fixtures for the app's tests: one demo folder and one hash catalog per session (hashing the
demo takes ~2 s), and private state/config folders for every test."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from engine.synth.demo import make_demo_folder

SIZE = (160, 48)
# Fixed-length, fixed-prefix folder so snapshots can hide the random part (see snapshots.py).
TMP_PREFIX = "astolfo-tui-"


@pytest.fixture(scope="session")
def tui_root():
    root = Path(tempfile.mkdtemp(prefix=TMP_PREFIX))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def demo_dir(tui_root) -> Path:
    folder = tui_root / "demo"
    make_demo_folder(folder)
    return folder


@pytest.fixture(scope="session")
def shared_cache(tui_root) -> Path:
    path = tui_root / "cache"
    path.mkdir()
    return path


@pytest.fixture(autouse=True)
def _tui_dirs(tmp_path, shared_cache, monkeypatch):
    monkeypatch.setenv("ASTOLFO_CACHE_DIR", str(shared_cache))
    monkeypatch.setenv("ASTOLFO_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("ASTOLFO_CONFIG_DIR", str(tmp_path / "config"))


@pytest.fixture
def work_dir(demo_dir, tmp_path) -> Path:
    """A fresh copy of the demo folder, for tests that write recipes or outputs beside it."""
    folder = tmp_path / "models"
    shutil.copytree(demo_dir, folder)
    return folder
