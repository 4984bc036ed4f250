"""The astolfo Textual app: the library (grid + details) on the opened folders, the merge
dashboard, the jobs list and help. Every engine call goes through the engine's own functions.

Errors from background workers all land in ``report_worker_error``: one notification for the
user, one line with the traceback in the app log (under the state directory).
"""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Iterable
from pathlib import Path

import platformdirs
from textual import events
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Input
from textual.worker import Worker

from astolfo_tui.screens.help import HelpScreen
from astolfo_tui.screens.jobs import JobsScreen
from astolfo_tui.screens.library import LibraryScreen
from engine.jobs import launch as engine_jobs

log = logging.getLogger("astolfo.tui")


def _log_path() -> Path:
    base = os.environ.get("ASTOLFO_STATE_DIR") or platformdirs.user_state_dir("astolfo")
    return Path(base) / "astolfo-tui.log"


class AstolfoApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "astolfo"
    BINDINGS = [
        Binding(
            "question_mark,f1", "help", "Help", key_display="?", tooltip="Every key and what the grid's marks mean"
        ),
        Binding("j", "jobs", "Jobs", tooltip="Merge jobs, running and finished; reattach to one"),
        Binding("q", "quit", "Quit", tooltip="Quit (running merges go on)"),
    ]

    def __init__(
        self,
        paths: Iterable[os.PathLike | str],
        reattach: bool = True,
        recipe: os.PathLike | str | None = None,
        cursor_blink: bool | None = None,
    ) -> None:
        super().__init__()
        self.paths = [Path(p) for p in paths]
        self.reattach = reattach
        self.recipe = Path(recipe) if recipe is not None else None
        # None: blink on a terminal, not headless (tests, screenshots), where a blink caught or
        # not by a snapshot is noise
        self.cursor_blink = cursor_blink
        self.theme = "tokyo-night"
        self._watched_jobs: set[str] = set()

    def get_default_screen(self) -> Screen:
        """The library is the first screen, so keys typed while the app starts reach it."""
        return LibraryScreen(self.paths, recipe=self.recipe)

    async def on_mount(self) -> None:
        if self.reattach:
            self._reattach_running()
        self.set_interval(1.0, self._check_watched_jobs)

    def on_descendant_focus(self, event: events.DescendantFocus) -> None:
        blink = self.cursor_blink if self.cursor_blink is not None else not self.is_headless
        if not blink and isinstance(event.widget, Input):
            event.widget.cursor_blink = False

    def notify(
        self,
        message: str,
        *,
        title: str = "",
        severity="information",
        timeout: float | None = None,
        markup: bool = True,
    ) -> None:
        """A toast, always plain text (``markup`` is ignored: widgets pass True by default):
        messages carry file names, ids and recipe keys (``[models]``), which markup would eat."""
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=False)

    def action_screenshot(self, filename: str | None = None, path: str | None = None) -> None:
        """Textual saves to ~/Downloads, which servers often lack: there, the current folder."""
        if path is None:
            from platformdirs import user_downloads_path

            downloads = user_downloads_path()
            path = str(downloads if downloads.is_dir() else Path.cwd())
        try:
            self.deliver_screenshot(filename, path)
        except OSError as e:
            self.notify(f"Could not save the screenshot in {path}: {e.strerror or e}", severity="error")
            return
        self.notify(f"Screenshot saved in {path}")

    def open_folders(self, folders: list[Path]) -> None:
        """Replace the library with one on ``folders`` (remembered for a plain ``astolfo``)."""
        from astolfo_tui.config import remember_folders

        self.paths = [Path(p) for p in folders]
        remember_folders(self.paths)
        if self.library is not None:
            self.library.reopen(self.paths)

    def watch_job(self, job_id: str) -> None:
        """Say so when this job ends, wherever the user is in the app by then."""
        self._watched_jobs.add(job_id)

    def _check_watched_jobs(self) -> None:
        for job_id in list(self._watched_jobs):
            try:
                job = engine_jobs.get_job(job_id)
            except Exception:
                self._watched_jobs.discard(job_id)
                continue
            if not job.is_active:
                self._watched_jobs.discard(job_id)
                severity = "information" if job.status == "finished" else "warning"
                detail = ", ".join(p.name for p in job.outputs) if job.status == "finished" else (job.exit_reason or "")
                self.notify(
                    f"Merge job {job_id} {job.status}{': ' + detail if detail else ''}", severity=severity, timeout=10
                )

    def _reattach_running(self) -> None:
        """A merge left running by an earlier session: open its dashboard again."""
        try:
            running = [j for j in engine_jobs.list_jobs() if j.is_active]
        except Exception as e:  # an unreadable state dir must not stop the app
            self.notify(f"Could not read the job list: {e}", severity="warning")
            return
        if running:
            from astolfo_tui.screens.merge import MergeScreen

            latest = max(running, key=lambda j: j.created.timestamp() if j.created else 0)
            self.push_screen(MergeScreen(job=latest))
            more = f" ({len(running)} running: press j for all)" if len(running) > 1 else ""
            self.notify(f"Reattached to running merge job {latest.id}{more}.")

    @property
    def library(self) -> LibraryScreen | None:
        for screen in self.screen_stack:
            if isinstance(screen, LibraryScreen):
                return screen
        return None

    # -- actions -----------------------------------------------------------------------------

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_jobs(self) -> None:
        if not isinstance(self.screen, JobsScreen):
            self.push_screen(JobsScreen())

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """Every action reachable by a key where the palette was opened, by name; then
        Textual's own (theme, screenshot, quit...)."""
        seen = set()
        for key, active in screen.active_bindings.items():
            b = active.binding
            if not b.description or b.action in seen or b.system:
                continue
            seen.add(b.action)
            node = active.node

            async def run(action=b.action, node=node) -> None:
                await self.run_action(action, node)

            yield SystemCommand(b.description, f"{b.tooltip or b.description} · key: {b.key_display or key}", run)
        yield from super().get_system_commands(screen)

    # -- errors ------------------------------------------------------------------------------

    def report_worker_error(self, worker: Worker) -> None:
        error = worker.error
        what = (worker.name or "a background task").capitalize()
        self.notify(f"{what} failed: {error}", title="Error", severity="error", timeout=10)
        try:
            path = _log_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write(f"worker {worker.name!r} failed:\n")
                f.write("".join(traceback.format_exception(type(error), error, error.__traceback__)))
        except OSError:
            pass
        log.error("worker %s failed: %s", worker.name, error)


def run_app(paths: Iterable[os.PathLike | str], recipe: os.PathLike | str | None = None) -> int:
    """``astolfo [DIR...]``: open the app on ``paths``, or on the folders opened last time."""
    import sys

    from astolfo_tui.config import remember_folders, remembered_folders

    chosen = [Path(p).expanduser() for p in paths]
    if not chosen:
        chosen = [p for p in remembered_folders() if p.exists()]
        if not chosen:
            print("usage: astolfo DIR...   (or `astolfo demo` for built-in demo models)", file=sys.stderr)
            return 2
    missing = [p for p in chosen if not p.exists()]
    if missing:
        print(f"astolfo: no such file or folder: {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    remember_folders(chosen)
    AstolfoApp(chosen, recipe=recipe).run()
    return 0
