"""Job records: the states a job moves through, ``Job`` (one ledger row) and ``JobEvent`` (one line of its
append-only log), and the small formatting helpers that lists, the CLI and the studio share."""
from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..workspace import Workspace

QUEUED, RUNNING, STOPPING = "queued", "running", "stopping"
DONE, FAILED, INTERRUPTED, STOPPED = "done", "failed", "interrupted", "stopped"
STATES = (QUEUED, RUNNING, STOPPING, DONE, FAILED, INTERRUPTED, STOPPED)
ACTIVE = (RUNNING, STOPPING)                   # a process is (or should be) alive
FINAL = (DONE, FAILED, INTERRUPTED, STOPPED)   # no process; the last three can be resumed
RESUMABLE = (INTERRUPTED, STOPPED, FAILED)


def now() -> float:
    """Wall-clock seconds: what every timestamp of the ledger is."""
    return time.time()


def iso(t: float | None) -> str | None:
    """``2026-01-31T12:00:00Z`` (UTC), or None."""
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def fmt_duration(s: float) -> str:
    """``1:02:03`` or ``2:03``."""
    s = max(0, int(round(s)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def jobs_dir(ws: Workspace) -> Path:
    """``W/jobs/``: one folder per job plus the supervisor's lock and log (names starting with '_' are not
    valid job ids, so they cannot collide)."""
    d = getattr(ws, "jobs_dir", None)
    d = Path(d) if d is not None else ws.root / "jobs"
    d.mkdir(parents=True, exist_ok=True)
    return d


def tail_text(path: str | os.PathLike, lines: int = 40, max_bytes: int = 64_000) -> str:
    """The last ``lines`` lines of a text file, reading at most ``max_bytes`` from its end."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return ""
    text = data.decode("utf-8", "replace")
    if size > max_bytes:
        text = text.split("\n", 1)[-1]
    out = text.splitlines()[-lines:] if lines > 0 else []
    return "\n".join(out)


@dataclass
class Job:
    """One row of the ledger: the job's current state."""

    id: str
    kind: str
    target: str
    uses_gpu: bool
    config: dict[str, Any]
    owner: str | None
    cwd: str | None
    state: str
    attempt: int
    run: str | None
    pid: int | None
    pid_start: str | None
    heartbeat_at: float | None
    progress: float
    progress_info: dict[str, Any]
    last_checkpoint: str | None
    log_path: str
    error: str | None
    result: dict[str, Any] | None
    stop_requested_at: float | None
    term_sent_at: float | None
    kill_sent_at: float | None
    created_at: float
    queued_at: float
    started_at: float | None
    finished_at: float | None
    updated_at: float
    # Where the job runs (a name from medart_core.executors) and, off this machine, its Slurm handle.
    executor: str = "local"
    remote_id: str | None = None       # the Slurm job id of the current attempt
    remote_folder: str | None = None   # the submitit folder holding Slurm's logs of that attempt
    remote_reason: str | None = None   # Slurm's PENDING reason, or the cause of an interruption

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Job":
        d = dict(row)
        d["uses_gpu"] = bool(d["uses_gpu"])
        d["config"] = json.loads(d["config"] or "{}")
        d["progress_info"] = json.loads(d["progress_info"] or "{}")
        d["result"] = json.loads(d["result"]) if d["result"] else None
        d["executor"] = d.get("executor") or "local"
        return cls(**d)

    # ---- views -------------------------------------------------------------------------------------------
    @property
    def is_final(self) -> bool:
        return self.state in FINAL

    @property
    def is_active(self) -> bool:
        return self.state in ACTIVE

    @property
    def resumable(self) -> bool:
        return self.state in RESUMABLE

    @property
    def is_remote(self) -> bool:
        """Runs under Slurm (a named executor), not as a child of this machine's supervisor."""
        return self.executor != "local" and not self.fans_out

    @property
    def fans_out(self) -> bool:
        """A coordinator (issue 17 §3): a kind registered with ``fans_out`` (ablation, evaluate) on a Slurm
        executor runs HERE, as a light child of the supervisor without the accelerator slot, and fans its
        work out as a Slurm job array (:mod:`medart_core.fanout`). An attempt an older version handed
        to Slurm whole (it has a Slurm id) stays with the Slurm bridge."""
        if self.executor == "local" or self.remote_id is not None:
            return False
        from .kinds import job_kinds

        kind = job_kinds().get(self.kind)
        return bool(kind is not None and kind.fans_out)

    @property
    def needs_gpu_slot(self) -> bool:
        """Takes this machine's accelerator slot: a ``uses_gpu`` kind running here (not a coordinator)."""
        return self.uses_gpu and not self.fans_out

    @property
    def step(self) -> int | None:
        s = self.progress_info.get("step")
        return int(s) if s is not None else None

    @property
    def total(self) -> int | None:
        t = self.progress_info.get("total")
        return int(t) if t is not None else None

    @property
    def eta_s(self) -> float | None:
        e = self.progress_info.get("eta_s")
        return float(e) if e is not None and self.state in ACTIVE else None

    def progress_text(self) -> str:
        """``running · step 12/30 (40%) · ETA 0:41`` - what a progress bar or a list shows."""
        head = self.state
        if self.executor != "local" and self.state == QUEUED:     # on Slurm, or a coordinator waiting here
            # "queued on gpu-cluster (Slurm: Resources)": why the cluster has not started it yet
            head = f"queued on {self.executor}" + (f" (Slurm: {self.remote_reason})" if self.remote_reason else "")
        elif self.executor != "local" and self.state in ACTIVE:     # on Slurm, or fanning out to it
            head = f"{self.state} on {self.executor}"
        parts = [head + (f" (attempt {self.attempt})" if self.attempt > 1 else "")]
        if self.step is not None:
            parts.append(f"step {self.step}/{self.total}" if self.total else f"step {self.step}")
        parts.append(f"{100 * self.progress:.0f}%")
        if self.eta_s is not None:
            parts.append(f"ETA {fmt_duration(self.eta_s)}")
        phase = self.progress_info.get("phase")
        if phase and self.state in ACTIVE:
            parts.append(str(phase))
        return " · ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """The JSON the CLI prints (``--json``) and the studio reads."""
        return {
            "id": self.id, "kind": self.kind, "state": self.state, "attempt": self.attempt,
            "progress": round(self.progress, 4), "step": self.step, "total": self.total, "eta_s": self.eta_s,
            "pid": self.pid, "run": self.run, "error": self.error, "owner": self.owner,
            "executor": self.executor, "remote_id": self.remote_id, "remote_folder": self.remote_folder,
            "remote_reason": self.remote_reason,
            "uses_gpu": self.uses_gpu, "last_checkpoint": self.last_checkpoint, "log": self.log_path,
            "progress_info": self.progress_info, "result": self.result, "config": self.config,
            "stop_requested": self.stop_requested_at is not None,
            "created_at": iso(self.created_at), "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at), "heartbeat_at": iso(self.heartbeat_at),
        }


@dataclass(frozen=True)
class JobEvent:
    """One line of a job's append-only event log."""

    id: int
    job_id: str
    attempt: int
    event: str
    state: str
    detail: dict[str, Any]
    at: float


def at_step(job: Job) -> str:
    """`` at step 12`` when the job reported a step, else ""."""
    return f" at step {job.step}" if job.step is not None else ""
