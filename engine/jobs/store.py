"""Where detached jobs live on disk, and the facts that must survive the process that ran them.

A job is a folder ``<state dir>/jobs/<id>/``:

- ``recipe.toml``   the recipe as the user wrote it (byte for byte, so the output's metadata is
                    the same as a foreground merge's); relative paths resolve against
                    ``base_dir`` recorded in job.json, the original recipe's folder
- ``job.json``      who runs it (pid, the process's start time, boot id, host), status, times,
                    outputs, exit reason; replaced atomically, never edited in place
- ``events.jsonl``  the merge's progress events, one JSON object per line, appended
- ``job.log``       the runner's stdout and stderr: readable lines, tracebacks
- ``result.json``   the merge result once the job finished
- ``cancel``        present once a cancel was asked for

The state dir is platformdirs' user state dir for "astolfo"; ``ASTOLFO_STATE_DIR`` overrides it.

A pid alone does not identify a process: pids are reused, and a reboot restarts them. A job
records the kernel's start time of its process (``/proc/<pid>/stat`` field 22) and the boot id;
it counts as alive only while a process with that pid, start time and boot id exists.

One writer per output path: a job holds an ``fcntl.flock`` on a lock file per output (under
``<state dir>/locks``) for as long as its runner process lives. The kernel drops the lock when
the process dies, however it dies, so a crashed job never blocks an output.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import hashlib
import json
import os
import secrets
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from engine.durable import write_json_atomic

STATE_DIR_ENV = "ASTOLFO_STATE_DIR"

JOB_JSON = "job.json"
RECIPE_COPY = "recipe.toml"
EVENTS = "events.jsonl"
LOG = "job.log"
RESULT = "result.json"
CANCEL_FLAG = "cancel"
RUNNER_LOCK = "runner.lock"

# Recorded statuses. "died" is never recorded: it is what a recorded "starting"/"running" job
# whose process is gone is shown as.
STARTING, RUNNING, FINISHED, FAILED, CANCELLED, DIED = (
    "starting",
    "running",
    "finished",
    "failed",
    "cancelled",
    "died",
)
ACTIVE = (STARTING, RUNNING)


class JobError(Exception):
    """A job operation that cannot be done; the message says which job and why."""


class OutputBusy(JobError):
    """Another live merge is writing this output: job ``holder``, or a merge that is not a job
    (a foreground ``astolfo merge``) described by ``owner``."""

    def __init__(self, output: Path, holder: str | None, owner: str | None = None):
        self.output = output
        self.holder = holder
        self.owner = owner
        if holder:
            who = (f"job {holder} is already writing this output "
                   f"(see `astolfo attach {holder}`, or `astolfo cancel {holder}`)")
        else:
            who = f"{owner or 'another merge'} is already writing this output"
        super().__init__(f"{output}: {who}")


def state_dir() -> Path:
    override = os.environ.get(STATE_DIR_ENV)
    return Path(override) if override else Path(platformdirs.user_state_dir("astolfo"))


def jobs_dir() -> Path:
    return state_dir() / "jobs"


def locks_dir() -> Path:
    return state_dir() / "locks"


# --------------------------------------------------------------------------- ids and times


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def parse_iso(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    try:
        return dt.datetime.fromisoformat(text)
    except ValueError:
        return None


def create_job_dir() -> tuple[str, Path]:
    """A new, empty job folder with a short id that sorts by creation time (UTC seconds plus a
    random suffix; the folder is created exclusively, so two processes never share an id)."""
    root = jobs_dir()
    root.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%y%m%d-%H%M%S")
    while True:
        job_id = f"{stamp}-{secrets.token_hex(2)}"
        try:
            (root / job_id).mkdir()
        except FileExistsError:
            continue
        return job_id, root / job_id


# --------------------------------------------------------------------------- job.json


def read_job_json(job_dir: Path) -> dict:
    """job.json of ``job_dir``; JobError when it is missing or unreadable."""
    path = job_dir / JOB_JSON
    try:
        data = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise JobError(f"{path}: no such job file") from None
    except (OSError, ValueError) as e:
        raise JobError(f"{path}: cannot read job file ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("id"), str):
        raise JobError(f"{path}: not a job file")
    return data


def update_job_json(job_dir: Path, **changes) -> dict:
    """Read-modify-write job.json under a short lock, so the launcher and the runner, which
    both record facts about the same job, never lose each other's changes."""
    with open(job_dir / ".job.json.lock", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        data = read_job_json(job_dir)
        data.update(changes)
        write_json_atomic(job_dir / JOB_JSON, data)
        return data


# --------------------------------------------------------------------------- process identity


@dataclass(frozen=True)
class ProcessIdentity:
    """Enough to tell "this process" from "a later process that got the same pid"."""

    pid: int
    start_ticks: int | None  # /proc/<pid>/stat field 22: clock ticks after boot
    boot_id: str | None
    host: str

    def as_json(self) -> dict:
        return {"pid": self.pid, "pid_start_ticks": self.start_ticks, "boot_id": self.boot_id, "host": self.host}

    @classmethod
    def from_json(cls, data: dict) -> "ProcessIdentity | None":
        pid = data.get("pid")
        if not isinstance(pid, int) or pid <= 0:
            return None
        return cls(pid, data.get("pid_start_ticks"), data.get("boot_id"), data.get("host") or "")


def boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in ticks) of ``pid``, or None when there is no such process.

    The command name (field 2) may hold spaces and parentheses, so fields are counted from the
    last ')'."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    rest = raw[raw.rfind(b")") + 2 :].split()
    try:
        return rest[0].decode(), int(rest[19])
    except (IndexError, ValueError):
        return None


def identify(pid: int) -> ProcessIdentity:
    stat = _proc_stat(pid)
    return ProcessIdentity(pid, stat[1] if stat else None, boot_id(), socket.gethostname())


def is_alive(ident: ProcessIdentity) -> bool | None:
    """True while the very process ``ident`` names runs; None when it ran on another host
    (this machine cannot tell)."""
    if ident.host and ident.host != socket.gethostname():
        return None
    current_boot = boot_id()
    if ident.boot_id and current_boot and ident.boot_id != current_boot:
        return False
    if Path("/proc/self/stat").exists():
        stat = _proc_stat(ident.pid)
        if stat is None or stat[0] in ("Z", "X"):
            return False
        return ident.start_ticks is None or stat[1] == ident.start_ticks
    try:  # no /proc (not Linux): the pid check is all there is
        os.kill(ident.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- output locks


def output_key(path: Path) -> str:
    return str(Path(os.path.abspath(path)).resolve())


def _lock_file(output: Path) -> Path:
    digest = hashlib.sha256(output_key(output).encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return locks_dir() / f"{digest}.lock"


def _try_flock(path: Path) -> int | None:
    """An fd holding an exclusive flock on ``path``, or None when someone else holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    return fd


def _holder_of(path: Path) -> tuple[str | None, str | None]:
    """(job id, owner description) recorded in a held lock file."""
    try:
        data = json.loads(path.read_text("utf-8"))
        return data.get("job") or None, data.get("owner") or None
    except (OSError, ValueError, AttributeError):
        return None, None


def _lock_outputs(outputs: list[Path], record: dict, fds: list[int]) -> None:
    """Add a held lock per output to ``fds``; OutputBusy at the first one someone else holds."""
    locks_dir().mkdir(parents=True, exist_ok=True)
    for output in outputs:
        path = _lock_file(output)
        fd = _try_flock(path)
        if fd is None:
            raise OutputBusy(Path(output_key(output)), *_holder_of(path))
        fds.append(fd)
        text = json.dumps({**record, "path": output_key(output), "pid": os.getpid()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, text, 0)


def acquire_locks(job_id: str, job_dir: Path, outputs: list[Path]) -> list[int]:
    """Lock the job itself (one runner per job) and each output (one writer per output).

    Returns the fds holding the locks: whoever keeps them open holds the locks, so a launcher
    passes them to the runner it spawns and closes its own copies. Raises OutputBusy naming the
    job that holds an output, or JobError when the job is already being run."""
    fds: list[int] = []
    try:
        fd = _try_flock(job_dir / RUNNER_LOCK)
        if fd is None:
            raise JobError(f"job {job_id} is already running (its runner holds {job_dir / RUNNER_LOCK})")
        fds.append(fd)
        _lock_outputs(outputs, {"job": job_id}, fds)
    except BaseException:
        release_locks(fds)
        raise
    return fds


def release_locks(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


@contextmanager
def output_locks(outputs: list[Path], owner: str):
    """Hold the outputs' locks for a merge that is not a job (a foreground ``astolfo merge``),
    so that it and jobs never write one output at once. ``owner`` says who, for the message
    another writer gets. Raises OutputBusy."""
    fds: list[int] = []
    try:
        _lock_outputs(outputs, {"owner": owner}, fds)
        yield
    finally:
        release_locks(fds)


def busy_outputs() -> set[str]:
    """Resolved paths of the outputs some merge (a job, or a foreground ``astolfo merge``) holds
    the lock of right now: a held flock is the proof, whatever job.json says."""
    busy: set[str] = set()
    try:
        locks = list(locks_dir().glob("*.lock"))
    except OSError:
        return busy
    for path in locks:
        try:
            fd = _try_flock(path)
        except OSError:
            continue
        if fd is not None:
            os.close(fd)
            continue
        try:
            recorded = json.loads(path.read_text("utf-8")).get("path")
        except (OSError, ValueError, AttributeError):
            continue
        if recorded:
            busy.add(os.path.realpath(recorded))
    return busy


def output_holder(output: Path) -> str | None:
    """Who writes ``output`` now (a job id, or the description of a merge that is not a job),
    or None when nobody does."""
    path = _lock_file(output)
    if not path.exists():
        return None
    fd = _try_flock(path)
    if fd is None:
        job_id, owner = _holder_of(path)
        return job_id or owner or "another merge"
    os.close(fd)
    return None
