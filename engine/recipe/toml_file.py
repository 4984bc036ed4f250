"""Merge recipes: the TOML file that says which models feed which component of which output.

The TUI writes recipes with ``recipe_to_toml`` and the merge reads them with ``load_recipe``;
``parse_recipe(recipe_to_toml(r), r.base_dir) == r`` for every recipe, so nothing is lost on the
way. Parsing checks only the file's structure (TOML syntax, known keys, value types) and reports
every structural problem at once; whether ids, files, components and outputs make sense is the
planner's job (``engine.plan.planner.check_recipe``), which also reports every problem at once.

Format::

    name = "x17-AstolfoMix"         # titles and default file names
    arch = "sdxl"                    # optional; checked against the models
    dtype = "fp16"                   # output storage: fp16 | bf16 | fp32
    device = "auto"                  # auto | cpu | cuda | cuda:N
    memory = "8GB"                   # optional; what a geometric median may hold (a run setting)
    date = "2024-05-01"              # optional; ModelSpec date (never the clock)
    strict = false                   # refuse keys missing from some models of a selection
    skip_nan = false                 # skip a source tensor holding NaN/Inf instead of stopping

    [models]                         # id = path, relative to the recipe's folder
    _x01 = "models/_x01-foo.safetensors"
    _x02 = { path = "models/_x02-bar.safetensors", sha256 = "5bd3b4a4c7" }   # pinned (AutoV2 or full)

    [select]                         # named selections: lists of model ids
    unet = ["_x01", "_x02"]

    [weights]                        # optional relative weights (default 1), normalised per selection
    _x02 = 2.0

    [methods.unet]                   # optional: how selection "unet" is combined (default: the mean)
    method = "ties_soup"             # preset: mean | add_difference | ties | ties_soup | dare | della | model_stock
    base = "_x01"                    # fields: see engine.methods.params

    [metadata]                       # optional extra str -> str written into every output
    "modelspec.author" = "me"

    [[output]]                       # one table per output file
    path = "out/mix.safetensors"     # default: <name>.safetensors
    unet = "unet"                    # component id = selection name
    dtype = "bf16"                   # optional per-output storage dtype
    title = "Mix"                    # optional ModelSpec title (default: file name stem)
"""

from __future__ import annotations

import datetime as _dt
import difflib
import math
import os
import re
import tomllib
from pathlib import Path, PurePath

from engine.checkpoint.architectures import component_ids
from engine.methods.params import FIELDS as METHOD_FIELDS
from engine.recipe.model import ModelEntry, OutputSpec, Recipe, RecipeError

# Keys each table accepts; anything else is a structural problem (a typo like `skip_nans` must
# not be silently ignored).
TOP_KEYS = ("name", "arch", "dtype", "device", "memory", "date", "strict", "skip_nan", "models", "select",
            "weights", "metadata", "methods", "output")
OUTPUT_KEYS = ("path", "dtype", "title")
MODEL_KEYS = ("path", "sha256")


# --------------------------------------------------------------------------- reading


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read a recipe file; relative paths inside it resolve against its folder."""
    recipe, problems = load_recipe_lenient(path)
    if problems:
        raise RecipeError(path, problems)
    return recipe  # type: ignore[return-value]


def load_recipe_lenient(path: str | os.PathLike) -> tuple[Recipe | None, list[str]]:
    """The recipe and every structural problem of the file. The recipe is None only when the
    file cannot be read or is not TOML; otherwise it is what the file says with the bad parts
    left at their defaults, so the planner's checks can still run and report the rest (an
    unknown setting must not hide a wrong model id)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, ["no such file"]
    except UnicodeDecodeError:
        return None, ["not UTF-8 text"]
    except OSError as e:
        return None, [f"cannot read: {e.strerror or e}"]
    return _parse(text, path.resolve().parent, path)


def parse_recipe(text: str, base_dir: str | os.PathLike, source: str | os.PathLike = "<recipe>") -> Recipe:
    """Parse recipe TOML ``text``; raises RecipeError listing every structural problem."""
    recipe, problems = _parse(text, Path(base_dir), source)
    if problems:
        raise RecipeError(source, problems)
    return recipe  # type: ignore[return-value]


def _parse(text: str, base_dir: Path, source) -> tuple[Recipe | None, list[str]]:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        return None, [f"not valid TOML: {e}"]
    p = _Parser(source)
    recipe = p.recipe(doc, Path(base_dir))
    return recipe, p.problems


class _Parser:
    def __init__(self, source):
        self.source = source
        self.problems: list[str] = []

    def bad(self, message: str) -> None:
        self.problems.append(message)

    def recipe(self, doc: dict, base_dir: Path) -> Recipe:
        for key in doc:
            if key not in TOP_KEYS:
                self.bad(f"unknown setting {key!r}{did_you_mean(key, TOP_KEYS)} (known: {', '.join(TOP_KEYS)})")
        name = self.string(doc, "name", "name", required=True) or ""
        arch = self.string(doc, "arch", "arch")
        dtype = self.string(doc, "dtype", "dtype") or "fp16"
        device = self.string(doc, "device", "device") or "auto"
        memory = self.string(doc, "memory", "memory")
        if memory is not None:
            from engine.recipe.sizes import parse_size

            try:
                parse_size(memory)
            except ValueError as e:
                self.bad(f"memory = {memory!r}: {e}")
                memory = None
        date = self.date(doc.get("date"))
        strict = self.boolean(doc, "strict")
        skip_nan = self.boolean(doc, "skip_nan")
        models = self.models(self.table(doc, "models", required=True))
        select = self.select(self.table(doc, "select", required=True))
        weights = self.weights(self.table(doc, "weights"))
        metadata = self.metadata(self.table(doc, "metadata"))
        methods = self.methods(self.table(doc, "methods"))
        outputs = self.outputs(doc.get("output"), name, select)
        return Recipe(
            name=name, models=models, select=select, outputs=outputs, arch=arch, dtype=dtype,
            device=device, memory=memory, weights=weights, strict=strict, skip_nan=skip_nan, date=date,
            base_dir=base_dir, metadata=metadata, methods=methods,
        )

    def string(self, table: dict, key: str, where: str, required: bool = False) -> str | None:
        if key not in table:
            if required:
                self.bad(f"{where}: missing")
            return None
        value = table[key]
        if not isinstance(value, str):
            self.bad(f"{where}: expected a string, got {_toml_type(value)}")
            return None
        return value

    def boolean(self, table: dict, key: str) -> bool:
        value = table.get(key, False)
        if not isinstance(value, bool):
            self.bad(f"{key}: expected true or false, got {_toml_type(value)}")
            return False
        return value

    def date(self, value) -> str | None:
        if value is None:
            return None
        if isinstance(value, (_dt.date, _dt.datetime)):
            return value.isoformat()
        if isinstance(value, str):
            return value
        self.bad(f"date: expected a date or string, got {_toml_type(value)}")
        return None

    def table(self, doc: dict, key: str, required: bool = False) -> dict:
        if key not in doc:
            if required:
                self.bad(f"[{key}]: missing")
            return {}
        value = doc[key]
        if not isinstance(value, dict):
            self.bad(f"{key}: expected a table [{key}], got {_toml_type(value)}")
            return {}
        return value

    def models(self, table: dict) -> dict[str, ModelEntry]:
        out = {}
        for mid, value in table.items():
            if isinstance(value, str):
                out[mid] = ModelEntry(mid, Path(value), None)
            elif isinstance(value, dict):
                for k in value:
                    if k not in MODEL_KEYS:
                        self.bad(f"models.{mid}: unknown key {k!r}{did_you_mean(k, MODEL_KEYS)} (known: path, sha256)")
                path = self.string(value, "path", f"models.{mid}.path", required=True)
                sha = self.string(value, "sha256", f"models.{mid}.sha256")
                if path is not None:
                    out[mid] = ModelEntry(mid, Path(path), sha.lower() if sha else None)
            else:
                self.bad(f"models.{mid}: expected a path or {{ path = ..., sha256 = ... }}, got {_toml_type(value)}")
        return out

    def select(self, table: dict) -> dict[str, list[str]]:
        out = {}
        for name, value in table.items():
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                self.bad(f"select.{name}: expected a list of model ids, got {_toml_type(value)}")
                continue
            out[name] = list(value)
        return out

    def weights(self, table: dict) -> dict[str, float]:
        out = {}
        for mid, value in table.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                self.bad(f"weights.{mid}: expected a number, got {_toml_type(value)}")
                continue
            out[mid] = float(value)
        return out

    def metadata(self, table: dict) -> dict[str, str]:
        out = {}
        for key, value in table.items():
            if not isinstance(value, str):
                self.bad(
                    f"metadata.{key}: expected a string (safetensors metadata is str -> str), got {_toml_type(value)}"
                )
                continue
            out[key] = value
        return out

    def methods(self, table: dict) -> dict[str, dict[str, object]]:
        """Each selection's method table as written; values are checked by the planner
        (``engine.methods.params.problems``), which names selection, field and value."""
        out = {}
        for sel, value in table.items():
            if not isinstance(value, dict):
                self.bad(f"methods.{sel}: expected a table [methods.{sel}], got {_toml_type(value)}")
                continue
            fields = {}
            for k, v in value.items():
                if k not in METHOD_FIELDS:
                    self.bad(f"methods.{sel}: unknown key {k!r} (known: {', '.join(METHOD_FIELDS)})")
                elif isinstance(v, (dict, list)):
                    self.bad(f"methods.{sel}.{k}: expected a string, number or boolean, got {_toml_type(v)}")
                else:
                    fields[k] = v
            out[sel] = fields
        return out

    def outputs(self, value, name: str, select: dict[str, list[str]]) -> list[OutputSpec]:
        if value is None:
            self.bad("[[output]]: missing (at least one output file is needed)")
            return []
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            self.bad("output: expected [[output]] tables")
            return []
        outs = []
        for i, table in enumerate(value, 1):
            where = f"output {i}"
            sources = {}
            for key, v in table.items():
                if key in OUTPUT_KEYS:
                    continue
                if key not in component_ids():
                    hint = did_you_mean(key, component_ids() + OUTPUT_KEYS)
                    self.bad(
                        f"{where}: unknown key {key!r}{hint} (components: {', '.join(component_ids())};"
                        f" settings: {', '.join(OUTPUT_KEYS)})"
                    )
                elif not isinstance(v, str):
                    self.bad(f"{where}.{key}: expected a selection name, got {_toml_type(v)}")
                else:
                    sources[key] = v
            path = self.string(table, "path", f"{where}.path")
            outs.append(
                OutputSpec(
                    path=Path(path) if path is not None else None,  # type: ignore[arg-type]
                    sources=sources,
                    dtype=self.string(table, "dtype", f"{where}.dtype"),
                    title=self.string(table, "title", f"{where}.title"),
                )
            )
        _default_paths(outs, name)
        return outs


def did_you_mean(word: str, choices) -> str:
    """``"; did you mean 'skip_nan'?"`` for the closest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    if not close:
        lowered = {str(c).casefold(): str(c) for c in choices}
        close = [lowered[word.casefold()]] if word.casefold() in lowered else []
    return f"; did you mean {close[0]!r}?" if close else ""


def _default_paths(outputs: list[OutputSpec], name: str) -> None:
    """Outputs without a path get one from the recipe name (and the unet selection when there
    are several outputs), so a recipe written back out names every file explicitly."""
    stem = _safe_file_name(name) or "mix"
    missing = [o for o in outputs if o.path is None]
    if not missing:
        return
    if len(outputs) == 1:
        outputs[0].path = Path(f"{stem}.safetensors")
        return
    for i, o in enumerate(outputs, 1):
        if o.path is None:
            tag = o.sources.get("unet")
            unique = tag and sum(1 for x in outputs if x.sources.get("unet") == tag) == 1
            o.path = Path(f"{stem}-{tag if unique else i}.safetensors")


def _safe_file_name(name: str) -> str:
    return re.sub(r"[^\w.+-]+", "_", name).strip("._")


def _toml_type(value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


# --------------------------------------------------------------------------- writing

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")  # fullmatch: "$" would let a trailing newline through


def _key(k: str) -> str:
    return k if _BARE_KEY.fullmatch(k) else _string(k)


def _string(s: str) -> str:
    out = ['"']
    for ch in s:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _float(x: float) -> str:
    if not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    text = repr(float(x))
    return text if any(c in text for c in ".en") else text + ".0"


def _value(v) -> str:
    """A method field's value (string, boolean, integer or number) as TOML."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return _float(v)
    return _string(str(v))


def _path(p: PurePath) -> str:
    return _string(p.as_posix() if isinstance(p, PurePath) else str(p))


def recipe_to_toml(recipe: Recipe, run_settings: bool = True) -> str:
    """The recipe as TOML text; ``parse_recipe`` of it gives back an equal Recipe.
    ``run_settings=False`` leaves out how it is run (``device``), which is no part of what the
    mix is (output metadata)."""
    lines = [f"name = {_string(recipe.name)}"]
    if recipe.arch is not None:
        lines.append(f"arch = {_string(recipe.arch)}")
    lines.append(f"dtype = {_string(recipe.dtype)}")
    if run_settings:
        lines.append(f"device = {_string(recipe.device)}")
        if recipe.memory is not None:
            lines.append(f"memory = {_string(recipe.memory)}")
    if recipe.date is not None:
        lines.append(f"date = {_string(recipe.date)}")
    if recipe.strict:
        lines.append("strict = true")
    if recipe.skip_nan:
        lines.append("skip_nan = true")

    lines += ["", "[models]"]
    for mid, entry in recipe.models.items():
        if entry.sha256:
            lines.append(f"{_key(mid)} = {{ path = {_path(entry.path)}, sha256 = {_string(entry.sha256)} }}")
        else:
            lines.append(f"{_key(mid)} = {_path(entry.path)}")

    lines += ["", "[select]"]
    for name, ids in recipe.select.items():
        lines.append(f"{_key(name)} = [{', '.join(_string(i) for i in ids)}]")

    if recipe.weights:
        lines += ["", "[weights]"]
        for mid, w in recipe.weights.items():
            lines.append(f"{_key(mid)} = {_float(w)}")

    if recipe.metadata:
        lines += ["", "[metadata]"]
        for k, v in recipe.metadata.items():
            lines.append(f"{_key(k)} = {_string(v)}")

    for sel, fields in recipe.methods.items():
        lines += ["", f"[methods.{_key(sel)}]"]
        for k in METHOD_FIELDS:
            if k in fields:
                lines.append(f"{k} = {_value(fields[k])}")

    for out in recipe.outputs:
        lines += ["", "[[output]]", f"path = {_path(out.path)}"]
        for cid, sel in out.sources.items():
            lines.append(f"{_key(cid)} = {_string(sel)}")
        if out.dtype is not None:
            lines.append(f"dtype = {_string(out.dtype)}")
        if out.title is not None:
            lines.append(f"title = {_string(out.title)}")
    return "\n".join(lines) + "\n"


def save_recipe(recipe: Recipe, path: str | os.PathLike, original: str | None = None) -> Path:
    """Write the recipe atomically (a temporary file beside it, then a rename).

    ``original``: the text of the user's file as it was loaded; the file is then edited in place
    (``engine.recipe.toml_edit``: comments, layout and relative paths kept) instead of written
    afresh. A new file gets paths relative to its folder where the files lie under or beside it."""
    from engine.recipe.toml_edit import portable, update_document

    path = Path(path)
    folder = path.absolute().parent
    text = None
    if original is not None:
        try:
            text = update_document(original, recipe, folder)
            if not _same_recipe(parse_recipe(text, folder), recipe):
                text = None  # the edit did not say the same thing: write it afresh instead
        except Exception:  # not TOML any more, or an edit tomlkit refuses: write it afresh
            text = None
    if text is None:
        text = recipe_to_toml(portable(recipe, folder))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise RecipeError(path, f"cannot write: {e.strerror or e}") from None
    return path


def _same_recipe(a: Recipe, b: Recipe) -> bool:
    """``a`` (the edited file, read back) says what ``b`` says: the same files (wherever the
    paths are written from), ids, selections, outputs and settings. A pin the user's file does
    not have is not added to it (the file is theirs); a pin it has must match."""
    if set(a.models) != set(b.models):
        return False
    for m, e in a.models.items():
        if e.sha256 is not None and e.sha256 != b.models[m].sha256:
            return False

    def files(r: Recipe):
        return (
            {m: os.path.abspath(r.model_path(m)) for m in r.models},
            [(os.path.abspath(r.output_path(o)), o.sources, o.dtype, o.title) for o in r.outputs],
        )

    settings = ("name", "arch", "dtype", "device", "memory", "date", "strict", "skip_nan", "select", "weights",
                "metadata", "methods")
    return files(a) == files(b) and all(getattr(a, k) == getattr(b, k) for k in settings)
