"""The Executor seam: where jobs run, and the only door to them. The studio and the CLI submit, steer and
read jobs through its verbs; ``LocalExecutor`` runs them on this machine under the supervisor (spawned on
demand), and a cluster backend (Slurm through submitit, Ray Jobs) implements the same verbs.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Any, Protocol, Sequence

from ..errors import MedArtError
from ..workspace import Workspace
from .ledger import JobLedger
from .records import FINAL, STOPPING, Job, JobEvent
from .supervisor import ensure_supervisor


class _Readable(Protocol):
    def get(self, job_id: str) -> Job: ...


class Executor(ABC):
    """Where jobs run, and the only door to them: the studio and the CLI submit, steer **and read** jobs
    through these verbs (a cluster backend such as Slurm through submitit implements the same ones). The
    ledger behind them stays the source of truth."""

    # ---- steering
    @abstractmethod
    def submit(self, kind: str, config: dict[str, Any], *, owner: str | None = None,
               executor: str = "local") -> Job: ...

    @abstractmethod
    def stop(self, job_id: str) -> Job: ...

    def sample_now(self, job_id: str) -> Job:
        """Ask a running ``train`` job to render its validation prompts at its next step (it goes on
        training); the grid shows in the job's progress (``validation_grid``) and ``metrics.jsonl``."""
        from .channel import request_sample

        job = self.get(job_id)
        request_sample(self.ws, job)
        return job

    @abstractmethod
    def resume(self, job_id: str, *, max_steps: int | None = None, owner: str | None = None,
               executor: str | None = None) -> Job: ...

    # ---- reading
    @abstractmethod
    def get(self, job_id: str) -> Job:
        """The job's row (MedArtError if there is none)."""

    @abstractmethod
    def list(self, *, states: Sequence[str] | None = None, kind: str | None = None, owner: str | None = None,
             run: str | None = None, limit: int | None = None) -> list[Job]:
        """Jobs, newest first, filtered."""

    @abstractmethod
    def events(self, job_id: str) -> list[JobEvent]:
        """The job's append-only event log, oldest first."""

    @abstractmethod
    def log_tail(self, job_id: str, lines: int = 40) -> str:
        """The last ``lines`` lines of the job's own log."""

    @abstractmethod
    def error_report(self, job: Job | str, lines: int = 20) -> str:
        """A failed or interrupted job's cause in one sentence with the log tail below ("" when none)."""

    @abstractmethod
    def refresh(self) -> list[Job]:
        """Bring states up to date with what is really running (a vanished process: ``interrupted``);
        returns the jobs changed."""

    # ---- kept names
    def status(self, job_id: str) -> Job:
        return self.get(job_id)

    def logs(self, job_id: str, lines: int = 200) -> str:
        self.get(job_id)
        return self.log_tail(job_id, lines)

    def close(self) -> None:
        """Release what this executor holds (a backend without connections has nothing to release)."""


class LocalExecutor(Executor):
    """Jobs on this machine, supervised by ``python -m medart_core worker`` (spawned on demand), and jobs of
    the workspace's named Slurm executors (``executor=NAME``), which that same supervisor submits through
    submitit and polls: one door, one ledger, whichever executor runs the job."""

    def __init__(self, ws: Workspace, *, start_supervisor: bool = True, idle_exit_s: float | None = None):
        self.ws = ws
        self.ledger = JobLedger(ws)
        self.start_supervisor = start_supervisor
        self.idle_exit_s = idle_exit_s

    def _ensure(self) -> None:
        if self.start_supervisor:
            ensure_supervisor(self.ws, idle_exit_s=self.idle_exit_s)

    def _executor_name(self, name: str) -> str:
        """``name`` checked against the workspace's executors (NotFoundError listing the known ones)."""
        from ..executors import get_executor_spec

        return get_executor_spec(self.ws, name).name

    def submit(self, kind: str, config: dict[str, Any], *, owner: str | None = None,
               executor: str = "local") -> Job:
        job = self.ledger.submit(kind, config, owner=owner, executor=self._executor_name(executor))
        self._ensure()
        return job

    def stop(self, job_id: str) -> Job:
        job = self.ledger.request_stop(job_id)
        if job.state == STOPPING:
            self._ensure()       # someone must escalate if the job ignores the flag
        return job

    def resume(self, job_id: str, *, max_steps: int | None = None, owner: str | None = None,
               executor: str | None = None) -> Job:
        """A new attempt; ``executor`` None: where the last one ran, a name: move the attempt there."""
        where = self._executor_name(executor) if executor is not None else None
        job = self.ledger.resume(job_id, max_steps=max_steps, owner=owner, executor=where)
        self._ensure()
        return job

    def get(self, job_id: str) -> Job:
        return self.ledger.get(job_id)

    def list(self, *, states: Sequence[str] | None = None, kind: str | None = None, owner: str | None = None,
             run: str | None = None, limit: int | None = None) -> list[Job]:
        return self.ledger.list(states=states, kind=kind, owner=owner, run=run, limit=limit)

    def events(self, job_id: str) -> list[JobEvent]:
        return self.ledger.events(job_id)

    def log_tail(self, job_id: str, lines: int = 40) -> str:
        return self.ledger.log_tail(job_id, lines)

    def error_report(self, job: Job | str, lines: int = 20) -> str:
        return self.ledger.error_report(job, lines)

    def refresh(self) -> list[Job]:
        return self.ledger.reconcile()

    def close(self) -> None:
        self.ledger.close()


def wait_for(jobs: Executor | _Readable, job_id: str, states: Sequence[str] = FINAL, timeout_s: float = 600.0,
             poll_s: float = 0.2) -> Job:
    """Block until the job reaches one of ``states`` (MedArtError on timeout). ``jobs``: an Executor, or
    anything with ``get(job_id)`` (a ledger)."""
    deadline = time.monotonic() + timeout_s
    while True:
        job = jobs.get(job_id)
        if job.state in states:
            return job
        if time.monotonic() > deadline:
            raise MedArtError(f"Job {job_id} is still {job.state} after {timeout_s:.0f} s.")
        time.sleep(poll_s)
