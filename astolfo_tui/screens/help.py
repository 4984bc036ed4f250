"""The help screen: every key, read from the same BINDINGS the app runs on, so it cannot drift."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static


def _legend() -> Table:
    """What the grid's marks mean."""
    table = Table(
        box=None,
        show_header=False,
        padding=(0, 2),
        title=Text("In the grid", style="bold #7aa2f7"),
        title_justify="left",
    )
    table.add_column(no_wrap=True, min_width=22)
    table.add_column()
    rows = [
        (Text("03", style="bold #15161e on #9ece6a"), "ticked: the model's id, as the article writes it"),
        (Text("--", style="#565f89"), "not ticked"),
        (Text("✗", style="#f7768e"), "cannot be ticked: the component is broken or missing (the details say why)"),
        (Text("◉ ○", style="bold #9ece6a"), "the VAE source (one model)"),
        (Text("=19", style="#9ece6a"), "how many models a selection has"),
        (Text("=19 ties", style="italic #7dcfff"), "the selection's merge method, when it is not the mean (t sets it)"),
        (
            Text("#te0 3630852f", style="italic"),
            "short component hash; the same colour in a column = the identical component",
        ),
        (Text("m:te0 0000", style="italic"), "the model-toolkit metric: 0000 is the original SD CLIP/VAE"),
        (Text("=sd", style="bold #7dcfff"), "same text encoders as SDXL base (or a model you marked with =)"),
        (Text("✓ ! ✗", style="bold"), "file status: fine / warnings (still mergeable) / errors"),
    ]
    for mark, meaning in rows:
        table.add_row(Text.assemble((mark.plain, mark.style)), meaning)  # style the mark, not the cell
    return table


def _key_name(binding: Binding) -> str:
    names = {"slash": "/", "question_mark": "?", "space": "space", "escape": "esc"}
    return binding.key_display or ", ".join(names.get(k, k) for k in binding.key.split(","))


def bindings_table(title: str, bindings) -> Table:
    table = Table(
        title=Text(title, style="bold #7aa2f7"), title_justify="left", box=None, show_header=False, padding=(0, 2)
    )
    table.add_column(style="bold #e0af68", no_wrap=True, min_width=22)
    table.add_column()
    for b in bindings:
        if isinstance(b, tuple):
            b = Binding(*b)
        if not b.description:
            continue
        table.add_row(_key_name(b), b.tooltip or b.description)
    return table


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark,f1", "dismiss(None)", "Close")]

    def compose(self) -> ComposeResult:
        from astolfo_tui.app import AstolfoApp
        from astolfo_tui.screens.compare import CompareScreen
        from astolfo_tui.screens.jobs import JobsScreen
        from astolfo_tui.screens.library import LibraryScreen
        from astolfo_tui.screens.merge import MergeScreen
        from astolfo_tui.widgets.selection_grid import SelectionGrid

        move = [
            Binding("up,down,left,right", "", "Move the cursor", key_display="arrows"),
            Binding("pageup,pagedown,home,end", "", "Page, first/last column", key_display="pgup pgdn home end"),
            Binding("enter", "", "Toggle the cell (like space); a click toggles too, a header click sorts"),
        ]
        with VerticalScroll(classes="dialog-box widest", id="help-box"):
            yield Static(Text("astolfo — keys", style="bold"), classes="dialog-title")
            yield Static(_legend())
            yield Static(bindings_table("Selection grid", [*move, *SelectionGrid.BINDINGS]))
            yield Static(bindings_table("Library", LibraryScreen.BINDINGS))
            yield Static(bindings_table("Compare", CompareScreen.BINDINGS))
            yield Static(bindings_table("Merge dashboard", MergeScreen.BINDINGS))
            yield Static(bindings_table("Jobs", JobsScreen.BINDINGS))
            yield Static(
                bindings_table(
                    "Everywhere", [*AstolfoApp.BINDINGS, Binding("ctrl+p", "", "Command palette: every action by name")]
                )
            )
