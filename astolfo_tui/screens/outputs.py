"""The recipe editor: the mix's name, storage dtype and device, and the output files (path and,
per component, which selection feeds it). Changes go into the SelectionState on Apply."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Input, Label, Select

from astolfo_tui.selection_state import SelectionState
from engine.checkpoint.architectures import architectures, get_architecture
from engine.recipe.model import OutputSpec

DTYPES = ("fp16", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda")


class OutputRow(Vertical):
    """One output: its path (the whole width: paths are long) and, below it, a source selection
    per component (named with its merge method when it is not the mean: ``unet ← nsfw (dare)``)."""

    def __init__(self, spec: OutputSpec, components: tuple[str, ...], choices: dict[str, list[str]],
                 methods: dict[str, str] | None = None) -> None:
        super().__init__(classes="output-row")
        self.spec, self.components, self.choices = spec, components, choices
        self.methods = methods or {}

    def compose(self) -> ComposeResult:
        with Horizontal(classes="output-path-row"):
            yield Input(str(self.spec.path), classes="output-path")
            yield Button("✕", classes="remove-output", tooltip="Remove this output")
        with Horizontal(classes="output-sources"):
            for comp in self.components:
                options = [(Text(f"{comp} ← {name}" + (f" ({self.methods[name]})" if name in self.methods else "")),
                            name) for name in self.choices[comp]]
                value = self.spec.sources.get(comp)
                yield Select(
                    options,
                    value=value if value in self.choices[comp] else Select.NULL,
                    prompt=f"{comp}: none",
                    classes=f"source source-{comp}",
                    name=comp,
                )

    def read(self) -> OutputSpec:
        sources = {}
        for select in self.query(Select):
            if select.value is not Select.NULL:
                sources[select.name] = str(select.value)
        path = Path(self.query_one(".output-path", Input).value.strip()).expanduser()
        return OutputSpec(path=path, sources=sources, dtype=self.spec.dtype, title=self.spec.title)


def renamed_output(spec: OutputSpec, old: str, new: str) -> OutputSpec:
    """An output named after the mix (``<old>.safetensors``, ``<old>-base.safetensors``) follows
    a new mix name; a file the user named otherwise keeps its name."""
    path = Path(spec.path)
    stem, suffix = path.stem, path.suffix
    if stem == old:
        stem = new
    elif stem.startswith(old + "-"):
        stem = new + stem[len(old):]
    else:
        return spec
    return OutputSpec(path=path.with_name(stem + suffix), sources=dict(spec.sources), dtype=spec.dtype,
                      title=spec.title)


class OutputsDialog(ModalScreen[bool]):
    BINDINGS = [Binding("escape", "dismiss(False)", "Cancel"), Binding("ctrl+s", "apply", "Apply", priority=True)]

    def __init__(self, state: SelectionState) -> None:
        super().__init__(classes="dialog")
        self.state = state
        self.components = architectures().get(state.arch or "", get_architecture("sdxl")).display_order
        self.choices = {c: [n for n, col in state.columns.items() if col.component == c] for c in self.components}
        self.methods = {n: state.method_name(n) for n in state.columns if state.method_name(n) != "mean"}

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog-box widest", id="outputs-box"):
            yield Label("Recipe: name, storage, outputs", classes="dialog-title")
            with Horizontal(classes="form-row"):
                yield Label("name", classes="form-label")
                yield Input(self.state.name, id="recipe-name")
                yield Label("dtype", classes="form-label")
                yield Select([(d, d) for d in DTYPES], value=self.state.dtype, allow_blank=False, id="recipe-dtype")
                yield Label("device", classes="form-label")
                devices = list(DEVICES) + ([self.state.device] if self.state.device not in DEVICES else [])
                yield Select([(d, d) for d in devices], value=self.state.device, allow_blank=False, id="recipe-device")
            yield Label("outputs: file, and the selection that feeds each component", classes="dim")
            with VerticalScroll(id="output-rows"):
                for spec in self.state.outputs:
                    yield OutputRow(spec, self.components, self.choices, self.methods)
            with Horizontal(classes="dialog-buttons"):
                yield Button("Apply", variant="primary", id="apply")
                yield Button("Add output", id="add-output")
                yield Button("Cancel", id="cancel")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#recipe-name", Input).focus()

    @on(Button.Pressed, "#add-output")
    def _add(self) -> None:
        name = self.query_one("#recipe-name", Input).value.strip() or self.state.name
        n = len(self.query(OutputRow)) + 1
        sources = {c: names[0] for c, names in self.choices.items() if names}
        spec = OutputSpec(path=self.state.output_dir / f"{name}-{n}.safetensors", sources=sources)
        self.query_one("#output-rows").mount(OutputRow(spec, self.components, self.choices, self.methods))

    @on(Button.Pressed, ".remove-output")
    def _remove(self, event: Button.Pressed) -> None:
        for row in event.button.ancestors:
            if isinstance(row, OutputRow):
                row.remove()
                break

    @on(Button.Pressed, "#cancel")
    def _cancel(self) -> None:
        self.dismiss(False)

    @on(Button.Pressed, "#apply")
    def action_apply(self) -> None:
        name = self.query_one("#recipe-name", Input).value.strip()
        if not name:
            self.notify("The mix needs a name.", severity="error")
            return
        outputs = [row.read() for row in self.query(OutputRow)]
        if name != self.state.name:
            outputs = [renamed_output(o, self.state.name, name) for o in outputs]
        paths = [str(o.path) for o in outputs]
        if len(set(paths)) != len(paths):
            self.notify("Two outputs have the same path.", severity="error")
            return
        self.state.name = name
        self.state.dtype = str(self.query_one("#recipe-dtype", Select).value)
        self.state.device = str(self.query_one("#recipe-device", Select).value)
        self.state.outputs = outputs
        self.dismiss(True)
