"""How a job process reports: a ``JobChannel`` carries its heartbeat, progress, checkpoints and final record
out, and the stop flag in.

* ``LedgerChannel``: a job on this machine writes the SQLite ledger directly (as it always did).
* ``FileChannel``: a job on a Slurm node must not touch SQLite (the workspace is on a shared filesystem, and
  SQLite's locks are unsafe on network mounts), so it writes small atomic JSON files under its attempt
  folder ``W/jobs/<id>/attempt-<n>/`` and reads a stop-flag *file* there. The supervisor ingests those files
  into the ledger at each Slurm poll (``read_remote``), so readers see one ledger whatever the executor.

Files of an attempt folder (each written whole through a temporary file and a rename, so a reader on
another machine sees the old or the new version, never half of one):

``job.json``        the row as the supervisor handed it over (the node reads its config from it)
``starts.json``     how many times the attempt started (a Slurm requeue starts it again)
``heartbeat.json``  {"at", "progress", "info", "host", "pid"}, rewritten by the job's pulse
``checkpoints.json``[{"path", "step", "at"}, ...] every checkpoint the attempt recorded
``final.json``      {"state", "error", "result", "progress", "info", "detail"}: the job's own end
``stop``            written by the supervisor: checkpoint at the next step boundary and end ``stopped``
``slurm/``          submitit's folder (Slurm's stdout/stderr of the attempt, the pickled call)
"""
from __future__ import annotations

import json
import os
import socket
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..fileio import atomic_write_text
from ..workspace import Workspace, validate_name
from .records import RUNNING, Job, jobs_dir

if TYPE_CHECKING:  # pragma: no cover
    from .ledger import JobLedger

JOB_FILE, STARTS_FILE, HEARTBEAT_FILE = "job.json", "starts.json", "heartbeat.json"
CHECKPOINTS_FILE, FINAL_FILE, STOP_FILE, SLURM_DIR = "checkpoints.json", "final.json", "stop", "slurm"


def attempt_dir(ws: Workspace, job_id: str, attempt: int) -> Path:
    """``W/jobs/<id>/attempt-<n>/``: what one remote attempt writes (and the stop flag it reads)."""
    return jobs_dir(ws) / validate_name(job_id, "job id") / f"attempt-{int(attempt)}"


SAMPLE_FILE = "sample-now"


def sample_request_path(ws: Workspace, job_id: str) -> Path:
    """``W/jobs/<id>/sample-now``: a "Sample now" request, read by the job wherever it runs (the workspace is
    shared with Slurm's nodes), whichever attempt runs."""
    return jobs_dir(ws) / validate_name(job_id, "job id") / SAMPLE_FILE


def request_sample(ws: Workspace, job: Job) -> Path:
    """Ask a running ``train`` job to render its validation prompts at its next step, without stopping it."""
    if job.kind != "train" or job.state != RUNNING:
        raise ConfigError(f"Sample now needs a running train job; {job.id} is a {job.kind} job that is {job.state}.")
    path = sample_request_path(ws, job.id)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, f"{time.time()}\n")
    return path


def take_sample_request(ws: Workspace, job_id: str) -> bool:
    """True once per request (the file is removed as it is taken)."""
    path = sample_request_path(ws, job_id)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def write_json(path: Path, data: Any) -> None:
    """Atomically (temporary file + rename): readers on other machines never see half a file."""
    atomic_write_text(path, json.dumps(data, sort_keys=True, default=str))


def read_json(path: Path, default: Any = None) -> Any:
    """The file's JSON, or ``default`` when it is missing or (a foreign writer's bug) unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default


class JobChannel(ABC):
    """The job process's side of the ledger: every write the job makes, and the flags it reads."""

    @abstractmethod
    def beat(self, progress: float | None, info: dict[str, Any] | None) -> tuple[bool, bool]:
        """Heartbeat (+ progress when given). Returns (the attempt is still ours, stop requested)."""

    @abstractmethod
    def read_flags(self) -> tuple[bool, bool]:
        """(still ours, stop requested) without writing."""

    @abstractmethod
    def checkpoint(self, path: str, step: int | None) -> None:
        """Record a checkpoint of this attempt."""

    @abstractmethod
    def finish(self, state: str, *, error: str | None, result: dict[str, Any] | None, progress: float | None,
               info: dict[str, Any] | None, detail: dict[str, Any] | None) -> bool:
        """The job's own final record."""

    def for_thread(self) -> "JobChannel":
        """A channel the pulse thread may use (SQLite connections are per thread)."""
        return self

    def close(self) -> None:
        """Release what the channel holds."""


class LedgerChannel(JobChannel):
    """A job on this machine: straight into the SQLite ledger."""

    def __init__(self, ledger: "JobLedger", job_id: str, attempt: int):
        self.ledger, self.job_id, self.attempt = ledger, job_id, int(attempt)
        self._own = False

    def beat(self, progress: float | None, info: dict[str, Any] | None) -> tuple[bool, bool]:
        return self.ledger.beat(self.job_id, self.attempt, progress=progress, info=info)

    def read_flags(self) -> tuple[bool, bool]:
        return self.ledger.read_flags(self.job_id, self.attempt)

    def checkpoint(self, path: str, step: int | None) -> None:
        self.ledger.checkpoint(self.job_id, self.attempt, path, step)

    def finish(self, state: str, *, error: str | None, result: dict[str, Any] | None, progress: float | None,
               info: dict[str, Any] | None, detail: dict[str, Any] | None) -> bool:
        return self.ledger.finish(self.job_id, self.attempt, state, error=error, result=result, progress=progress,
                                  info=info, detail=detail)

    def for_thread(self) -> "LedgerChannel":
        ch = LedgerChannel(type(self.ledger)(self.ledger.ws), self.job_id, self.attempt)
        ch._own = True
        return ch

    def close(self) -> None:
        if self._own:
            self.ledger.close()


class FileChannel(JobChannel):
    """A job on a Slurm node: atomic JSON files in its attempt folder, a stop-flag file read back."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def beat(self, progress: float | None, info: dict[str, Any] | None) -> tuple[bool, bool]:
        old = read_json(self.folder / HEARTBEAT_FILE, {}) or {}
        write_json(self.folder / HEARTBEAT_FILE, {
            "at": time.time(), "host": socket.gethostname(), "pid": os.getpid(),
            "progress": old.get("progress") if progress is None else float(progress),
            "info": old.get("info") if info is None else info})
        return self.read_flags()

    def read_flags(self) -> tuple[bool, bool]:
        # "Ours" cannot be read without the ledger; a newer attempt writes another folder anyway.
        return True, (self.folder / STOP_FILE).exists()

    def checkpoint(self, path: str, step: int | None) -> None:
        found = read_json(self.folder / CHECKPOINTS_FILE, []) or []
        found.append({"path": str(path), "step": step, "at": time.time()})
        write_json(self.folder / CHECKPOINTS_FILE, found)

    def finish(self, state: str, *, error: str | None, result: dict[str, Any] | None, progress: float | None,
               info: dict[str, Any] | None, detail: dict[str, Any] | None) -> bool:
        write_json(self.folder / FINAL_FILE, {"state": state, "error": error, "result": result, "progress": progress,
                                              "info": info, "detail": detail or {}, "at": time.time()})
        return True


class FollowerChannel(JobChannel):
    """Task 1+ of a multi-task (data-parallel) Slurm job: reads the stop flag, writes nothing. Task 0 alone
    writes the attempt's heartbeat, progress, checkpoints and final record (and the job's log); the stop
    decision reaches the other tasks through the training loop's collective (``train._all_ranks_any``)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def beat(self, progress: float | None, info: dict[str, Any] | None) -> tuple[bool, bool]:
        return self.read_flags()

    def read_flags(self) -> tuple[bool, bool]:
        return True, (self.folder / STOP_FILE).exists()

    def checkpoint(self, path: str, step: int | None) -> None:
        return None

    def finish(self, state: str, *, error: str | None, result: dict[str, Any] | None, progress: float | None,
               info: dict[str, Any] | None, detail: dict[str, Any] | None) -> bool:
        return False


def write_job_file(folder: Path, job: Job) -> None:
    """What the node needs of the row (it cannot read the ledger): written before the attempt is submitted."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / JOB_FILE, asdict(job))


def read_job_file(folder: Path) -> Job:
    data = read_json(folder / JOB_FILE)
    if not isinstance(data, dict):
        raise FileNotFoundError(f"{folder / JOB_FILE} is missing or unreadable: the compute node cannot see the "
                                "workspace, or the attempt was not handed over.")
    return Job(**data)


def count_start(folder: Path, key: str | None = None) -> int:
    """Record one more start of the attempt; returns how many there were (2+ after a Slurm requeue).
    ``key`` names this start (Slurm job id and restart count): the other tasks of a multi-task job wait for
    it (:func:`read_start`) instead of counting themselves."""
    n = int((read_json(folder / STARTS_FILE, {}) or {}).get("starts", 0)) + 1
    write_json(folder / STARTS_FILE, {"starts": n, "at": time.time(), "host": socket.gethostname(), "key": key})
    return n


def read_start(folder: Path, key: str) -> int | None:
    """The start count task 0 recorded for the start ``key``; None while it has not recorded it yet."""
    data = read_json(folder / STARTS_FILE, {}) or {}
    return int(data["starts"]) if data.get("key") == key and "starts" in data else None


@dataclass
class RemoteReport:
    """What an attempt's files say, as the supervisor reads them at a poll."""

    heartbeat_at: float | None
    progress: float | None
    info: dict[str, Any] | None
    checkpoints: list[dict[str, Any]]
    final: dict[str, Any] | None
    started: bool


def read_remote(folder: Path) -> RemoteReport:
    hb = read_json(folder / HEARTBEAT_FILE, {}) or {}
    return RemoteReport(heartbeat_at=hb.get("at"), progress=hb.get("progress"), info=hb.get("info"),
                        checkpoints=list(read_json(folder / CHECKPOINTS_FILE, []) or []),
                        final=read_json(folder / FINAL_FILE), started=(folder / STARTS_FILE).exists())


def request_stop_file(folder: Path) -> bool:
    """Write the stop flag the remote job reads; returns whether it was new."""
    p = folder / STOP_FILE
    if p.exists():
        return False
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(p, f"{time.time()}\n")
    return True


def slurm_log_section(ws: Workspace, job: Job, lines: int = 20) -> str:
    """Slurm's own stderr (then stdout) tail of a remote attempt that ended before Med-Art's code started
    (a failed ``setup`` command, a Python that cannot import medart_core): "" otherwise."""
    if not job.is_remote or not job.remote_id or not job.remote_folder:
        return ""
    if read_remote(attempt_dir(ws, job.id, job.attempt)).started:
        return ""      # our code ran: the job's own log says what happened
    from .. import slurm

    for what, tail in (("stderr", slurm.stderr_tail), ("stdout", slurm.stdout_tail)):
        text = tail(job.remote_folder, job.remote_id, lines)
        if text.strip():
            return f"Slurm's {what} of job {job.remote_id} ({Path(job.remote_folder).name}):\n{text}"
    return ""

