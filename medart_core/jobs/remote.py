"""The job on a Slurm node: ``run_remote(ws_root, job_id, attempt)`` is what submitit pickles (by reference:
the node imports ``medart_core``) and runs, wrapped in ``RemoteAttempt`` so that a time limit or a preemption
requeues the same attempt instead of losing it.

The node never opens the SQLite ledger (the workspace is on a shared filesystem; SQLite's locking is unsafe
there): it reads the row the supervisor handed over (``job.json``), reports through a
:class:`~.channel.FileChannel` into ``W/jobs/<id>/attempt-<n>/`` and appends its output to the job's own
log ``W/jobs/<id>/log.txt``, as a local job does.

**Requeue** (issue 17 §2): Slurm sends ``USR2`` ``signal_delay_s`` (90 s) before the time limit, and on a
preemption; submitit's handler calls ``RemoteAttempt.checkpoint``. That method asks the job to stop at its
next step boundary (training writes a complete checkpoint), waits for it, and returns a
``DelayedSubmission`` of the same attempt; submitit requeues the Slurm job, and when it starts again the
attempt counts a second start (``starts.json``), so ``ctx.resumed`` is true and training continues bitwise
from that checkpoint. The job runs in a worker thread for this: the signal arrives on the main thread,
which can then wait for the training thread to reach its step boundary.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from submitit.helpers import Checkpointable, DelayedSubmission

from ..workspace import Workspace
from .channel import FileChannel, attempt_dir, count_start, read_job_file, read_remote
from .runner import JobContext, execute

CHECKPOINT_WAIT_S = 75.0   # below submitit's signal_delay_s (90 s): the requeue must happen before the kill


def _redirect_output(log_path: str) -> None:
    """The job's own log, as for a local job; Slurm's stdout/stderr keep what ran before this line."""
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


class RemoteAttempt(Checkpointable):
    """What submitit pickles (by reference: a module-level class) and calls on the node; on USR2 submitit
    calls ``checkpoint`` and requeues what it returns."""

    def __init__(self) -> None:
        self._ctx: JobContext | None = None
        self._worker: threading.Thread | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {}          # the live context and thread stay on the node; a requeue starts a fresh one

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()

    def __call__(self, ws_root: str, job_id: str, attempt: int) -> dict[str, Any]:
        ws = Workspace.open(ws_root)
        folder = attempt_dir(ws, job_id, attempt)
        job = read_job_file(folder)
        starts = count_start(folder)
        _redirect_output(job.log_path)
        if starts > 1:         # requeued by Slurm: continue where the last start reported
            rep = read_remote(folder)
            job.progress_info = dict(rep.info or job.progress_info)
            job.progress = float(rep.progress if rep.progress is not None else job.progress)
            print(f"[jobs] Slurm started attempt {attempt} again (start {starts}); continuing", flush=True)
        ctx = JobContext(FileChannel(folder), job, ws=ws)
        ctx.restarted = starts > 1
        self._ctx = ctx
        rc: dict[str, int] = {}

        def work() -> None:
            rc["rc"] = execute(ctx, signals=False)

        # SIGTERM/SIGINT (scancel, Ctrl-C on srun) ask for a stop at the next step, as on this machine.
        def on_term(signum: int, frame: object) -> None:
            if ctx.signal_name is None:
                ctx.signal_name = signal.Signals(signum).name
                print(f"[jobs] {ctx.signal_name} received: stopping at the next safe point", flush=True)

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        self._worker = threading.Thread(target=work, name="medart-job", daemon=True)
        self._worker.start()
        while self._worker.is_alive():
            self._worker.join(0.2)     # short joins: signal handlers run on this (main) thread
        return {"job": job_id, "attempt": attempt, "rc": rc.get("rc", 1)}

    def checkpoint(self, ws_root: str, job_id: str, attempt: int) -> DelayedSubmission | None:  # type: ignore[override]
        """Called by submitit on USR2 (time limit near, or preemption): checkpoint, then requeue this attempt."""
        ctx, worker = self._ctx, self._worker
        if ctx is not None and worker is not None and worker.is_alive():
            ctx.requeue_requested = True
            print("[jobs] Slurm time limit or preemption: checkpointing for a requeue", flush=True)
            end = time.monotonic() + CHECKPOINT_WAIT_S
            while worker.is_alive() and time.monotonic() < end:
                worker.join(0.2)
        if read_remote(attempt_dir(Workspace.open(ws_root), job_id, attempt)).final is not None:
            return None        # it ended on its own: nothing to requeue
        return DelayedSubmission(RemoteAttempt(), ws_root, job_id, attempt)


def run_remote(ws_root: str, job_id: str, attempt: int) -> dict[str, Any]:
    """The top-level, picklable body of a remote attempt (without the requeue-on-signal wrapper)."""
    return RemoteAttempt()(ws_root, job_id, attempt)
