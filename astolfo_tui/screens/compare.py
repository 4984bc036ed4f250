"""The compare screen: for the component of one selection, the pairwise cosines of the models'
deltas as a heatmap of coloured cells (grid order), the table of models (norm, consensus cosine,
influence, findings) and the findings in words; space ticks or unticks the highlighted model in
that selection (the library's own SelectionState, so the grid follows).

The comparison (``engine.compare.run.compare``) covers every model of the library and every
component in one read, in a worker thread with progress; it is cancelled by ``c`` or by leaving
the screen. A result the library already holds opens at once; otherwise the engine's SQLite
cache answers without reading the files when they were compared before.
"""

from __future__ import annotations

import threading
import time

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Label, ProgressBar, Static
from textual.worker import Worker, WorkerState

from astolfo_tui.widgets.selection_grid import DIM, ERROR, TICK_STYLE, WARN, SelectionGrid
from engine.compare.events import CacheHit, CompareCancelled, CompareError, Progress
from engine.compare.result import describe, model_codes
from engine.compare.run import compare
from engine.recipe.notation import short_id

PROGRESS_EVERY_S = 0.1  # progress redraws at most this often: the worker keeps the GIL otherwise
NO_COSINE = "#3b4261"
COLD = (0x1a, 0x1b, 0x26)  # cosine 0: the background
WARM = (0xf7, 0x76, 0x8e)  # cosine 1
COOL = (0x7a, 0xa2, 0xf7)  # cosine -1


def cosine_colour(c: float | None) -> str:
    """A cell's background: the theme's background at 0, red towards 1, blue towards -1."""
    if c is None:
        return NO_COSINE
    end = WARM if c >= 0 else COOL
    a = min(abs(c), 1.0)
    return "#" + "".join(f"{round(lo + (hi - lo) * a):02x}" for lo, hi in zip(COLD, end))


def heatmap(entry: dict, highlight: str | None = None) -> Text:
    """Rows and columns are the models (grid order); each cell shows the cosine in hundredths
    on its colour (``··`` where a delta is zero and there is no cosine)."""
    models = entry["models"]
    label_w = max([len(m) for m in models] + [2])
    cell = 4 if len(models) <= 24 else 2
    t = Text(no_wrap=True)
    t.append(" " * (label_w + 1))
    for m in models:
        t.append(short_id(m)[-cell + 1 :].rjust(cell - 1) + " " if cell > 2 else "  ",
                 style="bold" if m == highlight else DIM)
    t.append("\n")
    for i, m in enumerate(models):
        t.append(m.ljust(label_w) + " ", style="bold reverse" if m == highlight else "bold")
        for c in entry["cosine"][i]:
            bg = cosine_colour(c)
            fg = "#15161e" if c is not None and c > 0.55 else "#c0caf5"
            if cell == 2:
                text = "  "
            elif c is None:
                text = " ·· "
            else:
                text = f"{round(c * 100):>3d} "
            t.append(text, style=f"{fg} on {bg}")
        t.append("\n")
    t.append("cosine × 100 of the deltas", style=DIM)
    return t


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


class CompareScreen(Screen):
    BINDINGS = [
        Binding("escape", "back", "Back", tooltip="Back to the library (a running comparison is cancelled)"),
        Binding("space", "toggle_model", "Tick", tooltip="Tick or untick the highlighted model in the selection shown"),
        Binding("s", "next_selection", "Selection", tooltip="Show the next selection and its component"),
        Binding("c", "cancel", "Cancel", tooltip="Stop the comparison (nothing is cached)"),
        Binding("ctrl+r", "recompute", "Recompute", tooltip="Read every file again instead of the cached result"),
    ]

    def __init__(self, library, selection: str | None = None) -> None:
        super().__init__()
        self.library = library
        columns = list(library.state.columns)
        self.selection = selection if selection in library.state.columns else (columns[0] if columns else None)
        self.result: dict | None = library.comparison
        self.running = False
        self.cancelled = False
        self.error: str | None = None
        self.from_cache = False
        self._cancel = threading.Event()
        self._started = 0.0
        self._elapsed: float | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="compare-status-bar"):
            yield Label("", id="compare-status")
            yield ProgressBar(id="compare-progress", show_eta=False, show_percentage=True)
        with Horizontal(id="compare-body"):
            with VerticalScroll(id="compare-heat-box"):
                yield Static(id="compare-heat")
            yield DataTable(id="compare-models", cursor_type="row", zebra_stripes=True)
        with VerticalScroll(id="compare-findings-box"):
            yield Static(id="compare-findings")
        yield Footer()

    @property
    def component(self) -> str | None:
        return self.library.state.columns[self.selection].component if self.selection else None

    @property
    def table(self) -> DataTable:
        return self.query_one("#compare-models", DataTable)

    def on_mount(self) -> None:
        self.title = "astolfo · compare"
        self.query_one("#compare-progress").display = False
        self.table.focus()
        if self.result is not None:
            self.from_cache = True
            self._show()
        else:
            self.start()

    def on_unmount(self) -> None:
        self._cancel.set()  # the worker stops at its next chunk; nothing is cached

    # -- running -----------------------------------------------------------------------------

    def start(self, use_cache: bool = True) -> None:
        self._cancel.set()
        self._cancel = threading.Event()
        self.running, self.cancelled, self.error, self.from_cache = True, False, None, False
        self._started, self._elapsed = time.monotonic(), None
        reports = [self.library.state.reports[m] for m in self.library.state.order]
        self._show()
        self.run_compare(reports, self._cancel, use_cache)

    @work(thread=True, exclusive=True, group="compare", exit_on_error=False, name="comparing")
    def run_compare(self, reports, cancel: threading.Event, use_cache: bool) -> dict:
        last = [0.0]

        def on_event(e) -> None:
            if isinstance(e, Progress):
                now = time.monotonic()
                if now - last[0] >= PROGRESS_EVERY_S or e.done >= e.total:
                    last[0] = now
                    self.app.call_from_thread(self._progressed, e)
            elif isinstance(e, CacheHit):
                self.app.call_from_thread(self._cache_hit)

        return compare(reports, cancel=cancel, on_event=on_event, use_cache=use_cache)

    def _progressed(self, e: Progress) -> None:
        if not self.running:
            return
        bar = self.query_one("#compare-progress", ProgressBar)
        bar.display = True
        bar.update(total=max(e.total, 1), progress=e.done)
        self._status(Text.assemble(("comparing ", "bold"), (f"{e.component}: {e.key}", DIM)))

    def _cache_hit(self) -> None:
        self.from_cache = True

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.worker.group != "compare" or event.worker.state not in (WorkerState.SUCCESS, WorkerState.ERROR):
            return
        if event.worker.state == WorkerState.SUCCESS and event.worker.result is not None:
            if self._cancel.is_set():  # replaced by a newer run, or the screen is going
                return
            self.running = False
            self._elapsed = time.monotonic() - self._started
            self.result = event.worker.result
            self.library.set_comparison(self.result)
        elif event.worker.state == WorkerState.ERROR:
            error = event.worker.error
            if isinstance(error, CompareCancelled):
                self.running, self.cancelled = False, True
            elif isinstance(error, CompareError):
                self.running, self.error = False, str(error)
            else:
                self.running = False
                self.app.report_worker_error(event.worker)
        self.query_one("#compare-progress").display = False
        self._show()

    # -- drawing -----------------------------------------------------------------------------

    def _status(self, text: Text) -> None:
        self.query_one("#compare-status", Label).update(text)

    def _status_text(self) -> Text:
        t = Text()
        if self.selection:
            t.append(f"{self.selection}", style="bold #7aa2f7")
            t.append(f" ({self.component})  " if self.component != self.selection else "  ", style=DIM)
        if self.running:
            t.append("comparing…", style="bold")
        elif self.cancelled:
            t.append("cancelled: nothing was cached (ctrl+r runs it again)", style=f"bold {WARN}")
        elif self.error:
            t.append(self.error, style=f"bold {ERROR}")
        elif self.result is not None:
            ref = self.result["reference"]
            t.append("against ", style=DIM)
            t.append(ref or "the mean of the models", style="bold")
            if ref is None:
                t.append(" (mark a base with = in the library for consensus cosines)", style=DIM)
            elif self.from_cache:
                t.append(" · from the cache", style=DIM)
            elif self._elapsed is not None:
                t.append(f" · compared in {self._elapsed:.1f} s", style=DIM)
        return t

    def _entry(self) -> dict | None:
        if self.result is None or self.component is None:
            return None
        return self.result["components"].get(self.component)

    def _show(self) -> None:
        self._status(self._status_text())
        entry = self._entry()
        heat = self.query_one("#compare-heat", Static)
        if entry is None:
            what = "comparing…" if self.running else f"no {self.component} compared" if self.result else ""
            heat.update(Text(what, style=DIM))
        else:
            heat.update(heatmap(entry, self.current_model))
        self._fill_table(entry)
        self.query_one("#compare-findings", Static).update(self._findings_text())

    def _fill_table(self, entry: dict | None) -> None:
        table = self.table
        keep = self.current_model
        table.clear(columns=True)
        for name in ("sel", "model", "norm", "rel. norm", "consensus", "influence", "findings"):
            right = name not in ("sel", "model", "findings")
            table.add_column(Text(name, justify="right") if right else name, key=name)
        if entry is None:
            return
        codes = model_codes(self.result, self.component)
        for i, m in enumerate(entry["models"]):
            table.add_row(
                self._tick_cell(m),
                Text(m, style="bold"),
                Text(_num(entry["norm"][i], ".4g"), justify="right"),
                Text(_num(entry["relative_norm"][i], ".2%"), justify="right"),
                Text(_num(entry["consensus"][i], "+.3f"), justify="right"),
                Text(_num(entry["influence"][i], ".2%"), justify="right"),
                Text(", ".join(codes.get(m, [])), style=WARN if codes.get(m) else ""),
                key=m,
            )
        if keep in entry["models"]:
            table.move_cursor(row=entry["models"].index(keep))

    def _tick_cell(self, mid: str) -> Text:
        state = self.library.state
        if self.selection is None:
            return Text("")
        if state.is_ticked(self.selection, mid):
            return Text(short_id(mid).center(4), style=TICK_STYLE)
        if state.refusal(self.selection, mid):
            return Text("✗".center(4), style=f"{ERROR} dim")
        return Text("--".center(4), style=DIM)

    def _findings_text(self) -> Text:
        t = Text()
        if self.result is None:
            return t
        comp = self.component
        found = [f for f in self.result["findings"] if f["component"] == comp]
        t.append(f"findings in {comp}\n" if found else f"no findings in {comp}\n", style="bold underline")
        for f in found:
            t.append(f"  {f['block'] or 'whole':<6} ", style=DIM)
            t.append(f"{f['code']:<15}", style="bold #7dcfff")
            t.append(describe(f) + "\n")
        for x in self.result["left_out"]:
            if x.get("component") in (None, comp):
                t.append("  left out ", style=WARN)
                t.append(f"{x['id']}: ", style="bold")
                t.append(x["reason"] + "\n")
        t.rstrip()
        return t

    @property
    def current_model(self) -> str | None:
        try:
            table = self.table
        except Exception:
            return None
        if not table.row_count:
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        entry = self._entry()
        if entry is not None:
            self.query_one("#compare-heat", Static).update(heatmap(entry, event.row_key.value))

    # -- actions -----------------------------------------------------------------------------

    def action_back(self) -> None:
        self._cancel.set()
        self.app.pop_screen()

    def action_cancel(self) -> None:
        if self.running:
            self._cancel.set()
            self._status(Text("cancelling…", style=f"bold {WARN}"))

    def action_recompute(self) -> None:
        self.start(use_cache=False)

    def action_next_selection(self) -> None:
        names = list(self.library.state.columns)
        if not names:
            return
        self.selection = names[(names.index(self.selection) + 1) % len(names)] if self.selection in names else names[0]
        self._show()

    def action_toggle_model(self) -> None:
        mid = self.current_model
        if mid is None or self.selection is None:
            return
        self.toggle(mid)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        """Enter toggles like space, as in the library's grid."""
        event.stop()
        self.toggle(event.row_key.value)

    def toggle(self, mid: str) -> None:
        """Tick or untick ``mid`` in the selection shown; the library's grid and totals follow."""
        reason = self.library.state.toggle(self.selection, mid)
        if reason:
            self.notify(f"{mid} cannot go in {self.selection}: {reason}", title="Refused", severity="error")
            return
        grid = self.library.grid
        grid.redraw_column(self.selection)
        grid.post_message(SelectionGrid.Changed())
        if self.library.state.columns[self.selection].single:
            for m in self.table.rows:  # the one VAE source moved: every row's mark changes
                self.table.update_cell(m, "sel", self._tick_cell(m.value))
        else:
            self.table.update_cell(mid, "sel", self._tick_cell(mid))
