"""The selection notation of the AstolfoMix article, e.g.::

    te0: --,--,03,05,--,10,11=4

One line per selection: every model in model order, written as its id without a leading
``_x`` (``_x03`` -> ``03``) when selected and ``--`` when not, then ``=`` and the count.
Mixers read and share selections in this form, so astolfo writes it and reads it back. Ids alone
are only meaningful next to their files, so an export ends with a legend (``format_legend``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

PLACEHOLDER = "--"


def short_id(model_id: str) -> str:
    """A model id as the article writes it: ``_x03`` -> ``03``; other ids unchanged."""
    return model_id[2:] if model_id.startswith("_x") and len(model_id) > 2 else model_id


def format_line(name: str, model_ids: Sequence[str], selected: Iterable[str]) -> str:
    """One selection as ``name: 01,--,03=2`` over ``model_ids`` in the order given."""
    chosen = set(selected)
    cells = [short_id(mid) if mid in chosen else PLACEHOLDER for mid in model_ids]
    count = sum(1 for mid in model_ids if mid in chosen)
    return f"{name}: {','.join(cells)}={count}"


def format_notation(model_ids: Sequence[str], selections: Mapping[str, Iterable[str]]) -> str:
    """Every selection, one line each, in the mapping's order; ends with a newline."""
    return "".join(format_line(name, model_ids, ids) + "\n" for name, ids in selections.items())


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
    may leave out ``--`` cells; a stated ``=count`` must agree with the cells."""
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
            try:
                stated = int(count_text.strip())
            except ValueError:
                raise NotationError(f"line {lineno} ({name}): count {count_text.strip()!r} is not a number") from None
            if stated != len(set(chosen)):
                raise NotationError(f"line {lineno} ({name}): says ={stated} but lists {len(set(chosen))} models")
        out[name] = sorted(set(chosen), key=order.__getitem__)
    return out
