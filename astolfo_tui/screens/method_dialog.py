"""The method dialog: how one selection (a grid column) is combined — its merge method, the base
model the deltas are taken from, and every parameter, checked as the user types.

Everything here is read from ``engine.methods.params`` (METHODS, FIELDS, DEFAULTS, PRESETS,
REQUIRED) and checked with its ``problems()``, the same function ``astolfo merge --check`` uses,
so a new preset or field shows up here without a change to the app and the dialog never accepts
what the merge would refuse as a bad value.

Values are typed as TOML would write them (``0.2``, ``true``, ``114514``); a word that is not TOML
(``sum``) is taken as a string, so nobody has to type quotes. An empty field takes the default
shown beside it and is not written into the recipe.
"""

from __future__ import annotations

import tomllib

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.widgets import Button, Footer, Input, Label, Select, Static

from astolfo_tui.screens.dialogs import _FormDialog
from astolfo_tui.selection_state import SelectionState
from astolfo_tui.widgets.selection_grid import DIM, ERROR
from engine.methods.params import DEFAULTS, FIELDS, METHODS, PRESETS, REQUIRED, problems

MEAN = "mean"  # the recipe's default: no [methods] table at all
PARAMS = tuple(f for f in FIELDS if f not in ("method", "base"))  # base has its own chooser


def parse_value(text: str):
    """What a typed value means in the recipe: None when empty, else the TOML value
    (string, boolean, integer, number); anything else is kept as the text typed, which the
    checks then name as a bad value."""
    text = text.strip()
    if not text:
        return None
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    return value if isinstance(value, (str, bool, int, float)) else text


def format_value(value) -> str:
    """A table's value as the user would type it (the inverse of ``parse_value``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def default_text(method: str, name: str) -> str:
    """What an empty field means for ``method``: the preset's value, the global default, or
    that the method requires it."""
    preset = PRESETS.get(method, {})
    if name in preset:
        return f"{format_value(preset[name])} ({method})"
    if name in REQUIRED.get(method, ()):
        return "required"
    if name in DEFAULTS:
        return f"{format_value(DEFAULTS[name])} (default)"
    return "no default"


class MethodDialog(_FormDialog):
    """Dismisses with the selection's new methods table (``{"method": "mean"}`` for the plain
    mean, which removes the table), or None when cancelled."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, state: SelectionState, selection: str) -> None:
        super().__init__(classes="dialog")
        self.state, self.selection = state, selection
        self.fields = dict(state.methods.get(selection, {}))
        self.errors: list[str] = []

    def compose(self) -> ComposeResult:
        col = self.state.columns[self.selection]
        method = str(self.fields.get("method", MEAN))
        methods = list(METHODS) + ([method] if method not in METHODS else [])
        bases = list(self.state.order)
        base = self.fields.get("base")
        if isinstance(base, str) and base not in bases:
            bases.append(base)  # a base the library does not have: shown, and named by the check
        with Vertical(classes="dialog-box wide", id="method-box"):
            yield Label(f"How selection {self.selection} is combined", classes="dialog-title", markup=False)
            yield Label(
                f"{self.state.count(self.selection)} models, each giving its {col.component}; "
                "an empty field takes the default shown",
                classes="dim",
                markup=False,
            )
            with Horizontal(classes="form-row"):
                yield Label("method", classes="form-label")
                yield Select([(m, m) for m in methods], value=method, allow_blank=False, id="method-choice")
                yield Label("base", classes="form-label")
                yield Select(
                    [(Text(f"{m}  {self._file(m)}"), m) for m in bases],
                    value=base if isinstance(base, str) else Select.NULL,
                    prompt="base: none",
                    id="method-base",
                )
            with Grid(id="method-fields"):
                for name in PARAMS:
                    yield Label(name, classes="form-label")
                    given = self.fields.get(name)
                    yield Input(
                        "" if given is None else format_value(given),
                        placeholder=default_text(method, name),
                        id=f"param-{name}",
                        name=name,
                    )
            yield Static(id="method-problems")
            with Horizontal(classes="dialog-buttons"):
                yield Button("OK", variant="primary", id="ok")
                yield Button("Cancel", id="cancel")
        yield Footer()

    def _file(self, model_id: str) -> str:
        report = self.state.reports.get(model_id)
        return report.file_name if report else "(not in the library)"

    def on_mount(self) -> None:
        self.query_one("#method-choice", Select).focus()
        self._check()

    # -- reading and checking ----------------------------------------------------------------

    def method(self) -> str:
        return str(self.query_one("#method-choice", Select).value)

    def read(self) -> dict[str, object]:
        """The table as the dialog now says it (only what the user gave)."""
        method = self.method()
        if method == MEAN:
            return {"method": MEAN}
        fields: dict[str, object] = {"method": method}
        base = self.query_one("#method-base", Select).value
        if base is not Select.NULL:
            fields["base"] = str(base)
        for box in self.query("#method-fields Input").results(Input):
            value = parse_value(box.value)
            if value is not None:
                fields[box.name] = value
        return fields

    @on(Select.Changed)
    @on(Input.Changed)
    def _changed(self) -> None:
        self._check()

    def _check(self) -> None:
        method = self.method()
        mean = method == MEAN
        self.query_one("#method-base", Select).disabled = mean  # the mean takes no parameters
        for box in self.query("#method-fields Input").results(Input):
            box.disabled = mean
            box.placeholder = default_text(method, box.name or "")
        fields = self.read()
        try:
            found = problems(self.selection, fields, {m: None for m in self.state.order}, self.state.weights,
                             self.state.ordered(self.selection))
        except Exception as e:  # a value the checks did not expect: refuse it, never crash
            found = [("bad_method_param", f"methods.{self.selection}: cannot check these values ({e})")]
        self.errors = [message for _, message in found]
        text = Text()
        for message in self.errors:
            text.append("✗ ", style=f"bold {ERROR}")
            text.append(message + "\n")
        if not found:
            text.append("✓ " + (f"the weighted mean (no [methods.{self.selection}] table)" if mean else "valid"),
                        style=DIM)
        text.rstrip()
        self.query_one("#method-problems", Static).update(text)
        self.query_one("#ok", Button).disabled = bool(self.errors)

    def _finish(self) -> None:
        self._check()
        if self.errors:
            self.notify(self.errors[0], title="Not valid yet", severity="error", timeout=6)
            return
        self.dismiss(self.read())
