"""Out-of-process jobs: a durable ledger in SQLite, a supervisor that owns the accelerator, heartbeats, stop,
reconcile and resume, behind one ``Executor`` seam.

Why this shape (see /work/shared/NOTES.md "Jobs"): a trainer that runs inside the web server dies with it, and
a ledger without a liveness check leaves crashed jobs ``running`` forever and blocks the queue. By role:

* :mod:`.records`: the states, ``Job`` (a row) and ``JobEvent`` (its append-only log), formatting helpers;
* :mod:`.process`: process identity (pid + start time + boot id; zombies count as gone) and group signals;
* :mod:`.kinds`: ``register_kind``/``job_kinds``; the stages' kinds come by name from
  :mod:`medart_core.job_registry`, so nothing here imports a stage;
* :mod:`.ledger`: ``JobLedger`` over ``W/jobs.sqlite`` (WAL): every state change writes the event and the
  row in one transaction, with one public method per write of the supervisor and of the job process;
* :mod:`.runner`: the job process (``python -m medart_core.jobs _run W ID ATTEMPT``, its own session, output
  appended to ``W/jobs/<id>/log.txt``): ``JobContext``, the heartbeat/progress/stop-flag thread, the final
  state, SIGTERM/SIGINT as a stop;
* :mod:`.supervisor`: ``python -m medart_core worker`` (one per workspace, an flock): schedules, escalates
  stops (flag, SIGTERM, SIGKILL), reconciles dead or silent jobs to ``interrupted``;
* :mod:`.channel`: how a job process reports (``LedgerChannel`` here; ``FileChannel``: atomic JSON files in
  ``W/jobs/<id>/attempt-<n>/`` for a job on a Slurm node, which must not write SQLite on a shared mount);
* :mod:`.slurm_bridge`: the supervisor's Slurm side: submits queued jobs of a named Slurm executor through
  submitit, writes their stop flag, polls ``squeue``/``scontrol`` every ``SlurmBridge.POLL_S`` and ingests
  the attempt's files into the ledger; :mod:`.remote`: the job on the node (``RemoteAttempt``, requeued by
  submitit's checkpointing on a time limit or a preemption);
* :mod:`.executor`: ``Executor``/``LocalExecutor``, the only door the studio and the CLI use (``submit(...,
  executor=NAME)``, ``resume(..., executor=NAME)``); ``wait_for``;
* :mod:`.sleep`: the ``sleep`` diagnostic kind. The ``train`` kind lives in :mod:`medart_core.train_job`.

**Resume** of an ``interrupted``/``stopped``/``failed`` job queues a new *attempt of the same job* (same id,
``attempt + 1``, a ``resumed`` event); for ``train`` it continues bitwise-exactly from the run's latest
checkpoint. The ledger must live on a local disk (SQLite WAL needs shared memory; not a network mount).
"""
from __future__ import annotations

from .channel import request_sample, sample_request_path, take_sample_request
from .executor import Executor, LocalExecutor, wait_for
from .kinds import _KINDS, JobKind, get_kind, job_kinds, register_kind, resolve_target, resume_hint
from .ledger import BUSY_TIMEOUT_MS, SCHEMA_VERSION, JobLedger
from .process import boot_id, process_alive, process_start_token, signal_group
from .records import (
    ACTIVE,
    DONE,
    FAILED,
    FINAL,
    INTERRUPTED,
    QUEUED,
    RESUMABLE,
    RUNNING,
    STATES,
    STOPPED,
    STOPPING,
    Job,
    JobEvent,
    fmt_duration,
    iso,
    jobs_dir,
    tail_text,
)
from .runner import (
    FLAG_POLL_S,
    HEARTBEAT_S,
    START_WAIT_S,
    JobContext,
    JobFailed,
    describe_failure,
    is_cuda_oom,
    is_host_oom,
    run_job_process,
)
from .sleep import prepare_sleep, run_sleep_job
from .supervisor import REPO_ROOT, Supervisor, ensure_supervisor, supervisor_log_path, supervisor_pid

__all__ = [
    "QUEUED", "RUNNING", "STOPPING", "DONE", "FAILED", "INTERRUPTED", "STOPPED", "STATES", "ACTIVE", "FINAL",
    "RESUMABLE", "SCHEMA_VERSION", "BUSY_TIMEOUT_MS", "HEARTBEAT_S", "FLAG_POLL_S", "START_WAIT_S", "REPO_ROOT",
    "Job", "JobEvent", "iso", "fmt_duration", "jobs_dir", "tail_text",
    "boot_id", "process_start_token", "process_alive", "signal_group",
    "JobKind", "register_kind", "job_kinds", "get_kind", "resolve_target", "resume_hint", "_KINDS",
    "JobLedger", "JobContext", "JobFailed", "describe_failure", "is_cuda_oom", "is_host_oom", "run_job_process",
    "Supervisor", "ensure_supervisor", "supervisor_pid", "supervisor_log_path",
    "Executor", "LocalExecutor", "wait_for", "request_sample", "sample_request_path", "take_sample_request", "prepare_sleep", "run_sleep_job",
]
