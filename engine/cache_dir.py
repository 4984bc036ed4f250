"""Where astolfo keeps what it can recompute (the hash catalog, the id store, the report
cache): the user's cache folder, or ``ASTOLFO_CACHE_DIR`` (tests, and users who want it on
another disk). One place, so every store agrees and none has to import another to find it."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

CACHE_DIR_ENV = "ASTOLFO_CACHE_DIR"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or platformdirs.user_cache_dir("astolfo"))
