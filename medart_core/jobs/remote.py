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

**Several tasks** (an executor with ``tasks_per_node``/``nodes`` above 1): srun starts this function once per
task. For a data-parallel kind (``train``) every task exports submitit's torch distributed environment
(MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK; accelerate then joins them: gloo on CPU, NCCL on GPUs) and
runs the kind; task 0 alone counts the start, writes the job's log and reports through the
:class:`~.channel.FileChannel`, the others get a :class:`~.channel.FollowerChannel` (no heartbeat, no final
record; their output stays in Slurm's per-task log) and wait for task 0's start record to learn whether this
start continues a requeued one. A stop reaches every task through training's collective stop decision;
submitit's requeue handler runs on task 0 only. Other kinds run on task 0 alone: the other tasks return.
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

from ..errors import MedArtError
from ..workspace import Workspace
from .channel import (FileChannel, FollowerChannel, attempt_dir, count_start, read_job_file, read_remote,
                      read_start)
from .runner import JobContext, execute

CHECKPOINT_WAIT_S = 75.0   # below submitit's signal_delay_s (90 s): the requeue must happen before the kill
START_WAIT_S = 300.0       # tasks 1+ wait this long for task 0 to record the start (a slow shared filesystem)
DATA_PARALLEL_KINDS = ("train",)   # kinds that run on every task of a multi-task job (torch distributed)


def slurm_task() -> tuple[int, int]:
    """(global rank, number of tasks) of this Slurm task; (0, 1) outside a submitit job."""
    from submitit import JobEnvironment

    try:
        env = JobEnvironment()
        return int(env.global_rank), int(env.num_tasks)
    except Exception:  # noqa: BLE001 - not in a job (a direct call): one task
        return 0, 1


def export_torch_distributed() -> str:
    """Export MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE for torch's env:// init
    (submitit's values: the first node, a port drawn from the job id); every GPU of the node stays visible
    (accelerate picks ``cuda:LOCAL_RANK``). Returns "addr:port"."""
    from submitit.helpers import TorchDistributedEnvironment

    d = TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    return f"{d.master_addr}:{d.master_port}"


def _start_key() -> str:
    # The same on every task of one start; a requeue (scontrol requeue) raises SLURM_RESTART_COUNT.
    return f"{os.environ.get('SLURM_JOB_ID', '')}:{os.environ.get('SLURM_RESTART_COUNT', '0')}"


def _wait_start(folder: Path, key: str, deadline_s: float = START_WAIT_S) -> int:
    """Tasks 1+: the start count task 0 recorded for this start."""
    end = time.monotonic() + deadline_s
    while True:
        n = read_start(folder, key)
        if n is not None:
            return n
        if time.monotonic() > end:
            raise MedArtError(f"Task 0 of this Slurm job did not record its start in {folder} within "
                              f"{deadline_s:.0f} s; its Slurm log (task 0) says why.")
        time.sleep(0.2)


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
        rank, world = slurm_task()
        parallel = world > 1 and job.kind in DATA_PARALLEL_KINDS
        key = _start_key()
        if rank == 0:
            starts = count_start(folder, key)
            _redirect_output(job.log_path)
        elif not parallel:     # a kind that runs on one task: the others have nothing to do
            print(f"[jobs] Slurm task {rank} of {world}: {job.kind} runs on task 0 alone", flush=True)
            return {"job": job_id, "attempt": attempt, "rc": 0, "rank": rank}
        else:
            starts = _wait_start(folder, key)
        if parallel:
            where = export_torch_distributed()
            print(f"[jobs] Slurm task {rank} of {world}: data parallel over {world} processes "
                  f"(torch distributed at {where}, local rank {os.environ.get('LOCAL_RANK')})", flush=True)
        if starts > 1:         # requeued by Slurm: continue where the last start reported
            rep = read_remote(folder)
            job.progress_info = dict(rep.info or job.progress_info)
            job.progress = float(rep.progress if rep.progress is not None else job.progress)
            print(f"[jobs] Slurm started attempt {attempt} again (start {starts}); continuing", flush=True)
        ctx = JobContext(FileChannel(folder) if rank == 0 else FollowerChannel(folder), job, ws=ws)
        if parallel and rank == 0:
            ctx.set_info(world_size=world)
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
        return {"job": job_id, "attempt": attempt, "rc": rc.get("rc", 1), "rank": rank}

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
