"""The library: the selection grid over every model in the opened folders, the details of the
highlighted model below it, and a status line with scan/hash progress and the active filters.

Scanning (headers only) runs in a worker at once; hashing follows in another worker and the grid
fills in model by model (cache hits first, at once).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import replace
from pathlib import Path

from rich.text import Text
from textual import events, on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Label, ProgressBar
from textual.worker import Worker, WorkerState

from astolfo_tui import session
from astolfo_tui.screens.dialogs import (
    ColumnDialog,
    ConfirmDialog,
    NotationDialog,
    PathDialog,
    WeightDialog,
)
from astolfo_tui.screens.method_dialog import MethodDialog
from astolfo_tui.screens.outputs import OutputsDialog
from astolfo_tui.selection_state import SelectionState
from astolfo_tui.widgets.details import DetailsPane
from astolfo_tui.widgets.selection_grid import DIM, ERROR, OK, WARN, SelectionGrid
from engine.library.outputs import default_output_dir
from engine.library.scan import scan
from engine.recipe.notation import format_legend, format_notation
from engine.recipe.toml_file import load_recipe, parse_recipe, recipe_to_toml, save_recipe

# While a big folder is scanned: the rows read so far are shown once, after 0.25 s (a first
# screenful), then only a count every 0.5 s until the end. Redrawing the grid more often took the
# GIL from the scan: every 0.15 s made a 200-file open ~50% slower overall.
STREAM_FIRST_S = 0.25
STREAM_EVERY_S = 0.5


class LibraryScreen(Screen):
    BINDINGS = [
        Binding("slash", "search", "Search", tooltip="Filter rows by words in id, file name or architecture"),
        Binding("escape", "clear_filters", "Clear filters", show=False, tooltip="Show every model again"),
        Binding(
            "a", "add_column", "Add sel.", show=False, tooltip="Add a selection column (e.g. a second UNet variant)"
        ),
        Binding(
            "e", "rename_column", "Rename sel.", show=False, tooltip="Rename the selection column under the cursor"
        ),
        Binding(
            "x", "remove_column", "Remove sel.", show=False, tooltip="Remove the selection column under the cursor"
        ),
        Binding(
            "u", "edit_outputs", "Outputs", tooltip="Name the mix; choose output files, their sources, dtype and device"
        ),
        Binding("ctrl+s", "save_recipe", "Save", tooltip="Save the recipe TOML"),
        Binding("ctrl+o", "load_recipe", "Load", show=False, tooltip="Load a recipe TOML"),
        Binding(
            "y",
            "copy_notation",
            "Copy notation",
            show=False,
            tooltip="Copy the selections in the article's notation (OSC 52: works over SSH)",
        ),
        Binding(
            "w",
            "show_notation",
            "Notation",
            tooltip="Show the selections in the article's notation; save them to a file",
        ),
        Binding("m", "merge", "Merge", tooltip="Check the recipe and open the merge dashboard"),
        Binding(
            "t",
            "edit_method",
            "Method",
            tooltip="How the selection under the cursor is combined: method, base, parameters",
        ),
        Binding(
            "W", "edit_weight", "Weight", show=False, key_display="shift+w",
            tooltip="The highlighted model's weight, in every selection",
        ),
        Binding(
            "v",
            "compare",
            "Compare",
            tooltip="Compare the models (cosines, clones, mixes, outliers) for the highlighted selection's component",
        ),
        Binding(
            "V",
            "toggle_consensus",
            "Consensus column",
            show=False,
            key_display="shift+v",
            tooltip="Show or hide each model's consensus cosine (from the last comparison) in the grid",
        ),
        Binding(
            "equals_sign",
            "mark_reference",
            "Mark =sd",
            show=False,
            key_display="=",
            tooltip="Mark (or unmark) the highlighted model as a reference: models with its text encoders get =sd",
        ),
        Binding("d", "toggle_details", "Details", show=False, tooltip="Show or hide the details pane"),
        Binding("ctrl+r", "rescan", "Rescan", show=False, tooltip="Scan the folders again"),
        Binding(
            "ctrl+n",
            "open_folder",
            "Open folder",
            show=False,
            tooltip="Open another folder of models (with path completion)",
        ),
    ]

    def __init__(self, paths: list[Path], recipe: Path | None = None) -> None:
        super().__init__()
        self.paths = [Path(p) for p in paths]
        self.session_folders = list(self.paths)  # the session note is per folder set as opened
        self.initial_recipe = recipe  # opened after the scan when there is no earlier session
        from astolfo_tui.config import configured_output_dir

        self.output_dir = default_output_dir(self.paths, configured_output_dir())
        self.state = SelectionState([], base_dir=_base_dir(self.paths), output_dir=self.output_dir)
        self.recipe_path: Path | None = None
        self.recipe_text: str | None = None  # the recipe file's text as loaded or last saved
        self._restored = False
        self._waiting_for_rows = True
        self._typed_ahead: list = []
        self._remember_timer = None
        self._remembered: str | None = None
        self.file_hashes: dict[str, object] = {}
        self._hash_cancel = threading.Event()
        self._hash_progress = (0, 0)  # files done, files total
        self._hash_rate = ""
        self._pending_recipe: Path | None = None
        self.scan_complete = False
        self._hash_finished = False
        self._hash_worker = None
        self._details_for: str | None = None
        self._details_timer = None
        self.comparison: dict | None = None  # the last compare result over these models

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="status-bar"):
            yield Label("", id="status")
            yield ProgressBar(id="hash-progress", show_eta=False, show_percentage=True)
        yield Input(placeholder="search: words in id, file name, arch  (enter: back to grid, esc: clear)", id="search")
        yield SelectionGrid(self.state, id="grid")
        yield DetailsPane(id="details")
        yield Footer()

    async def _on_key(self, event: events.Key) -> None:
        """Until the first rows are shown (the app draws before the scan has anything), keys
        wait here, whether the grid has focus yet or not; they act on the rows once those are
        there. Quitting does not wait."""
        if self._waiting_for_rows and event.key not in ("q", "ctrl+q", "ctrl+c"):
            self._typed_ahead.append(events.Key(event.key, event.character))
            event.prevent_default()
            event.stop()
            return
        await super()._on_key(event)

    def _rows_shown(self) -> None:
        """Replay the keys typed ahead, in order."""
        if not self._waiting_for_rows:
            return
        self._waiting_for_rows = False
        queued, self._typed_ahead = self._typed_ahead, []
        driver = self.app._driver
        for key in queued:  # as the terminal delivers keys, so bindings and inputs see them as typed
            key.set_sender(self.app)
            if driver is not None:
                driver.send_message(key)

    def on_mount(self) -> None:
        self.title = "astolfo"
        self.sub_title = " ".join(str(p) for p in self.paths) or "no folder"
        self.query_one("#hash-progress").display = False
        self.query_one("#search").display = False
        self.grid.rebuild(self.state)  # the skeleton (headers) at once, rows as the scan finds them
        self.grid.focus()
        self.start_scan()

    def on_unmount(self) -> None:
        self._hash_cancel.set()  # the hashing thread stops at its next chunk
        self.remember_now()

    @property
    def grid(self) -> SelectionGrid:
        return self.query_one(SelectionGrid)

    # -- scanning and hashing ----------------------------------------------------------------

    @property
    def hashing_complete(self) -> bool:
        return self.scan_complete and self._hash_finished

    def start_scan(self) -> None:
        self.set_comparison(None)  # its ids and numbers are the old scan's
        self.scan_complete = False
        self._hash_finished = False
        self._hash_progress = (0, 0)
        self._hash_cancel.set()
        self._hash_cancel = threading.Event()
        self._set_status(Text("scanning headers…", style=DIM))
        self.run_scan()

    @work(thread=True, exclusive=True, group="scan", exit_on_error=False, name="scanning")
    def run_scan(self):
        """Headers only. Rows appear in batches while a big folder is read, so the first
        screenful shows long before the last file is inspected."""
        start = time.perf_counter()
        so_far: list = []
        due = [start + STREAM_FIRST_S, True]  # next time to report, and whether rows go too

        def on_report(report) -> None:
            so_far.append(report)
            now = time.perf_counter()
            if now < due[0]:
                return
            if due[1]:
                self.app.call_from_thread(self._scanned, list(so_far), False)
            else:
                self.app.call_from_thread(self._scan_count, len(so_far))
            due[:] = [now + STREAM_EVERY_S, False]

        reports = scan(self.paths, on_report=on_report)
        return reports

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR:
            self.app.report_worker_error(event.worker)
            return
        if event.worker.group == "scan" and event.state == WorkerState.SUCCESS:
            self._scanned(event.worker.result, True)
        elif event.worker is self._hash_worker and event.state == WorkerState.SUCCESS:
            self._hash_finished = True
            self.query_one("#hash-progress").display = False
            self._refresh_status()

    def _scan_count(self, n: int) -> None:
        self._set_status(Text(f"scanning headers… {n} models so far", style=DIM))

    def _scanned(self, reports, final: bool) -> None:
        """Show ``reports`` (all of them when ``final``; the ones read so far otherwise),
        keeping whatever was ticked on models that are still there."""
        self.state = self.state.rebased(reports)
        self.file_hashes = {}
        self.grid.hashes = {}
        self.grid.rebuild(self.state)
        self._refresh_status()
        self._show_details()
        if not final:
            self._set_status(Text(f"scanning headers… {len(reports)} models so far", style=DIM))
            if len(reports) >= max(self.grid.size.height, 20):  # a screenful: keys may act on it
                self._rows_shown()
            return
        self.scan_complete = True
        if self._pending_recipe is not None:
            path, self._pending_recipe = self._pending_recipe, None
            self._apply_recipe_file(path)
        if not self._restored:
            self._restored = True
            self._restore()
        self._rows_shown()
        self._hash_worker = self.run_hashing(list(reports), self._hash_cancel)

    @work(thread=True, exclusive=True, group="hash", exit_on_error=False, name="hashing")
    def run_hashing(self, reports, cancel: threading.Event) -> None:
        from astolfo_tui import hash_feed  # torch comes with it: loaded here, not before the first frame
        from engine.library.outputs import busy_outputs

        busy = busy_outputs()  # a job started since the scan may be writing one of these now
        reports = [r for r in reports if os.path.realpath(r.path) not in busy]
        hash_feed.feed(
            reports,
            # results of a scan that was replaced (rescan, another folder) are dropped
            on_result=lambda results: None if cancel.is_set() else self.app.call_from_thread(self._hashed, results),
            on_progress=lambda progress: self.app.call_from_thread(self._hash_progressed, progress),
            cancel=cancel,
        )

    def _hashed(self, results) -> None:
        self.file_hashes.update(results.hashes)
        for mid, fh in results.hashes.items():
            if mid in self.state.reports:
                self.state.sha256[mid] = fh.sha256
                self.state.nan_counts[mid] = {c: h.nan_count + h.inf_count for c, h in fh.components.items()}
        self.grid.set_hashes({m: v for m, v in results.views.items() if m in self.state.reports})
        if results.failed:
            for mid, reason in results.failed.items():
                self.notify(f"{mid}: hashing failed: {reason}", severity="error", timeout=8)
        self._show_details()
        self._refresh_status()

    def _hash_progressed(self, p) -> None:
        self._hash_progress = (p.files_done, p.files_total)
        self._hash_rate = p.rate or self._hash_rate
        bar = self.query_one("#hash-progress", ProgressBar)
        bar.display = p.files_done < p.files_total
        bar.update(total=max(p.bytes_total, 1), progress=p.bytes_done)
        self._refresh_status()

    # -- status line -------------------------------------------------------------------------

    def _set_status(self, text: Text) -> None:
        # one line of fixed size: no layout pass (a layout on every key press costs ~50 ms)
        self.query_one("#status", Label).update(text, layout=False)

    def _refresh_status(self) -> None:
        s = self.state
        t = Text()
        t.append(f"{len(s.order)} models", style="bold")
        problems = sum(1 for m in s.order if s.problems_in(m))
        if problems:
            t.append(f" · {problems} with problems", style=WARN)
        done, total = self._hash_progress
        if self.hashing_complete:
            t.append(" · hashed", style=DIM)
        elif total:
            t.append(f" · hashing {done}/{total} {self._hash_rate}", style="#7aa2f7")
        vae = s.ordered("vae") if "vae" in s.columns else []
        duplicates = s.duplicates(self.file_hashes)
        if duplicates:
            t.append(
                f" · ⚠ {len(duplicates)} selection(s) average one component twice (m shows which)", style=f"bold {WARN}"
            )
        t.append("   ")
        for name, col in s.columns.items():
            if col.single:
                t.append(f"{name}:{vae[0] if vae else '—'} ", style=OK if vae else ERROR)
            else:
                t.append(f"{name}={s.count(name)} ", style=OK if s.count(name) else DIM)
        if self.grid.filter != "all":
            t.append(f"  filter: {self.grid.filter}", style=f"bold {WARN}")
        if self.grid.search:
            t.append(f"  search: {self.grid.search!r}", style=f"bold {WARN}")
        if self.grid.sort_column:
            arrow = " ↓" if self.grid.sort_reverse else " ↑"
            t.append(f"  sorted by {self.grid.column_title(self.grid.sort_column)}{arrow}", style=DIM)
        if self.recipe_path:
            t.append(f"  recipe: {self.recipe_path.name}", style=DIM)
        self._set_status(t)
        self._remember_soon()

    # -- what survives a restart -------------------------------------------------------------

    def _restore(self) -> None:
        """After the first scan: the picks of the last session on these folders, else the
        recipe the app was opened with (the demo's), else nothing."""
        note = session.load_session(self.session_folders)
        if note is not None:
            try:
                recipe = parse_recipe(note.recipe_toml, note.base_dir, source="the last session")
            except Exception:
                recipe = None
            if recipe is not None:
                self.state.apply_recipe(recipe)
                self.recipe_path, self.recipe_text = note.recipe_path, note.recipe_text
                self.grid.rebuild(self.state)
                self._refresh_status()
                self._show_details()
                return
        if self.initial_recipe is not None and self.initial_recipe.exists():
            self._apply_recipe_file(self.initial_recipe)

    def _session_note(self) -> session.Session:
        recipe = self.state.to_recipe()
        recipe.outputs = [replace(o, path=Path(os.path.abspath(recipe.output_path(o)))) for o in recipe.outputs]
        return session.Session(recipe_to_toml(recipe), self.state.base_dir, self.recipe_path, self.recipe_text)

    def _remember_soon(self) -> None:
        if self._restored and self._remember_timer is None and self.is_mounted:
            self._remember_timer = self.set_timer(0.5, self.remember_now)

    def remember_now(self) -> None:
        """Write the session note when it changed (picks, outputs, the recipe file)."""
        self._remember_timer = None
        if not self._restored:
            return  # never overwrite the last session before it has been read back
        try:
            note = self._session_note()
        except Exception:
            return
        key = repr((note.recipe_toml, note.recipe_path, note.recipe_text))
        if key != self._remembered:
            session.save_session(self.session_folders, note)
            self._remembered = key

    # -- grid events -------------------------------------------------------------------------

    @on(SelectionGrid.Changed)
    def _picks_changed(self) -> None:
        self._refresh_status()

    @on(SelectionGrid.Refused)
    def _refused(self, event: SelectionGrid.Refused) -> None:
        self.notify(
            f"{event.model_id} cannot go in {event.column}: {event.reason}",
            title="Refused",
            severity="error",
            timeout=6,
        )

    @on(SelectionGrid.CellHighlighted)
    def _highlighted(self, event: SelectionGrid.CellHighlighted) -> None:
        """Follow the cursor to another row, coalescing a held arrow key into one redraw."""
        mid = event.cell_key.row_key.value
        if mid == self._details_for:
            return
        self._details_for = mid
        if self._details_timer is not None:
            self._details_timer.stop()
        self._details_timer = self.set_timer(0.04, self._show_details)

    def _show_details(self) -> None:
        self._details_timer = None
        mid = self.grid.current_model
        self._details_for = mid
        report = self.state.reports.get(mid) if mid else None
        self.query_one(DetailsPane).show(
            report, self.file_hashes.get(mid) if mid else None, self.comparison,
            weight=self.state.weight(mid) if mid else 1.0,
        )

    def action_mark_reference(self) -> None:
        mid = self.grid.current_model
        fh = self.file_hashes.get(mid) if mid else None
        if fh is None:
            self.notify("This model has no hashes yet (wait for hashing to reach it).", severity="warning")
            return
        self.mark_reference(mid, fh.sha256, self.state.reports[mid].file_name)

    @work(thread=True, group="reference", exit_on_error=False, name="marking the reference")
    def mark_reference(self, mid: str, sha256: str, label: str) -> None:
        from astolfo_tui import hash_feed

        marked, views = hash_feed.toggle_reference(sha256, label, dict(self.file_hashes))
        self.app.call_from_thread(self._references_changed, mid, marked, views)

    def _references_changed(self, mid: str, marked: bool, views) -> None:
        self.set_comparison(None)  # it was against another reference
        self.grid.set_hashes({m: v for m, v in views.items() if m in self.state.reports})
        self.notify(f"{mid} is {'now' if marked else 'no longer'} a reference for =sd.")

    # -- search and filters ------------------------------------------------------------------

    def action_open_folder(self) -> None:
        def done(path: str | None) -> None:
            if not path:
                return
            folder = Path(path).expanduser()
            if not folder.exists():
                self.notify(f"No such folder: {folder}", severity="error")
                return
            self.app.open_folders([folder])

        start = str(self.paths[0].parent) + "/" if self.paths else str(Path.cwd()) + "/"
        self.app.push_screen(PathDialog("Open a folder of models", start, "Open", folders_only=True), done)

    def reopen(self, paths: list[Path]) -> None:
        """The library on other folders: their own picks (session) come back after the scan."""
        from astolfo_tui.config import configured_output_dir

        self.remember_now()
        self._hash_cancel.set()
        self.paths = [Path(p) for p in paths]
        self.session_folders = list(self.paths)
        self.initial_recipe = None
        self.output_dir = default_output_dir(self.paths, configured_output_dir())
        self.state = SelectionState([], base_dir=_base_dir(self.paths), output_dir=self.output_dir)
        self.recipe_path = self.recipe_text = None
        self.file_hashes = {}
        self._restored = False
        self._remembered = None
        self._hash_worker = None
        self.sub_title = " ".join(str(p) for p in self.paths)
        self.grid.hashes = {}
        self.grid.rebuild(self.state)
        self.start_scan()

    def action_search(self) -> None:
        if not self.state.order:
            self.notify("No models here to search; ctrl+n opens another folder.", severity="warning")
            return
        box = self.query_one("#search", Input)
        box.display = True
        box.focus()

    @on(Input.Changed, "#search")
    def _search_changed(self, event: Input.Changed) -> None:
        self.grid.search = event.value.strip()
        self.grid.refilter()
        self._refresh_status()

    @on(Input.Submitted, "#search")
    def _search_done(self) -> None:
        self.grid.focus()

    def action_clear_filters(self) -> None:
        box = self.query_one("#search", Input)
        box.value = ""
        box.display = False
        self.grid.search = ""
        self.grid.filter = "all"
        self.grid.refilter()
        self.grid.focus()
        self._refresh_status()

    def action_toggle_details(self) -> None:
        pane = self.query_one(DetailsPane)
        pane.display = not pane.display

    def action_rescan(self) -> None:
        self.start_scan()

    # -- selection columns -------------------------------------------------------------------

    def action_add_column(self) -> None:
        def done(result) -> None:
            if result:
                name, component = result
                try:
                    self.state.add_column(name, component)
                except ValueError as e:
                    self.notify(str(e), severity="error")
                    return
                self.grid.rebuild()
                self._refresh_status()

        self.app.push_screen(ColumnDialog("Add a selection", "", "unet"), done)

    def action_rename_column(self) -> None:
        old = self.grid.current_selection
        if old is None:
            self.notify("Move the cursor to a selection column to rename it.", severity="warning")
            return

        def done(result) -> None:
            if result and result[0] != old:
                try:
                    self.state.rename_column(old, result[0])
                except ValueError as e:
                    self.notify(str(e), severity="error")
                    return
                self.grid.rebuild()
                self._refresh_status()

        self.app.push_screen(
            ColumnDialog(f"Rename selection {old}", old, self.state.columns[old].component, rename=True), done
        )

    def action_remove_column(self) -> None:
        name = self.grid.current_selection
        if name is None:
            self.notify("Move the cursor to a selection column to remove it.", severity="warning")
            return

        def done(yes: bool | None) -> None:
            if yes:
                self.state.remove_column(name)
                self.grid.rebuild()
                self._refresh_status()

        count = self.state.count(name)
        self.app.push_screen(ConfirmDialog(f"Remove selection {name!r} ({count} ticked)?", "Remove"), done)

    def action_edit_outputs(self) -> None:
        def done(changed: bool | None) -> None:
            if changed:
                self._refresh_status()

        self.app.push_screen(OutputsDialog(self.state), done)

    # -- methods and weights -----------------------------------------------------------------

    def action_edit_method(self) -> None:
        name = self.grid.current_selection
        if name is None:
            self.notify("Move the cursor to a selection column to choose its method.", severity="warning")
            return

        def done(fields) -> None:
            if fields is not None and name in self.state.columns:
                self.state.set_method(name, fields)
                self.grid.rebuild()  # the header names the method, and may need a wider column
                self._refresh_status()

        self.app.push_screen(MethodDialog(self.state, name), done)

    def action_edit_weight(self) -> None:
        mid = self.grid.current_model
        if mid is None:
            return

        def done(weight: float | None) -> None:
            if weight is not None and mid in self.state.reports:
                self.state.set_weight(mid, weight)
                self._show_details()
                self._refresh_status()

        self.app.push_screen(WeightDialog(mid, self.state.weight(mid)), done)

    # -- recipes and notation ----------------------------------------------------------------

    def default_recipe_path(self) -> Path:
        return self.recipe_path or (self.state.base_dir / f"{self.state.name}.recipe.toml")

    def recipe_to_offer(self) -> Path:
        """For loading: the current recipe, else one lying in the folder (the demo ships one)."""
        if self.recipe_path:
            return self.recipe_path
        found = sorted(self.state.base_dir.glob("*recipe*.toml"))
        return found[0] if found else self.default_recipe_path()

    def action_save_recipe(self) -> None:
        def done(path: str | None) -> None:
            if path:
                self.save_recipe_to(Path(path).expanduser())

        self.app.push_screen(PathDialog("Save recipe to", str(self.default_recipe_path()), "Save"), done)

    def save_recipe_to(self, path: Path, confirmed: bool = False) -> bool:
        """Save the picks to ``path``. Over the recipe that was loaded, the file is edited in
        place (its comments, layout and relative paths kept). Overwriting a file that changed on
        disk since it was loaded, or another existing file, asks first (returns False then; the
        save happens when the user says yes)."""
        path = Path(path)
        current = _read_text(path)
        same_file = self.recipe_path is not None and _same_path(path, self.recipe_path)
        if current is not None and not confirmed:
            if same_file and self.recipe_text is not None and current != self.recipe_text:
                question = f"{path.name} changed on disk since it was loaded. Overwrite it with the app's picks?"
            elif not same_file:
                question = f"{path} exists. Replace it with the app's picks?"
            else:
                question = None
            if question:

                def done(yes: bool | None) -> None:
                    if yes:
                        self.save_recipe_to(path, confirmed=True)

                self.app.push_screen(ConfirmDialog(question, "Overwrite", "Keep the file"), done)
                return False
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_recipe(self.state.to_recipe(), path, original=current if same_file or confirmed else None)
            written = path.read_text("utf-8")
        except Exception as e:  # RecipeError and OSError both carry a message naming the file
            self.notify(f"Could not save {path}: {e}", severity="error", timeout=8)
            return False
        self.recipe_path, self.recipe_text = path, written
        self.notify(f"Saved {path}")
        self._refresh_status()
        return True

    def action_load_recipe(self) -> None:
        def done(path: str | None) -> None:
            if path:
                self.load_recipe_from(Path(path).expanduser())

        self.app.push_screen(PathDialog("Load recipe from", str(self.recipe_to_offer()), "Load"), done)

    def load_recipe_from(self, path: Path) -> None:
        """Apply a recipe; models it names outside the opened folders are added and scanned."""
        try:
            recipe = load_recipe(path)
        except Exception as e:
            self.notify(f"Could not load {path}: {e}", severity="error", timeout=8)
            return
        known = {r.path.resolve() for r in self.state.reports.values()}
        outside = [
            e.path for e in recipe.models.values() if Path(e.path).resolve() not in known and Path(e.path).exists()
        ]
        if outside:
            self.paths.extend(outside)
            self._pending_recipe = path
            self.start_scan()
            return
        self._apply_recipe_file(path, recipe)

    def _apply_recipe_file(self, path: Path, recipe=None) -> None:
        try:
            recipe = recipe or load_recipe(path)
        except Exception as e:
            self.notify(f"Could not load {path}: {e}", severity="error", timeout=8)
            return
        missing = self.state.apply_recipe(recipe)
        self.recipe_path, self.recipe_text = path, _read_text(path)
        self.grid.rebuild(self.state)
        self._refresh_status()
        self._show_details()
        if missing:
            self.notify("\n".join(missing), title=f"Loaded {path.name}, but", severity="warning", timeout=10)
        else:
            self.notify(f"Loaded {path}")

    def notation(self) -> str:
        """Every selection in the article's notation, plus its ``=sd`` line once hashes say
        which models carry SDXL base's text encoders."""
        lines = self.state.selections()
        same = [m for m in self.state.order if (v := self.grid.hashes.get(m)) and v.same_as_reference]
        if same:
            lines["=sd"] = same
        bases = {f.get("base") for f in self.state.methods.values()}
        ticked = [m for m in self.state.order if self.state.selected_anywhere(m) or m in bases]
        legend = [
            (m, self.state.reports[m].file_name, getattr(self.file_hashes.get(m), "autov2", None)) for m in ticked
        ]
        return format_notation(self.state.order, lines, self.state.methods) + format_legend(legend)

    def action_copy_notation(self) -> None:
        self.app.copy_to_clipboard(self.notation())
        self.notify("Selections copied in the article's notation (OSC 52).")

    def action_show_notation(self) -> None:
        default = self.default_recipe_path().with_suffix("").with_suffix(".notation.txt")
        self.app.push_screen(NotationDialog(self.notation(), default))

    # -- merging -----------------------------------------------------------------------------

    def action_merge(self) -> None:
        from astolfo_tui.screens.merge import MergeScreen

        self.app.push_screen(MergeScreen(library=self))

    # -- comparing ---------------------------------------------------------------------------

    def action_compare(self) -> None:
        from astolfo_tui.screens.compare import CompareScreen  # the engine's compare loads with it

        if not self.scan_complete:
            self.notify("Wait for the scan to finish, then compare.", severity="warning")
            return
        self.app.push_screen(CompareScreen(self, self.grid.current_selection or self.grid.consensus_selection))

    def set_comparison(self, result: dict | None) -> None:
        """A comparison finished (or was dropped): the grid's column and the details follow."""
        self.comparison = result
        self.grid.set_comparison(result)
        if self.is_mounted:
            self._show_details()

    def action_toggle_consensus(self) -> None:
        self.grid.toggle_consensus()
        if self.comparison is None and self.grid.show_consensus:
            self.notify("No comparison yet: press v to compare, then the column fills in.", severity="warning")


def _read_text(path: Path) -> str | None:
    try:
        return Path(path).read_text("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _same_path(a: Path, b: Path) -> bool:
    return os.path.abspath(Path(a).expanduser()) == os.path.abspath(Path(b).expanduser())


def _base_dir(paths: list[Path]) -> Path:
    for p in paths:
        p = Path(p).expanduser()
        return (p if p.is_dir() else p.parent).resolve()
    return Path.cwd()
