"""Saving a recipe over the user's own file without rewriting it: comments, blank lines, key
order, quoting and relative paths stay as the user wrote them; only values that changed change.

``recipe_to_toml`` writes a recipe from scratch (job copies, output metadata); this module is for
the one file that belongs to the user. It edits the parsed document in place with tomlkit (a
format-preserving TOML editor) instead of re-serialising it:

- a model whose path still names the same file keeps its path text (``models/a.safetensors``
  stays relative even though the app holds it as an absolute path), and its pin stays as written;
- models, selections, weights and metadata entries that went away are removed, new ones are
  appended (paths relative to the recipe's folder when they lie under it);
- ``[[output]]`` tables are edited one by one while their number is unchanged;
- ``[methods.<selection>]`` tables are edited field by field (a field's comment stays), a new
  one is appended, one whose selection became the mean is removed.

``portable_paths`` gives the relative form used for anything new.
"""

from __future__ import annotations

import os
from pathlib import Path

import tomlkit
from tomlkit.items import AoT, InlineTable, Table

from engine.recipe.model import ModelEntry, OutputSpec, Recipe

_SCALARS = ("name", "arch", "dtype", "device", "date", "strict", "skip_nan")
_DEFAULTS = {"arch": None, "dtype": "fp16", "device": "auto", "date": None, "strict": False, "skip_nan": False}


def relative_to_folder(path: Path, folder: Path) -> str:
    """``path`` as a recipe in ``folder`` should write it: relative when it lies under that
    folder or beside it (``../mixes/x.safetensors``), else absolute. Always with ``/``."""
    path = Path(os.path.abspath(path))
    folder = Path(os.path.abspath(folder))
    for base, prefix in ((folder, ""), (folder.parent, "../")):
        try:
            return prefix + path.relative_to(base).as_posix()
        except ValueError:
            continue
    return path.as_posix()


def _same_file(written: str, new: Path, base_dir: Path) -> bool:
    p = Path(written).expanduser()
    p = p if p.is_absolute() else base_dir / p
    return os.path.abspath(p) == os.path.abspath(new)


def portable(recipe: Recipe, folder: Path) -> Recipe:
    """A copy of ``recipe`` with its model and output paths relative to ``folder`` (the folder
    the recipe file goes in) where they lie under it or beside it."""
    from dataclasses import replace

    models = {mid: ModelEntry(mid, Path(relative_to_folder(recipe.model_path(mid), folder)), e.sha256)
              for mid, e in recipe.models.items()}
    outputs = [replace(o, path=Path(relative_to_folder(recipe.output_path(o), folder))) for o in recipe.outputs]
    return replace(recipe, models=models, outputs=outputs, base_dir=Path(folder))


def update_document(text: str, recipe: Recipe, folder: Path) -> str:
    """``text`` (the user's recipe file, valid TOML) edited so that it says ``recipe``; what did
    not change keeps its exact text. ``folder`` is the file's folder (relative paths in it
    resolve against it)."""
    doc = tomlkit.parse(text)
    folder = Path(os.path.abspath(folder))
    for key in _SCALARS:
        value = getattr(recipe, key)
        if key in doc:
            if value is None:
                del doc[key]
            elif _scalar(doc[key]) != value:
                doc[key] = value
        elif value is not None and value != _DEFAULTS.get(key):
            doc[key] = value  # tomlkit puts a new setting before the tables

    models = _table(doc, "models")
    for mid in [k for k in models if k not in recipe.models]:
        del models[mid]
    for mid, entry in recipe.models.items():
        new_path = recipe.model_path(mid)
        if mid in models:
            old = models[mid]
            old_path = old.get("path") if isinstance(old, dict) else old
            if isinstance(old_path, str) and _same_file(old_path, new_path, folder):
                if isinstance(old, (dict, InlineTable, Table)) and entry.sha256 and not old.get("sha256"):
                    old["sha256"] = entry.sha256
                continue
        models[mid] = _model_value(relative_to_folder(new_path, folder), entry.sha256)

    _sync_table(doc, "select", {k: list(v) for k, v in recipe.select.items()})
    _sync_table(doc, "weights", dict(recipe.weights), drop_empty=True)
    _sync_table(doc, "metadata", dict(recipe.metadata), drop_empty=True)
    _sync_methods(doc, recipe)
    _sync_outputs(doc, recipe, folder)
    return tomlkit.dumps(doc)


def _scalar(value):
    value = _plain(value)
    return value.isoformat() if hasattr(value, "isoformat") else value


def _model_value(path: str, sha256: str | None):
    if not sha256:
        return path
    t = tomlkit.inline_table()
    t.update({"path": path, "sha256": sha256})
    return t


def _table(doc, key: str):
    if key not in doc:
        doc[key] = tomlkit.table()
    return doc[key]


def _sync_table(doc, key: str, wanted: dict, drop_empty: bool = False) -> None:
    if not wanted and drop_empty:
        if key in doc:
            del doc[key]
        return
    table = _table(doc, key)
    for k in [k for k in table if k not in wanted]:
        del table[k]
    for k, v in wanted.items():
        if k not in table or _plain(table[k]) != v:
            table[k] = v


def _sync_methods(doc, recipe: Recipe) -> None:
    """The ``[methods]`` tables say ``recipe.methods``: fields edited in place, so the
    user's comments on the lines that stay are kept."""
    if not recipe.methods:
        if "methods" in doc:
            del doc["methods"]
        return
    if "methods" not in doc:
        doc["methods"] = tomlkit.table(is_super_table=True)
    methods = doc["methods"]
    for sel in [k for k in methods if k not in recipe.methods]:
        del methods[sel]
    for sel, fields in recipe.methods.items():
        if sel not in methods:
            table = tomlkit.table()
            table.update(fields)
            table.add(tomlkit.nl())
            methods[sel] = table
            continue
        table = methods[sel]
        for k in [k for k in table if k not in fields]:
            del table[k]
        for k, v in fields.items():
            if k not in table or _plain(table[k]) != v or type(_plain(table[k])) is not type(v):
                table[k] = v


def _plain(value):
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return float(value)
    return value.unwrap() if hasattr(value, "unwrap") else value


def _output_values(o: OutputSpec, recipe: Recipe, folder: Path) -> dict:
    values = {"path": relative_to_folder(recipe.output_path(o), folder)}
    values.update(o.sources)
    if o.dtype is not None:
        values["dtype"] = o.dtype
    if o.title is not None:
        values["title"] = o.title
    return values


def _sync_outputs(doc, recipe: Recipe, folder: Path) -> None:
    old = doc.get("output")
    if isinstance(old, AoT) and len(old) == len(recipe.outputs):
        for table, o in zip(old, recipe.outputs):
            wanted = _output_values(o, recipe, folder)
            written = table.get("path")
            if isinstance(written, str) and _same_file(written, recipe.output_path(o), folder):
                wanted["path"] = str(written)
            for k in [k for k in table if k not in wanted]:
                del table[k]
            for k, v in wanted.items():
                if k not in table or _plain(table[k]) != v:
                    table[k] = v
        return
    if "output" in doc:
        del doc["output"]
    aot = tomlkit.aot()
    for o in recipe.outputs:
        t = tomlkit.table()
        t.update(_output_values(o, recipe, folder))
        aot.append(t)
    doc.append("output", aot)
