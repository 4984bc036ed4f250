"""Remembered folders live in a small TOML file under ASTOLFO_CONFIG_DIR (never ~ in tests)."""

import os
from pathlib import Path

from astolfo_tui import config


def test_folders_round_trip(tmp_path):
    assert config.config_dir() == Path(os.environ["ASTOLFO_CONFIG_DIR"])
    assert config.remembered_folders() == []
    config.remember_folders([tmp_path / "a", tmp_path / "b"])
    assert config.remembered_folders() == [(tmp_path / "a").resolve(), (tmp_path / "b").resolve()]


def test_a_broken_config_is_ignored(tmp_path):
    config.config_dir().mkdir(parents=True, exist_ok=True)
    (config.config_dir() / config.CONFIG_NAME).write_bytes(b"folders = [\xff not toml")
    assert config.remembered_folders() == []
    config.remember_folders([tmp_path])
    assert config.remembered_folders() == [tmp_path.resolve()]


def test_run_app_refuses_missing_folders(tmp_path, capsys):
    from astolfo_tui.app import run_app

    assert run_app([tmp_path / "nope"]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert run_app([]) == 2  # nothing given, nothing remembered
