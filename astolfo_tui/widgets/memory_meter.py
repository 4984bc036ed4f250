"""A one-line memory meter: ``GPU  ▕██████▌░░░░▏  12.3 / 80.0 GB  merge peak 9.1 GB  util 97%``.

The bar is the whole card (or machine); the peak may be another quantity (the merge process's
own peak on a GPU), so its label is the caller's."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

BAR = 24
FULL, PARTS = "█", " ▏▎▍▌▋▊▉"


def bar(fraction: float, width: int = BAR) -> tuple[str, str]:
    """The filled part (in eighths of a cell) and the empty rest of a ``width``-cell bar."""
    fraction = max(0.0, min(1.0, fraction))
    eighths = round(fraction * width * 8)
    full, part = divmod(eighths, 8)
    filled = FULL * full + (PARTS[part] if part and full < width else "")
    return filled, " " * (width - len(filled))


def gb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e9:,.1f}"


class MemoryMeter(Static):
    """Shows used/total (and peak, utilisation when known), or a plain note such as "no GPU"."""

    def __init__(self, label: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.label = label

    def show(
        self,
        used: int | None,
        total: int | None,
        peak: int | None = None,
        util: int | None = None,
        note: str | None = None,
        peak_label: str = "peak",
    ) -> None:
        t = Text()
        t.append(f"{self.label:<5}", style="bold")
        if note is not None or used is None or not total:
            t.append(note or "unknown", style="#565f89")
            self.update(t)
            return
        fraction = used / total
        colour = "#9ece6a" if fraction < 0.75 else ("#e0af68" if fraction < 0.9 else "#f7768e")
        filled, empty = bar(fraction)
        t.append(filled, style=f"{colour} on #292e42")
        t.append(empty, style="on #292e42")
        t.append("  ")
        t.append(f"{gb(used)} / {gb(total)} GB", style="bold")
        if peak is not None:
            t.append(f"  {peak_label} {gb(peak)} GB", style="#7aa2f7")
        if util is not None:
            t.append(f"  util {util}%", style="#bb9af7")
        self.update(t)
