"""The merge dashboard.

Before launch: what will be merged (models per component per output), bytes to read and write,
free disk, an estimated time, and every problem ``engine.plan.planner.check_recipe`` finds. Launch hands
the picks to ``engine.jobs.launch.start_job`` — the detached job that ``astolfo merge --detach`` starts,
which keeps its own frozen copy of the recipe — so closing the app leaves it running. Launching
never writes the user's recipe file: only ctrl+s does. Then: overall and per-output progress, throughput
with a sparkline, ETA, the current tensor, GPU and host memory, and the log tail, all folded from
the job's event stream; cancel asks first.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Button, Footer, Header, Label, ProgressBar, RichLog, Sparkline, Static
from textual.worker import Worker, WorkerState

from astolfo_tui.job_view import JobView, duration
from astolfo_tui.screens.dialogs import ConfirmDialog
from astolfo_tui.widgets.memory_meter import MemoryMeter
from astolfo_tui.widgets.selection_grid import DIM, ERROR, OK, WARN
from engine.jobs import launch as engine_jobs
from engine.library.report import Severity
from engine.merge import devices
from engine.plan.model import Problem
from engine.plan.planner import build_plan, check_recipe
from engine.recipe.notation import short_id

# Used for the estimate only; the dashboard shows the real rate once the merge runs.
ASSUMED_READ_RATE = 1.0e9
POLL_S = 0.25
LOG_STYLE = {"info": "", "ok": OK, "warning": WARN, "error": f"bold {ERROR}"}


class MergeScreen(Screen):
    BINDINGS = [
        Binding("escape", "close", "Back", tooltip="Back to the library (a running merge goes on)"),
        Binding("l", "launch", "Launch", tooltip="Start the merge as a detached job (your recipe file is not written)"),
        Binding(
            "ctrl+c", "cancel_job", "Cancel merge", tooltip="Cancel the running merge (asks first; no output is left)"
        ),
        Binding("j", "jobs", "Jobs", tooltip="All jobs, running and finished"),
    ]

    def __init__(self, library=None, job: engine_jobs.Job | None = None) -> None:
        super().__init__()
        self.library = library
        self.job = job
        self.view = JobView()
        self.events_offset = 0
        self.problems: list = []
        self.plan = None
        self._poll_timer = None
        self._log_written = 0
        self._output_rows: dict[str, tuple[ProgressBar, Label]] = {}
        self._cancelling = False

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="plan-pane"):
            yield Static(id="plan-summary")
            yield Static(id="plan-outputs")
            yield Static(id="plan-problems")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Launch merge", variant="success", id="launch")
                yield Button("Back", id="back")
        with Vertical(id="job-pane"):
            yield Static(id="job-title")
            with Horizontal(classes="progress-row"):
                yield Label("overall", id="overall-label", classes="progress-label")
                yield ProgressBar(id="overall", show_eta=False)
                yield Label("", id="overall-text", classes="progress-text")
            yield Vertical(id="output-bars")
            with Horizontal(id="throughput-row"):
                yield Label("", id="rate-text")
                yield Sparkline([], id="throughput")
            yield Static(id="current-key")
            yield MemoryMeter("GPU", id="gpu-meter")
            yield MemoryMeter("RAM", id="ram-meter")
            yield RichLog(id="job-log", max_lines=500, wrap=False, markup=False)
            with Horizontal(classes="dialog-buttons"):
                yield Button("Cancel merge", variant="error", id="cancel")
                yield Button("Back", id="back2")
        yield Footer()

    def on_mount(self) -> None:
        self.title = "astolfo — merge"
        if self.job is not None:
            self.attach_job(self.job)
        else:
            self.query_one("#job-pane").display = False
            self._check()

    def check_action(self, action: str, parameters) -> bool | None:
        if action == "launch":
            return self.job is None and self.library is not None
        if action == "cancel_job":
            return self.job is not None and self.view.final is None
        return True

    # -- before launch -----------------------------------------------------------------------

    def _check(self) -> None:
        state = self.library.state
        recipe = state.to_recipe()
        reports = list(state.reports.values())
        self.problems = check_recipe(recipe, reports)
        self.problems += [
            Problem(Severity.WARNING, d.message, code="duplicate_component")
            for d in state.duplicates(self.library.file_hashes)
        ]
        errors = [p for p in self.problems if _is_error(p)]
        self.plan = None
        if not errors:
            try:
                self.plan = build_plan(recipe, reports)
            except Exception as e:  # PlanError carries the problems; show them rather than fail
                self.problems = list(getattr(e, "problems", [])) or [Problem(Severity.ERROR, str(e))]
        self.query_one("#plan-summary", Static).update(self._summary(recipe))
        self.query_one("#plan-outputs", Static).update(self._outputs_table(recipe))
        self.query_one("#plan-problems", Static).update(self._problems_text())
        self.query_one("#launch", Button).disabled = self.plan is None
        self.refresh_bindings()

    def _summary(self, recipe) -> Text:
        t = Text()
        t.append(f"{recipe.name}", style="bold #7aa2f7")
        t.append(
            f"   {len(recipe.models)} models · {len(recipe.outputs)} outputs · dtype {recipe.dtype} "
            f"· device {recipe.device}\n"
        )
        if self.plan is not None:
            read, write = self.plan.bytes_to_read, self.plan.bytes_to_write
            free = _free_disk(recipe.resolve(recipe.outputs[0].path)) if recipe.outputs else None
            t.append("to read ", style=DIM)
            t.append(f"{read / 1e9:,.2f} GB", style="bold")
            t.append("   to write ", style=DIM)
            t.append(f"{write / 1e9:,.2f} GB", style="bold")
            if free is not None:
                t.append("   free disk ", style=DIM)
                t.append(f"{free / 1e9:,.1f} GB", style="bold" if free > write else f"bold {ERROR}")
            t.append("   tensors ", style=DIM)
            t.append(f"{self.plan.tensor_count:,}", style="bold")
            t.append("   estimated ", style=DIM)
            t.append(duration(read / ASSUMED_READ_RATE), style="bold")
            t.append(f" (reading at {ASSUMED_READ_RATE / 1e9:.0f} GB/s)", style=DIM)
        else:
            t.append("cannot merge yet: fix the problems below", style=f"bold {ERROR}")
        return t

    def _outputs_table(self, recipe) -> Table:
        table = Table(
            title="what goes where", title_justify="left", title_style="bold", expand=True, box=None, padding=(0, 1)
        )
        table.add_column("output", style="bold", no_wrap=True)
        table.add_column("component", no_wrap=True)
        table.add_column("selection", no_wrap=True)
        table.add_column("n", justify="right")
        table.add_column("models", ratio=1)
        table.add_column("method", ratio=1)
        for out in recipe.outputs:
            first = True
            for comp, sel in out.sources.items():
                ids = recipe.select.get(sel, [])
                table.add_row(  # paths and names are the user's text, never markup
                    Text(str(out.path)) if first else "",
                    Text(comp),
                    Text(sel),
                    Text(str(len(ids)), style=OK if ids else f"bold {ERROR}"),
                    Text(",".join(short_id(i) for i in ids) or "(none)", style="" if ids else ERROR),
                    _method_text(recipe.methods.get(sel), len(ids)),
                )
                first = False
            table.add_row("", "", "", "", "", "")
        return table

    def _problems_text(self) -> Group | Text:
        if not any(p.severity >= Severity.WARNING for p in self.problems):
            head = Text("✓ the recipe checks out", style=f"bold {OK}")
        else:
            errors = sum(1 for p in self.problems if _is_error(p))
            head = Text(
                f"{errors} error(s): fix them to merge" if errors else "warnings: the merge can go ahead",
                style=f"bold {ERROR if errors else WARN}",
            )
        t = Text()
        glyph = {Severity.ERROR: ("✗ ", ERROR), Severity.WARNING: ("! ", WARN), Severity.OK: ("· ", DIM)}
        for p in sorted(self.problems, key=lambda p: -p.severity):
            mark, colour = glyph[p.severity]
            t.append(mark, style=f"bold {colour}")
            t.append(f"{p.message}\n", style="" if p.severity else DIM)
        t.rstrip()
        return Group(head, t) if self.problems else head

    def action_launch(self) -> None:
        if self.job is not None or self.plan is None:
            return
        self.query_one("#launch", Button).disabled = True
        self.start_job(self.library.state.to_recipe())

    @work(thread=True, exclusive=True, group="launch", exit_on_error=False, name="starting the merge")
    def start_job(self, recipe):
        return engine_jobs.start_job(recipe)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR:
            if event.worker.group == "launch":
                self.query_one("#launch", Button).disabled = False
            self.app.report_worker_error(event.worker)
        elif event.worker.group == "launch" and event.state == WorkerState.SUCCESS:
            self.notify(f"Merge started as job {event.worker.result.id}; it goes on if you quit.")
            self.app.watch_job(event.worker.result.id)
            self.attach_job(event.worker.result)

    # -- a running or finished job -----------------------------------------------------------

    def attach_job(self, job: engine_jobs.Job) -> None:
        self.job = job
        self.view = JobView()
        self.events_offset = 0
        self._log_written = 0
        self.query_one("#output-bars", Vertical).remove_children()  # another job's rows
        self._output_rows = {}
        self.query_one("#plan-pane").display = False
        self.query_one("#job-pane").display = True
        self._poll()
        self._poll_timer = self.set_interval(POLL_S, self._poll)
        self.refresh_bindings()

    def _poll(self) -> None:
        events, self.events_offset = engine_jobs.follow_events(self.job, self.events_offset)
        for e in events:
            self.view.apply(e)
        try:
            self.job = engine_jobs.get_job(self.job.id)
        except Exception:
            pass
        self._render_job()
        if self.view.final is not None or not self.job.is_active:
            if self._poll_timer is not None and not self.job.is_active and not self._cancelling:
                self._poll_timer.stop()
                self._poll_timer = None
                self._finished()

    def _finished(self) -> None:
        """The job ended: its last events are read (one more poll) and the status is final."""
        events, self.events_offset = engine_jobs.follow_events(self.job, self.events_offset)
        for e in events:
            self.view.apply(e)
        self._render_job()
        self.query_one("#cancel", Button).disabled = True
        self.refresh_bindings()
        if self.view.final is None and self.job.exit_reason:
            self.query_one("#job-log", RichLog).write(
                Text(f"job {self.job.status}: {self.job.exit_reason}", style=ERROR)
            )

    def _render_job(self) -> None:
        v, job = self.view, self.job
        title = Text()
        title.append(f"job {job.id}", style="bold #7aa2f7")
        title.append(f"  {job.name}  ")
        status = v.final or job.status
        colour = {"finished": OK, "failed": ERROR, "cancelled": WARN, "died": ERROR}.get(status, "#7dcfff")
        title.append(f" {status} ", style=f"bold #15161e on {colour}")
        title.append(f"   {v.stage}" if v.final is None else "", style=DIM)
        title.append(f"   on {v.device}" if v.device else "", style=DIM)
        if v.final_message and v.final != "finished":
            title.append(f"\n{v.final_message}", style=ERROR if v.final == "failed" else WARN)
        elif v.final == "finished":
            title.append(f"\n{v.final_message}", style=OK)
        self.query_one("#job-title", Static).update(title)

        stage = {"hashing": "hashing sources", "merging": "merging", "finishing": "fsync + rename"}.get(
            v.stage, "overall"
        )
        self.query_one("#overall-label", Label).update("overall" if v.final else stage)
        overall = self.query_one("#overall", ProgressBar)
        overall.update(total=max(v.bytes_total, 1), progress=v.bytes_total if v.final == "finished" else v.bytes_done)
        self.query_one("#overall-text", Label).update(
            f"{v.tensors_done:,}/{v.tensors_total:,} tensors  {v.bytes_done / 1e9:,.2f}/{v.bytes_total / 1e9:,.2f} GB"
            f"  elapsed {duration(v.elapsed_s)}  ETA {duration(v.eta_s) if v.final is None else '—'}"
        )
        self._render_outputs()
        rates = list(v.throughput)
        self.query_one("#rate-text", Label).update(
            Text.assemble(
                ("throughput ", "bold"),
                (f"{v.gbps:,.2f} GB/s", "bold #7dcfff"),
                (f"  peak {max(rates):,.2f}" if rates else "", DIM),
            )
        )
        self.query_one("#throughput", Sparkline).data = rates if any(rates) else []
        key = Text.assemble(("tensor ", "bold"), (v.current_key or ("—" if v.final else "…"), DIM),
                            (f"  {v.detail}" if v.detail and not v.final else "", "#e0af68"))
        self.query_one("#current-key", Static).update(key)
        self._render_memory()
        log = self.query_one("#job-log", RichLog)
        for kind, line in v.lines_since(self._log_written):
            log.write(Text(line, style=LOG_STYLE.get(kind, "")))
        self._log_written = v.log_total

    def _render_outputs(self) -> None:
        box = self.query_one("#output-bars", Vertical)
        for path, state in self.view.outputs.items():
            row = self._output_rows.get(path)
            if row is None:  # keep the widgets themselves: a just-mounted row's children may
                bar = ProgressBar(show_eta=False)  # not be queryable yet
                text = Label("", classes="progress-text")
                box.mount(
                    Horizontal(
                        Label(Path(path).name, classes="progress-label", markup=False),
                        bar,
                        text,
                        classes="progress-row",
                    )
                )
                row = self._output_rows[path] = (bar, text)
            bar, text = row
            bar.update(total=max(state.bytes_total, 1), progress=state.bytes_total if state.done else state.bytes_done)
            text.update("written ✓" if state.done else f"{state.tensors_done:,}/{state.tensors_total:,} tensors")

    def _render_memory(self) -> None:
        v = self.view
        gpu = self.query_one("#gpu-meter", MemoryMeter)
        snap = devices.gpu_snapshot(v.device, v.device_uuid) if v.device.startswith("cuda") else None
        if v.card_mem_total:  # the card's used/total; the peak is the merge process's own
            gpu.show(
                v.card_mem_used,
                v.card_mem_total,
                v.process_mem_peak,
                snap.util if snap else None,
                peak_label="merge peak",
            )
        elif snap is not None:
            gpu.show(snap.used, snap.total, None, snap.util)
        else:
            gpu.show(None, None, note="no GPU" + (f" — merging on {v.device}" if v.device else ""))
        total, _available = devices.host_memory()
        ram = self.query_one("#ram-meter", MemoryMeter)
        if v.host_rss is not None and total:
            ram.show(v.host_rss, total, v.host_rss_peak)
        else:
            ram.show(None, None, note="waiting for the job…" if v.final is None else "—")

    # -- actions -----------------------------------------------------------------------------

    def action_cancel_job(self) -> None:
        if self.job is None or self.view.final is not None:
            return
        job_id = self.job.id

        def done(yes: bool | None) -> None:
            if yes:
                self._cancelling = True  # set before the worker starts: polling must go on
                self.cancel(job_id)

        self.app.push_screen(
            ConfirmDialog(f"Cancel merge job {job_id}? Nothing it wrote will be kept.", "Cancel merge", "Keep running"),
            done,
        )

    @work(thread=True, group="cancel", exit_on_error=False, name="cancelling the merge")
    def cancel(self, job_id: str) -> None:
        try:
            job = engine_jobs.cancel_job(job_id)
        finally:
            self._cancelling = False
        self.app.call_from_thread(self._cancelled, job)

    def _cancelled(self, job: engine_jobs.Job) -> None:
        """cancel_job has settled the status (a runner killed before it could clean up is
        recorded as cancelled there, with its partial output removed)."""
        self.job = job
        self._render_job()
        self.notify(f"Job {job.id} {job.status}.")

    def action_close(self) -> None:
        self.dismiss()

    def action_jobs(self) -> None:
        self.app.action_jobs()

    @on(Button.Pressed, "#launch")
    def _launch_pressed(self) -> None:
        self.action_launch()

    @on(Button.Pressed, "#cancel")
    def _cancel_pressed(self) -> None:
        self.action_cancel_job()

    @on(Button.Pressed, "#back, #back2")
    def _back_pressed(self) -> None:
        self.action_close()

    def on_unmount(self) -> None:
        if self._poll_timer is not None:
            self._poll_timer.stop()


def _method_text(fields: dict | None, count: int) -> Text:
    """A selection's method with every parameter, defaults filled (``MethodParams.summary``);
    a table the checks refuse is shown as written (its problems are listed below the table).
    Without a method one model is copied and several are averaged."""
    from engine.methods.params import resolve

    if not fields or fields.get("method", "mean") == "mean":
        return Text("copy" if count == 1 else "mean", style=DIM)
    try:
        return Text(resolve(fields).summary())
    except (KeyError, TypeError, ValueError):
        written = ", ".join(f"{k}={v!r}" for k, v in fields.items() if k != "method")
        return Text(f"{fields.get('method')}({written})", style=ERROR)


def _is_error(problem: Problem) -> bool:
    return problem.severity >= Severity.ERROR


def _free_disk(target: Path) -> int | None:
    p = Path(target).parent
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None
