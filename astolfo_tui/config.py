"""The app's small remembered settings: which folders were opened last, so a plain ``astolfo``
opens them again, and ``output_dir`` (where new outputs go, when set by hand).
Stored as TOML under the user's config directory (platformdirs);
``ASTOLFO_CONFIG_DIR`` overrides the directory (tests use it so they never touch ``~``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import platformdirs
import tomli_w

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_NAME = "config.toml"


def config_dir() -> Path:
    override = os.environ.get("ASTOLFO_CONFIG_DIR")
    return Path(override) if override else Path(platformdirs.user_config_dir("astolfo"))


def _config_path() -> Path:
    return config_dir() / CONFIG_NAME


def load_config() -> dict:
    """The stored settings, or an empty dict when there are none or the file is unreadable
    (a broken config must never stop the app from opening)."""
    try:
        return tomllib.loads(_config_path().read_text("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return {}


def save_config(config: dict) -> None:
    """Write the settings atomically; failing to remember is not worth an error."""
    path = _config_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(tomli_w.dumps(config), "utf-8")
        os.replace(tmp, path)
    except OSError:
        pass


def remembered_folders() -> list[Path]:
    return [Path(p) for p in load_config().get("folders", []) if isinstance(p, str)]


def remember_folders(paths: list[Path]) -> None:
    config = load_config()
    config["folders"] = [str(Path(p).resolve()) for p in paths]
    save_config(config)


def configured_output_dir() -> Path | None:
    """``output_dir = "..."`` in the config, when the user set one."""
    value = load_config().get("output_dir")
    return Path(value).expanduser() if isinstance(value, str) and value.strip() else None
