"""Every merge job on this machine, running and finished (``engine.jobs.launch.list_jobs``); enter opens
the dashboard on one, which reattaches to a running job."""

from __future__ import annotations

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static
from textual.worker import Worker, WorkerState

from astolfo_tui.job_view import duration
from astolfo_tui.screens.dialogs import ConfirmDialog
from astolfo_tui.widgets.selection_grid import DIM, ERROR, OK, WARN
from engine.jobs import launch as engine_jobs

STATUS_STYLE = {
    "finished": OK,
    "failed": ERROR,
    "died": ERROR,
    "cancelled": WARN,
    "running": "#7dcfff",
    "starting": "#7dcfff",
}


class JobsScreen(Screen):
    BINDINGS = [
        Binding("escape", "close", "Back", tooltip="Back to where you were"),
        Binding("enter", "open_job", "Open", tooltip="Open the dashboard on the highlighted job (reattaches)"),
        Binding("r", "resume", "Resume", tooltip="Continue a job that died or failed, without redoing what it wrote"),
        Binding("ctrl+c", "cancel", "Cancel", tooltip="Cancel the highlighted running job (asks first)"),
        Binding("ctrl+r", "reload", "Reload", show=False, tooltip="Read the job list again"),
        Binding("p", "prune", "Prune", tooltip="Remove the jobs that have ended (asks first; outputs are kept)"),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(
            Text("Merge jobs — they run detached: quitting astolfo or losing SSH does not stop them.", style=DIM),
            id="jobs-note",
        )
        yield DataTable(cursor_type="row", zebra_stripes=True, id="jobs-table")
        yield Footer()

    def on_mount(self) -> None:
        self.title = "astolfo — jobs"
        table = self.query_one(DataTable)
        for label, key in (
            ("id", "id"),
            ("name", "name"),
            ("status", "status"),
            ("progress", "progress"),
            ("started", "started"),
            ("took", "took"),
            ("outputs", "outputs"),
        ):
            table.add_column(label, key=key)
        self.action_reload()
        self.set_interval(1.0, self.action_reload)
        table.focus()

    def action_reload(self) -> None:
        table = self.query_one(DataTable)
        keep = table.cursor_row
        table.clear()
        self.jobs = {j.id: j for j in sorted(engine_jobs.list_jobs(), key=lambda j: j.created or 0, reverse=True)}
        for job in self.jobs.values():
            progress = "" if job.progress is None else f"{job.progress * 100:5.1f}%"
            took = job.elapsed.total_seconds() if job.elapsed else None
            table.add_row(
                Text(job.id, style="bold"),
                Text(job.name),
                Text(job.status, style=f"bold {STATUS_STYLE.get(job.status, '')}"),
                progress,
                job.started.astimezone().strftime("%Y-%m-%d %H:%M") if job.started else "",
                duration(took),
                Text(", ".join(p.name for p in job.outputs)),
                key=job.id,
            )
        if table.row_count:
            table.move_cursor(row=min(keep, table.row_count - 1))

    def _current(self) -> engine_jobs.Job | None:
        table = self.query_one(DataTable)
        if not table.row_count:
            return None
        return self.jobs.get(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)

    def action_open_job(self) -> None:
        job = self._current()
        if job is None:
            return
        from astolfo_tui.screens.merge import MergeScreen

        self.app.push_screen(MergeScreen(job=job))

    def action_resume(self) -> None:
        job = self._current()
        if job is not None:
            self.resume(job.id)

    @work(thread=True, group="jobs", exit_on_error=False, name="resuming the job")
    def resume(self, job_id: str) -> None:
        job = engine_jobs.resume_job(job_id)  # JobError says why not (running, finished, ...)
        self.app.call_from_thread(self._resumed, job)

    def _resumed(self, job: engine_jobs.Job) -> None:
        from astolfo_tui.screens.merge import MergeScreen

        self.app.watch_job(job.id)
        self.notify(f"Job {job.id} resumed.")
        self.app.push_screen(MergeScreen(job=job))

    def action_cancel(self) -> None:
        job = self._current()
        if job is None or not job.is_active:
            self.notify("Only a running job can be cancelled.", severity="warning")
            return

        def done(yes: bool | None) -> None:
            if yes:
                self.cancel(job.id)

        self.app.push_screen(
            ConfirmDialog(f"Cancel merge job {job.id}? Nothing it wrote will be kept.", "Cancel merge", "Keep running"),
            done,
        )

    @work(thread=True, group="jobs", exit_on_error=False, name="cancelling the job")
    def cancel(self, job_id: str) -> None:
        job = engine_jobs.cancel_job(job_id)
        self.app.call_from_thread(self.notify, f"Job {job.id} {job.status}.")

    def action_prune(self) -> None:
        ended = [j for j in self.jobs.values() if not j.is_active and j.status != engine_jobs.UNKNOWN]
        if not ended:
            self.notify("No ended jobs to remove.")
            return

        def done(yes: bool | None) -> None:
            if yes:
                self.prune()

        self.app.push_screen(
            ConfirmDialog(f"Remove {len(ended)} ended job(s)? Their outputs are kept.", "Remove", "Keep them"), done
        )

    @work(thread=True, group="jobs", exit_on_error=False, name="removing ended jobs")
    def prune(self) -> None:
        removed = engine_jobs.prune_jobs()
        self.app.call_from_thread(self._pruned, len(removed))

    def _pruned(self, n: int) -> None:
        self.action_reload()
        self.notify(f"Removed {n} ended job(s).")

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR:
            self.app.report_worker_error(event.worker)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_open_job()

    def action_close(self) -> None:
        self.dismiss()
