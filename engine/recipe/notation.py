"""The selection notation of the AstolfoMix article, e.g.::

    te0: --,--,03,05,--,10,11=4

One line per selection: every model in model order, written as its id without a leading
``_x`` (``_x03`` -> ``03``) when selected and ``--`` when not, then ``=`` and the count, then
the selection's merge method when it is not the plain mean, with the parameters that differ
from the method's defaults::

    unet: 01,02,--,04=3 ties(base=00, trim=0.3)

(the base has no default, so it is always written, as a short id like the cells).
Mixers read and share selections in this form, so astolfo writes it and reads it back. Ids alone
are only meaningful next to their files, so an export ends with a legend (``format_legend``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from engine.methods.params import DEFAULTS, FIELDS, PRESETS

PLACEHOLDER = "--"


def short_id(model_id: str) -> str:
    """A model id as the article writes it: ``_x03`` -> ``03``; other ids unchanged."""
    return model_id[2:] if model_id.startswith("_x") and len(model_id) > 2 else model_id


def format_method(fields: Mapping[str, object] | None) -> str:
    """A ``[methods.<selection>]`` table as the notation writes it after the count:
    ``ties(trim=0.3)``, only the fields that differ from the method's defaults (the preset's,
    then the global ones); ``""`` for the mean (no table, or ``method = "mean"``)."""
    if not fields or fields.get("method", "mean") == "mean":
        return ""
    method = str(fields["method"])
    defaults = {**DEFAULTS, **PRESETS.get(method, {})}
    order = [k for k in FIELDS if k in fields] + [k for k in fields if k not in FIELDS]
    shown = []
    for k in order:
        v = fields[k]
        if k == "method" or (k in defaults and _equal(defaults[k], v)):
            continue
        shown.append(f"{k}={_value(k, v)}")
    return f"{method}({', '.join(shown)})" if shown else method


def _equal(a, b) -> bool:
    """The same setting: 1 and 1.0 are, ``true`` and 1 are not."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b


def _value(key: str, v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if key == "base" and isinstance(v, str):
        return short_id(v)
    return str(v)


def format_line(name: str, model_ids: Sequence[str], selected: Iterable[str],
                method: Mapping[str, object] | None = None) -> str:
    """One selection as ``name: 01,--,03=2`` over ``model_ids`` in the order given, with
    `` ties(...)`` after the count when ``method`` (its methods table) is not the mean."""
    chosen = set(selected)
    cells = [short_id(mid) if mid in chosen else PLACEHOLDER for mid in model_ids]
    count = sum(1 for mid in model_ids if mid in chosen)
    how = format_method(method)
    return f"{name}: {','.join(cells)}={count}" + (f" {how}" if how else "")


def format_notation(model_ids: Sequence[str], selections: Mapping[str, Iterable[str]],
                    methods: Mapping[str, Mapping[str, object]] | None = None) -> str:
    """Every selection, one line each, in the mapping's order; ends with a newline.
    ``methods``: selection -> its methods table (selections without one are the mean)."""
    methods = methods or {}
    return "".join(format_line(name, model_ids, ids, methods.get(name)) + "\n" for name, ids in selections.items())


def format_legend(entries: Iterable[tuple[str, str, str | None]]) -> str:
    """What the ids stand for, as ``#`` comment lines after the notation (``parse_notation``
    skips them): ``# 03  _x03-Kohaku.safetensors  AutoV2 5bd3b4a4c7`` per (id, file name,
    AutoV2 or None), so the text means the same files tomorrow, on another machine."""
    rows = [(short_id(mid), name, autov2) for mid, name, autov2 in entries]
    if not rows:
        return ""
    width = max(len(r[0]) for r in rows)
    lines = ["# legend: id, file, AutoV2"]
    for sid, name, autov2 in rows:
        lines.append(f"# {sid:<{width}}  {name}  {'AutoV2 ' + autov2 if autov2 else '(not hashed yet)'}")
    return "\n".join(lines) + "\n"


class NotationError(ValueError):
    """A notation line that cannot be read against the given models."""


def parse_notation(text: str, model_ids: Sequence[str]) -> dict[str, list[str]]:
    """Read lines written by :func:`format_notation` back into selections (lists of model ids
    in model order). Cells are matched by short id, so the line may list models in any order and
    may leave out ``--`` cells; a stated ``=count`` must agree with the cells. A method after
    the count (``=3 ties(trim=0.3)``) is skipped here: see :func:`parse_methods`."""
    by_short: dict[str, str] = {}
    for mid in model_ids:
        by_short.setdefault(short_id(mid), mid)
        by_short.setdefault(mid, mid)
    order = {mid: i for i, mid in enumerate(model_ids)}
    out: dict[str, list[str]] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, body = line.partition(":")
        name = name.strip()
        if not sep or not name:
            raise NotationError(f"line {lineno}: expected 'name: cells=count', got {raw!r}")
        body, eq, count_text = body.partition("=")
        chosen: list[str] = []
        for cell in (c.strip() for c in body.split(",")):
            if not cell or set(cell) == {"-"}:
                continue
            if cell not in by_short:
                raise NotationError(f"line {lineno} ({name}): no model with id {cell!r}")
            chosen.append(by_short[cell])
        if eq:
            m = _COUNT.match(count_text.strip())
            count_text = m.group("count") if m else count_text.strip()
            try:
                stated = int(count_text)
            except ValueError:
                raise NotationError(f"line {lineno} ({name}): count {count_text.strip()!r} is not a number") from None
            if stated != len(set(chosen)):
                raise NotationError(f"line {lineno} ({name}): says ={stated} but lists {len(set(chosen))} models")
        out[name] = sorted(set(chosen), key=order.__getitem__)
    return out


# the count, then optionally a method name and its parameters in parentheses
_COUNT = re.compile(r"(?P<count>\S*)\s*(?P<method>[A-Za-z_][\w]*(\((?P<params>[^)]*)\))?)?\s*$")


def parse_methods(text: str) -> dict[str, str]:
    """selection -> the method text written after its count (``ties(trim=0.3)``), for the lines
    that have one; what the parameters mean is the methods module's business, not the
    notation's."""
    out = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, body = line.partition(":")
        _, eq, count_text = body.partition("=")
        if not sep or not eq:
            continue
        m = _COUNT.match(count_text.strip())
        if m and m.group("method"):
            out[name.strip()] = m.group("method")
    return out
