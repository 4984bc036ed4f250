"""What the library had on screen, per set of opened folders, so that reopening the app (after a
merge, a dropped SSH session, a reboot) shows the same ticks, weights, columns and outputs.

One small JSON file per folder set under the state directory (``ASTOLFO_STATE_DIR`` or the
platformdirs state dir): the picks as recipe TOML (absolute paths: it is the app's own note, not
a file the user shares), and the recipe file the user had loaded or saved, with its text as it
was then (so a later save can tell whether someone changed the file in between). Unreadable or
stale notes are ignored: remembering is a convenience, never a reason not to open.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

_VERSION = 1


@dataclass
class Session:
    recipe_toml: str  # the picks, as recipe_to_toml wrote them
    base_dir: Path  # what relative paths in them resolve against
    recipe_path: Path | None  # the user's recipe file, when one was loaded or saved
    recipe_text: str | None  # that file's text when it was loaded or saved


def _sessions_dir() -> Path:
    base = os.environ.get("ASTOLFO_STATE_DIR") or platformdirs.user_state_dir("astolfo")
    return Path(base) / "sessions"


def _key(folders: list[Path]) -> str:
    names = sorted(os.path.abspath(p) for p in folders)
    return hashlib.sha256("\n".join(names).encode("utf-8", "surrogateescape")).hexdigest()[:24]


def session_path(folders: list[Path]) -> Path:
    return _sessions_dir() / f"{_key(folders)}.json"


def load_session(folders: list[Path]) -> Session | None:
    try:
        data = json.loads(session_path(folders).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("version") != _VERSION or not isinstance(data.get("recipe"), str):
        return None
    path = data.get("recipe_path")
    text = data.get("recipe_text")
    base = data.get("base_dir") if isinstance(data.get("base_dir"), str) else os.path.abspath(folders[0])
    return Session(data["recipe"], Path(base), Path(path) if isinstance(path, str) else None,
                   text if isinstance(text, str) else None)


def save_session(folders: list[Path], session: Session) -> None:
    """Write atomically; failing to remember is not worth an error."""
    path = session_path(folders)
    data = {
        "version": _VERSION,
        "folders": [os.path.abspath(p) for p in folders],
        "recipe": session.recipe_toml,
        "base_dir": str(session.base_dir),
        "recipe_path": str(session.recipe_path) if session.recipe_path else None,
        "recipe_text": session.recipe_text,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, ensure_ascii=False), "utf-8")
        os.replace(tmp, path)
    except OSError:
        pass
