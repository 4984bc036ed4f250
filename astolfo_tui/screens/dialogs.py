"""Small modal dialogs: confirm, ask for a path (with completion), name a selection column, show
the notation. Each has its own footer, so its keys show instead of the screen's below it."""

from __future__ import annotations

from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.suggester import Suggester
from textual.widgets import Button, Footer, Input, Label, Select, Static

from astolfo_tui.selection_state import COMPONENT_IDS


class ConfirmDialog(ModalScreen[bool]):
    BINDINGS = [Binding("escape", "dismiss(False)", "Cancel"), Binding("y", "dismiss(True)", "Yes", show=False)]

    def __init__(self, question: str, yes: str = "Yes", no: str = "No", danger: bool = True) -> None:
        super().__init__(classes="dialog")
        self.question, self.yes, self.no, self.danger = question, yes, no, danger

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog-box"):
            yield Label(self.question, classes="dialog-title", markup=False)
            with Horizontal(classes="dialog-buttons"):
                yield Button(self.yes, variant="error" if self.danger else "primary", id="yes")
                yield Button(self.no, id="no")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class _FormDialog(ModalScreen):
    """A dialog with inputs, OK and Cancel: Enter or OK calls the subclass's ``_finish``,
    Cancel or Escape dismisses with None."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    @on(Input.Submitted)
    def _submitted(self) -> None:
        self._finish()

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "ok":
            self._finish()
        else:
            self.dismiss(None)


class PathSuggester(Suggester):
    """Completes the last part of a path from what is on disk (folders get a trailing ``/``);
    the right arrow accepts it, as in any Textual input. ``folders_only`` for a folder."""

    def __init__(self, folders_only: bool = False) -> None:
        super().__init__(use_cache=False, case_sensitive=True)
        self.folders_only = folders_only

    async def get_suggestion(self, value: str) -> str | None:
        return complete_path(value, self.folders_only)


def complete_path(value: str, folders_only: bool = False) -> str | None:
    """``value`` completed to the first entry on disk it is the beginning of, or None."""
    if not value:
        return None
    typed = Path(value).expanduser()
    folder, start = (typed, "") if value.endswith("/") else (typed.parent, typed.name)
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir()
                       if p.name.startswith(start) and not p.name.startswith(".") and (p.is_dir() or not folders_only))
    except OSError:
        return None
    if not names or names[0] == start:
        return None
    return value + names[0][len(start):]


class PathDialog(_FormDialog):
    """Ask for a file path (save/load recipe, export notation, open a folder), completing it from
    the disk; dismisses with str | None."""

    def __init__(self, title: str, default: str, ok: str = "OK", folders_only: bool = False) -> None:
        super().__init__(classes="dialog")
        self.title_text, self.default, self.ok, self.folders_only = title, default, ok, folders_only

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog-box wide"):
            yield Label(self.title_text, classes="dialog-title", markup=False)
            yield Input(self.default, id="path", suggester=PathSuggester(self.folders_only))
            yield Label("→ completes the path", classes="dim")
            with Horizontal(classes="dialog-buttons"):
                yield Button(self.ok, variant="primary", id="ok")
                yield Button("Cancel", id="cancel")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    def _finish(self) -> None:
        value = self.query_one(Input).value.strip()
        self.dismiss(value or None)


class ColumnDialog(_FormDialog):
    """Name a selection column and choose the component its ticks take; dismisses with
    (name, component) | None."""

    def __init__(self, title: str, name: str, component: str, rename: bool = False) -> None:
        super().__init__(classes="dialog")
        self.title_text, self.name_value, self.component, self.rename = title, name, component, rename

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog-box"):
            yield Label(self.title_text, classes="dialog-title", markup=False)
            yield Input(self.name_value, placeholder="name, e.g. unet2", id="name")
            if not self.rename:
                yield Label("takes each model's", classes="dim")
                yield Select([(c, c) for c in COMPONENT_IDS], value=self.component, allow_blank=False, id="component")
            with Horizontal(classes="dialog-buttons"):
                yield Button("OK", variant="primary", id="ok")
                yield Button("Cancel", id="cancel")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#name", Input).focus()

    def _finish(self) -> None:
        name = self.query_one("#name", Input).value.strip()
        if not name or not all(ch.isalnum() or ch in "_-" for ch in name):
            self.notify("A selection name is letters, digits, _ and - only.", severity="error")
            return
        component = self.component if self.rename else str(self.query_one("#component", Select).value)
        self.dismiss((name, component))


class NotationDialog(ModalScreen[None]):
    """The selections in the article's notation, with copy (OSC 52) and save-to-file."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Close"), Binding("y", "copy", "Copy")]

    def __init__(self, text: str, default_path: Path) -> None:
        super().__init__(classes="dialog")
        self.text, self.default_path = text, default_path

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog-box wide"):
            yield Label("Selections in the article's notation", classes="dialog-title")
            yield Static(self.text.rstrip("\n") or "(no selections)", id="notation-text", markup=False)
            yield Input(str(self.default_path), id="path")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Copy", variant="primary", id="copy")
                yield Button("Save to file", id="save")
                yield Button("Close", id="close")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#copy", Button).focus()

    def action_copy(self) -> None:
        self.app.copy_to_clipboard(self.text)
        self.notify("Copied (OSC 52).")

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "copy":
            self.action_copy()
        elif event.button.id == "save":
            path = Path(self.query_one("#path", Input).value.strip()).expanduser()
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(self.text, "utf-8")
            except OSError as e:
                self.notify(f"Could not write {path}: {e.strerror or e}", severity="error")
                return
            self.notify(f"Saved {path}")
        else:
            self.dismiss(None)


class WeightDialog(_FormDialog):
    """A model's weight in every selection ([weights]: a positive number, 1 when empty);
    dismisses with the weight, 1.0 for the default, or None when cancelled."""

    def __init__(self, model_id: str, weight: float) -> None:
        super().__init__(classes="dialog")
        self.model_id, self.weight = model_id, weight

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog-box"):
            yield Label(f"Weight of {self.model_id}", classes="dialog-title", markup=False)
            yield Input("" if self.weight == 1.0 else repr(self.weight), placeholder="1 (default)", id="weight")
            yield Label("multiplies its delta (methods) or its share of the mean, in every selection", classes="dim")
            with Horizontal(classes="dialog-buttons"):
                yield Button("OK", variant="primary", id="ok")
                yield Button("Cancel", id="cancel")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#weight", Input).focus()

    def _finish(self) -> None:
        text = self.query_one("#weight", Input).value.strip()
        try:
            weight = float(text) if text else 1.0
        except ValueError:
            weight = float("nan")
        if not (weight > 0 and weight != float("inf")):  # NaN fails the first test
            self.notify(f"weights.{self.model_id} = {text!r}: weights must be positive numbers", severity="error")
            return
        self.dismiss(weight)
