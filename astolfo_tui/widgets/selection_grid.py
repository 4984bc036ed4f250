"""The selection grid: one row per model, one checkbox column per selection, in one DataTable of
Rich Text cells (a widget per cell is 20-100x slower to build). A toggle rewrites one cell and
one header label; filters and sorts rebuild the visible rows from the state.

Ticked cells show the model's short id and unticked ones ``--``, so a column reads like the
article's notation (``te0: --,--,03,05...=19``); the header carries the ``=count`` and the
selection's merge method when it is not the mean (``=10 ties``), as the notation writes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.coordinate import Coordinate
from textual.message import Message
from textual.widgets import DataTable
from textual.widgets.data_table import CellDoesNotExist, ColumnKey, RowKey

from astolfo_tui.selection_state import SelectionState
from engine.checkpoint.architectures import Architecture, architectures, get_architecture
from engine.library.report import CHECKPOINT, ModelReport, Severity
from engine.recipe.notation import short_id

SEL = "sel:"
HASH = "hash:"
METRIC = "metric:"
CONSENSUS = "consensus"  # the optional column: consensus cosine from the last comparison

# Colours for groups of identical components, in order of first appearance.
GROUP_COLOURS = ("#e5c07b", "#61afef", "#c678dd", "#56b6c2", "#d19a66", "#e06c75", "#98c379", "#f0a6ca")
TICK_STYLE = "bold #15161e on #9ece6a"
TICK_BROKEN_STYLE = "bold #15161e on #f7768e"
DIM = "#565f89"
ERROR = "#f7768e"
WARN = "#e0af68"
OK = "#9ece6a"
OUTPUT = "#bb9af7"  # a mix astolfo wrote
METHOD_STYLE = "italic #7dcfff"  # a selection's merge method in its header
SHORT_HASH = 8

FILTERS = ("all", "problems", "selected")
KIND_LABELS = {"lora": "LoRA", "diffusers": "diff", "pickle": "pickl", "unreadable": "bad", "unknown": "?"}


@dataclass
class HashView:
    """What the grid shows of a model's hashes: filled in as hashing finishes."""

    short: dict[str, str] = field(default_factory=dict)  # component -> short exact hash
    metric: dict[str, str] = field(default_factory=dict)  # component -> toolkit metric
    group: dict[str, int] = field(default_factory=dict)  # component -> group no. (shared only)
    same_as_reference: bool = False
    failed: str | None = None


class SelectionGrid(DataTable):
    """The model table. Emits :class:`SelectionGrid.Changed` after any pick changes and
    :class:`SelectionGrid.Refused` when a tick is refused."""

    BINDINGS = [
        Binding(
            "space",
            "toggle_cell",
            "Toggle",
            tooltip="Tick or untick the cell (refused, with the reason, for a broken component)",
        ),
        Binding(
            "c",
            "toggle_column",
            "Column",
            tooltip="Tick every shown model that can give this column's component; again: untick all",
        ),
        Binding("r", "toggle_row", "Row", tooltip="Tick this model in every selection it can go in; again: untick"),
        Binding("i", "invert_column", "Invert", show=False, tooltip="Invert this column's ticks (shown models)"),
        Binding("n", "clear_column", "None", show=False, tooltip="Untick the whole column"),
        Binding(
            "f",
            "cycle_filter",
            "Filter",
            tooltip="Show all models / only those with problems / only those ticked somewhere",
        ),
        Binding("o", "sort_by_column", "Sort", tooltip="Sort by this column; again: reverse; a third time: file order"),
    ]

    class Changed(Message):
        """Picks changed (the totals and anything derived from them must follow)."""

    class Refused(Message):
        def __init__(self, model_id: str, column: str, reason: str) -> None:
            super().__init__()
            self.model_id, self.column, self.reason = model_id, column, reason

    def __init__(self, state: SelectionState, **kwargs) -> None:
        super().__init__(cursor_type="cell", zebra_stripes=True, header_height=2, **kwargs)
        self.state = state
        self.hashes: dict[str, HashView] = {}
        self.filter = "all"
        self.search = ""
        self.sort_column: str | None = None
        self.sort_reverse = False
        self.hash_components: tuple[str, ...] = ()
        self.metric_components: tuple[str, ...] = ()
        self._visible: list[str] = []
        self.comparison: dict | None = None  # engine.compare's result, once one is known
        self.show_consensus = False
        self.consensus_selection: str | None = next(iter(state.columns), None)

    # -- building ----------------------------------------------------------------------------

    def rebuild(self, state: SelectionState | None = None) -> None:
        """Lay out every column and row from the state (new scan, loaded recipe, column
        added/renamed/removed). Keeps the cursor on the same model and column when it can."""
        if state is not None:
            self.state = state
        keep = self._cursor_keys()
        self.clear(columns=True)
        reports = list(self.state.reports.values())
        id_w = max([len(m) for m in self.state.order] + [2])
        self.short_w = max([len(short_id(m)) for m in self.state.order] + [2])
        file_w = min(max([len(_display_name(r)) for r in reports] + [4]), 30)
        self.add_column("id", key="id", width=id_w)
        self.add_column("file", key="file", width=file_w)
        self.add_column("arch", key="arch", width=5)
        self.add_column("dtype", key="dtype", width=5)
        self.add_column(Text("size", justify="right"), key="size", width=8)
        self.add_column("ok", key="status", width=2)
        for name in self.state.columns:
            self.add_column(self._sel_label(name), key=SEL + name, width=self._sel_width(name))
        self.hash_components = self._architecture().display_order
        for comp in self.hash_components:
            self.add_column(Text(f"#{comp}\n", style="italic"), key=HASH + comp, width=SHORT_HASH)
        # the toolkit metric exists for the first text encoder and the VAE (hashes.model's references)
        self.metric_components = tuple(c for c in ("te0", "te", "vae") if c in self._architecture().components)
        for comp in self.metric_components:
            self.add_column(Text(f"m:{comp}\n", style="italic"), key=METRIC + comp, width=max(4, len(comp) + 2))
        if self.show_consensus:
            self.add_column(self._consensus_label(), key=CONSENSUS, width=6)
        self.add_column("=sd", key="sd", width=3)
        self.fixed_columns = 1
        self._fill_rows()
        self._restore_cursor(keep)

    def _architecture(self) -> Architecture:
        return architectures().get(self.state.arch or "", get_architecture("sdxl"))

    def _fill_rows(self) -> None:
        self._visible = self.visible_ids()
        for mid in self._visible:
            self.add_row(*self._row_cells(mid), key=mid)

    def refilter(self) -> None:
        """Recompute which rows show and in what order (filter, search, sort changed)."""
        keep = self._cursor_keys()
        self.clear(columns=False)
        self._fill_rows()
        self._restore_cursor(keep)

    def visible_ids(self) -> list[str]:
        ids = [m for m in self.state.order if self._passes(m)]
        if self.sort_column:
            position = {m: i for i, m in enumerate(self.state.order)}
            ids.sort(key=lambda m: (self._sort_value(self.sort_column, m), position[m]), reverse=self.sort_reverse)
        return ids

    def _passes(self, mid: str) -> bool:
        if self.filter == "problems" and not self.state.problems_in(mid):
            return False
        if self.filter == "selected" and not self.state.selected_anywhere(mid):
            return False
        if self.search:
            report = self.state.reports[mid]
            hay = f"{mid} {report.file_name} {report.arch or report.kind}".lower()
            return all(word in hay for word in self.search.lower().split())
        return True

    def _sort_value(self, key: str, mid: str):
        report = self.state.reports[mid]
        if key.startswith(SEL):
            return (0 if self.state.is_ticked(key[len(SEL) :], mid) else 1,)
        hv = self.hashes.get(mid)
        simple: dict[str, Callable[[], object]] = {
            "id": lambda: 0,
            "file": lambda: report.file_name.lower(),
            "arch": lambda: report.arch or report.kind,
            "dtype": lambda: report.main_dtype or "",
            "size": lambda: report.file_size,
            "status": lambda: -int(report.severity),
            "sd": lambda: 0 if hv and hv.same_as_reference else 1,
        }
        if key in simple:
            return (simple[key](),)
        if key == CONSENSUS:
            value = self.consensus_of(mid)
            return (-value if value is not None else 2.0,)  # most agreeing first, unknown last
        comp = key.split(":", 1)[1]
        if key.startswith(HASH):
            return ((hv.short.get(comp, "~") if hv else "~"),)
        return ((hv.metric.get(comp, "~") if hv else "~"),)

    # -- cells -------------------------------------------------------------------------------

    def column_title(self, key: str) -> str:
        """A column as its header names it: ``#te0`` (hash), ``m:te0`` (metric), ``unet``."""
        if key.startswith(SEL):
            return key[len(SEL) :]
        if key.startswith(HASH):
            return "#" + key[len(HASH) :]
        if key.startswith(METRIC):
            return "m:" + key[len(METRIC) :]
        return {"status": "ok", CONSENSUS: "consensus cosine"}.get(key, key)

    def _sel_label(self, name: str) -> Text:
        label = Text(name, style="bold")
        label.append(f"\n={self.state.count(name)}", style=OK if self.state.count(name) else DIM)
        method = self.state.method_name(name)
        if method != "mean":
            label.append(f" {method}", style=METHOD_STYLE)
        return label

    def _sel_width(self, name: str) -> int:
        """Wide enough for the ticks and the header (its method too: ``=10 add_difference``)."""
        method = self.state.method_name(name)
        header = len(f"={max(len(self.state.order), 10)} {method}") if method != "mean" else 0
        return max(self.short_w, len(name), 3, header)

    def _row_cells(self, mid: str) -> list[Text]:
        report = self.state.reports[mid]
        cells = [
            Text(mid, style="bold"),
            Text(
                _display_name(report),
                overflow="ellipsis",
                no_wrap=True,
                style=OUTPUT if report.is_astolfo_output else "",
            ),
            _arch_cell(report),
            Text((report.main_dtype or "").lower(), style=DIM if report.kind != CHECKPOINT else ""),
            Text(_size(report.file_size), justify="right"),
            self._status_cell(mid),
        ]
        cells += [self._sel_cell(name, mid) for name in self.state.columns]
        cells += [self._hash_cell(comp, mid) for comp in self.hash_components]
        cells += [self._metric_cell(comp, mid) for comp in self.metric_components]
        if self.show_consensus:
            cells.append(self._consensus_cell(mid))
        hv = self.hashes.get(mid)
        cells.append(Text("=sd", style="bold #7dcfff") if hv and hv.same_as_reference else Text(""))
        return cells

    def _status_cell(self, mid: str) -> Text:
        report = self.state.reports[mid]
        nan = any(self.state.nan_counts.get(mid, {}).values())
        if report.severity >= Severity.ERROR or nan:
            return Text("✗", style=f"bold {ERROR}")
        if report.severity >= Severity.WARNING:
            return Text("!", style=f"bold {WARN}")
        return Text("✓", style=OK)

    def _sel_cell(self, name: str, mid: str) -> Text:
        col = self.state.columns[name]
        width = self._sel_width(name)
        ticked = mid in col.ids
        refused = self.state.refusal(name, mid)
        if col.single:
            glyph = "◉" if ticked else ("✗" if refused else "○")
            style = (
                f"bold {ERROR}"
                if (ticked and refused)
                else (f"bold {OK}" if ticked else (f"{ERROR} dim" if refused else DIM))
            )
            return Text(glyph.center(width), style=style)
        if ticked:
            return Text(short_id(mid).center(width), style=TICK_BROKEN_STYLE if refused else TICK_STYLE)
        if refused:
            return Text("✗".center(width), style=f"{ERROR} dim")
        return Text("--".center(width), style=DIM)

    def _hash_cell(self, comp: str, mid: str) -> Text:
        report = self.state.reports[mid]
        if comp not in report.components:
            return Text("")
        hv = self.hashes.get(mid)
        if hv is None:
            return Text("·" * SHORT_HASH, style=DIM)
        if hv.failed:
            return Text("failed", style=ERROR)
        short = hv.short.get(comp)
        if short is None:
            return Text("")
        if self.state.nan_counts.get(mid, {}).get(comp):
            return Text(short, style=f"bold {ERROR}")
        group = hv.group.get(comp)
        if group is None:
            return Text(short, style=DIM)
        return Text(short, style=f"bold {GROUP_COLOURS[group % len(GROUP_COLOURS)]}")

    def _metric_cell(self, comp: str, mid: str) -> Text:
        hv = self.hashes.get(mid)
        metric = hv.metric.get(comp) if hv else None
        if not metric:
            return Text("")
        return Text(metric, style="bold #7dcfff" if metric == "0000" else "")

    def consensus_component(self) -> str | None:
        col = self.state.columns.get(self.consensus_selection or "")
        return col.component if col else None

    def consensus_of(self, mid: str) -> float | None:
        entry = (self.comparison or {}).get("components", {}).get(self.consensus_component() or "")
        if not entry or mid not in entry["models"]:
            return None
        return entry["consensus"][entry["models"].index(mid)]

    def _consensus_label(self) -> Text:
        return Text(f"cos\n{self.consensus_component() or ''}", style="italic")

    def _consensus_cell(self, mid: str) -> Text:
        if self.comparison is None:
            return Text("")
        if mid == self.comparison.get("reference"):
            return Text("ref", style=DIM, justify="right")
        value = self.consensus_of(mid)
        if value is None:
            return Text("-", style=DIM, justify="right")
        return Text(f"{value:+.2f}", style=OK if value >= 0.5 else (WARN if value >= 0 else ERROR), justify="right")

    def set_comparison(self, result: dict | None) -> None:
        self.comparison = result
        self.redraw_consensus()

    def toggle_consensus(self) -> None:
        self.show_consensus = not self.show_consensus
        self.rebuild()

    def redraw_consensus(self) -> None:
        """The column follows the comparison and the highlighted selection's component."""
        if not self.show_consensus or ColumnKey(CONSENSUS) not in self.columns:
            return
        self.columns[ColumnKey(CONSENSUS)].label = self._consensus_label()
        for mid in self._visible:
            self.update_cell(mid, CONSENSUS, self._consensus_cell(mid))

    def on_data_table_cell_highlighted(self, event: DataTable.CellHighlighted) -> None:
        """Moving to another selection column changes the component the column shows (the
        event goes on to the library, which follows the row)."""
        name = self.current_selection
        if name is not None and name != self.consensus_selection:
            before = self.consensus_component()
            self.consensus_selection = name
            if self.consensus_component() != before:
                self.redraw_consensus()

    # -- updates -----------------------------------------------------------------------------

    def set_hashes(self, views: dict[str, HashView]) -> None:
        """New hash results (one model finished, or relations recomputed)."""
        self.hashes.update(views)
        for mid in views:
            if mid not in self.rows:
                continue
            self.update_cell(mid, "status", self._status_cell(mid))
            for comp in self.hash_components:
                self.update_cell(mid, HASH + comp, self._hash_cell(comp, mid))
            for comp in self.metric_components:
                self.update_cell(mid, METRIC + comp, self._metric_cell(comp, mid))
            self.update_cell(mid, "sd", self._row_cells(mid)[-1])
            for name in self.state.columns:
                self.update_cell(mid, SEL + name, self._sel_cell(name, mid))

    def redraw_column(self, name: str) -> None:
        self.columns[ColumnKey(SEL + name)].label = self._sel_label(name)
        for mid in self._visible:
            self.update_cell(mid, SEL + name, self._sel_cell(name, mid))

    def redraw_row(self, mid: str) -> None:
        for name in self.state.columns:
            self.columns[ColumnKey(SEL + name)].label = self._sel_label(name)
            if mid in self.rows:
                self.update_cell(mid, SEL + name, self._sel_cell(name, mid))

    def redraw_cell(self, mid: str, name: str) -> None:
        """One tick changed: that cell and its column's total.

        DataTable.update_cell throws away every rendered cell (one counter keys all of its
        caches), so each toggle re-rendered the whole visible table (~60 ms here). This drops
        only the cached renders of the two cells that changed. It leans on DataTable's private
        caches, so any surprise there falls back to update_cell; test_fast_toggle_draws_what_a_
        rebuild_draws compares the screen with a full rebuild."""
        column_key = ColumnKey(SEL + name)
        row_key = RowKey(mid)
        self.columns[column_key].label = self._sel_label(name)
        value = self._sel_cell(name, mid)
        try:
            self._drop_cached_cell(row_key, column_key, value)
        except (AttributeError, KeyError, TypeError, ValueError):
            self.update_cell(mid, SEL + name, value)

    def _drop_cached_cell(self, row_key: RowKey, column_key: ColumnKey, value: Text) -> None:
        count = self._update_count
        row_index = self._row_locations.get(row_key)
        if row_index is None:
            raise KeyError(row_key)
        self._data[row_key][column_key] = value
        for index in (row_index, -1):  # the row, and the header (its total)
            self._row_renderable_cache.discard((count, index))
        header = self._header_row_key
        for key in [k for k in self._cell_render_cache.keys() if k[1] == column_key and k[0] in (row_key, header)]:
            self._cell_render_cache.discard(key)
        self._row_render_cache.clear()
        self._line_cache.clear()
        self.refresh()

    # -- where the cursor is -----------------------------------------------------------------

    @property
    def current_model(self) -> str | None:
        if not self.row_count:
            return None
        return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value

    @property
    def current_column_key(self) -> str | None:
        if not self.row_count or not self.columns:
            return None
        return self.ordered_columns[self.cursor_coordinate.column].key.value

    @property
    def current_selection(self) -> str | None:
        key = self.current_column_key
        return key[len(SEL) :] if key and key.startswith(SEL) else None

    def _cursor_keys(self) -> tuple[str | None, str | None]:
        try:
            return self.current_model, self.current_column_key
        except (CellDoesNotExist, IndexError):  # an empty or half-built table has no cursor cell
            return None, None

    def _restore_cursor(self, keep: tuple[str | None, str | None]) -> None:
        mid, col = keep
        row = self.get_row_index(RowKey(mid)) if mid and RowKey(mid) in self.rows else 0
        column = self.get_column_index(ColumnKey(col)) if col and ColumnKey(col) in self.columns else None
        if column is None:
            first_sel = next(iter(self.state.columns), None)
            column = self.get_column_index(ColumnKey(SEL + first_sel)) if first_sel else 0
        if self.row_count:
            self.cursor_coordinate = Coordinate(min(row, self.row_count - 1), column)

    def _selection_or_refuse(self) -> str | None:
        name = self.current_selection
        if name is None and self.row_count:
            self.notify("Move the cursor to a selection column (te0, te1, unet, ...) first.", severity="warning")
        return name

    # -- actions -----------------------------------------------------------------------------

    def action_toggle_cell(self) -> None:
        name, mid = self._selection_or_refuse(), self.current_model
        if name is None or mid is None:
            return
        self.toggle(name, mid)

    def toggle(self, name: str, mid: str) -> None:
        col = self.state.columns[name]
        reason = self.state.toggle(name, mid)
        if reason:
            self.post_message(self.Refused(mid, name, reason))
            return
        if col.single:
            self.redraw_column(name)
        else:
            self.redraw_cell(mid, name)
        self.post_message(self.Changed())

    def action_toggle_column(self) -> None:
        name = self._selection_or_refuse()
        if name is None:
            return
        refused = self.state.toggle_column(name, list(self._visible))
        self.redraw_column(name)
        self._report_refused(name, refused)
        self.post_message(self.Changed())

    def action_invert_column(self) -> None:
        name = self._selection_or_refuse()
        if name is None:
            return
        refused = self.state.invert(name, list(self._visible))
        self.redraw_column(name)
        self._report_refused(name, refused)
        self.post_message(self.Changed())

    def action_clear_column(self) -> None:
        name = self._selection_or_refuse()
        if name is None:
            return
        self.state.clear(name)
        self.redraw_column(name)
        self.post_message(self.Changed())

    def action_toggle_row(self) -> None:
        """Tick every multi-model selection this model can give; untick all if all were."""
        mid = self.current_model
        if mid is None:
            return
        names = [n for n, c in self.state.columns.items() if not c.single and not self.state.refusal(n, mid)]
        on = not all(self.state.is_ticked(n, mid) for n in names)
        for n in names:
            self.state.set(n, mid, on)
        self.redraw_row(mid)
        if on and len(names) < sum(1 for c in self.state.columns.values() if not c.single):
            skipped = [n for n, c in self.state.columns.items() if not c.single and n not in names]
            self.notify(
                f"{mid}: not ticked in {', '.join(skipped)} ({self.state.refusal(skipped[0], mid)})", severity="warning"
            )
        self.post_message(self.Changed())

    def action_cycle_filter(self) -> None:
        self.filter = FILTERS[(FILTERS.index(self.filter) + 1) % len(FILTERS)]
        self.refilter()
        self.post_message(self.Changed())

    def action_sort_by_column(self) -> None:
        self.sort_by(self.current_column_key)

    def sort_by(self, key: str | None) -> None:
        """Sort by ``key``; again on the same column reverses; a third time restores file order."""
        if key is None:
            return
        if self.sort_column != key:
            self.sort_column, self.sort_reverse = key, False
        elif not self.sort_reverse:
            self.sort_reverse = True
        else:
            self.sort_column, self.sort_reverse = None, False
        self.refilter()
        self.post_message(self.Changed())

    def _report_refused(self, name: str, refused: list[str]) -> None:
        if refused:
            shown = ", ".join(refused[:6]) + (f" and {len(refused) - 6} more" if len(refused) > 6 else "")
            self.notify(
                f"{name}: left out {shown} (their {self.state.columns[name].component} cannot be merged)",
                severity="warning",
            )

    # -- mouse -------------------------------------------------------------------------------

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        event.stop()
        self.sort_by(event.column_key.value)

    def on_data_table_cell_selected(self, event: DataTable.CellSelected) -> None:
        """Enter (or a click on the highlighted cell) toggles like space."""
        event.stop()
        key = event.cell_key.column_key.value or ""
        if key.startswith(SEL):
            self.toggle(key[len(SEL) :], event.cell_key.row_key.value)

    async def _on_click(self, event: events.Click) -> None:
        """A click on any selection cell toggles it at once (DataTable alone wants two clicks);
        other clicks go on to DataTable's handler (cursor, header sort)."""
        meta = event.style.meta
        row, column = meta.get("row"), meta.get("column")
        if row is None or column is None or row < 0 or column < 0 or meta.get("out_of_bounds"):
            return
        key = self.ordered_columns[column].key.value or ""
        if not key.startswith(SEL):
            return
        event.prevent_default()
        event.stop()
        self.cursor_coordinate = Coordinate(row, column)
        self.toggle(key[len(SEL) :], self.ordered_rows[row].key.value)


def _display_name(report: ModelReport) -> str:
    """The file name without what the row already shows: the id prefix and ``.safetensors``."""
    name = report.file_name
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    mid = report.model_id
    if name.startswith(mid) and len(name) > len(mid) + 1 and name[len(mid)] in "-_ .":
        name = name[len(mid) + 1 :]
    return name


def _arch_cell(report: ModelReport) -> Text:
    if report.is_astolfo_output:
        return Text("mix", style=f"italic {OUTPUT}")  # astolfo wrote it: an output, not a model
    if report.kind != CHECKPOINT or not report.arch:
        label = KIND_LABELS.get(report.kind, report.kind[:5])
        return Text(label, style=ERROR if report.severity >= Severity.ERROR else WARN)
    text = Text({"sdxl": "XL", "sd15": "1.5"}.get(report.arch, report.arch))
    if report.scale > 1:
        text.append(f"/{report.scale}", style=DIM)
    return text


def _size(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n}B"
