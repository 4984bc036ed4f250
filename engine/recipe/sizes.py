"""Sizes a user writes in a recipe (``memory = "8GB"``) and the default memory budget."""

from __future__ import annotations

import os
import re

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 1 << 10, "MIB": 1 << 20,
         "GIB": 1 << 30, "TIB": 1 << 40}
SMALLEST = 10**6  # "1MB": below that a budget holds nothing useful
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(text: str) -> int:
    """Bytes of ``"8GB"``, ``"512 MiB"``, ``"1.5GB"`` (decimal and binary units, case-insensitive);
    ValueError saying what is accepted."""
    m = _SIZE.match(text)
    unit = m.group(2).upper() if m else None
    if m is None or unit not in UNITS:
        raise ValueError("expected a size such as \"8GB\" or \"512MiB\" (units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    size = int(float(m.group(1)) * UNITS[unit])
    if size < SMALLEST:
        raise ValueError("the smallest budget is 1MB")
    return size


def memory_budget(text: str | None) -> int:
    """The recipe's budget in bytes, or by default a quarter of the machine's RAM (4 GB where it
    cannot be told)."""
    if text is not None:
        return parse_size(text)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 4 * 10**9
