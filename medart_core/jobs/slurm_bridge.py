"""The supervisor's Slurm side (issue 17 §2): jobs whose row names a Slurm executor are submitted, polled and
ingested here, inside the one scheduler loop (:class:`~.supervisor.Supervisor`), so the ledger stays the
source of truth and ``ctx.executor`` stays the only door.

One round (``SlurmBridge.tick``, every supervisor tick; Slurm itself is asked at most every ``POLL_S``):

* **submit**: a queued row with no Slurm id gets ``job.json`` in its attempt folder, is handed to
  ``slurm.submit`` (no local slot limit: the cluster schedules), and its Slurm id and submitit folder are
  recorded on the row with an event in one transaction. sbatch refusing it fails the job with Slurm's words.
* **stop**: the stop-flag *file* first (the job checkpoints at its next step and writes ``stopped``); a job
  still pending is cancelled at once; ``slurm.cancel`` after ``stop_grace_s`` if it is still there.
* **poll**: ONE ``slurm.poll`` for every remote job in flight, then each attempt's files (read after Slurm's
  answer, so a final record written just before the job left the queue is never missed): heartbeat and
  progress, new checkpoints (events), the final record (stands as written), else ``slurm.map_state``:
  PENDING -> queued with the reason shown, RUNNING -> running, CANCELLED behind our back / TIMEOUT /
  PREEMPTED / NODE_FAIL / gone -> ``interrupted``, OUT_OF_MEMORY -> ``failed`` with the cause.

A Slurm that does not answer changes nothing (``SlurmError`` is logged; "no answer" never reads as "gone").
"""
from __future__ import annotations

import os
import signal
import time
from typing import Callable

from ..errors import MedArtError
from ..workspace import Workspace
from .channel import SLURM_DIR, attempt_dir, read_remote, request_stop_file, write_job_file
from .ledger import JobLedger
from .records import ACTIVE, FAILED, INTERRUPTED, QUEUED, STOPPED, STOPPING, Job
from .records import now as _now

_SIGNAL_CAUSES = {"SIGTERM", "SIGINT"}


def _poll_interval() -> float:
    # Tests run the supervisor as a subprocess: the environment is how they shorten it.
    try:
        return float(os.environ.get("MEDART_SLURM_POLL_S", "") or SlurmBridge.POLL_S)
    except ValueError:
        return SlurmBridge.POLL_S


class SlurmBridge:
    """Submits, steers and polls the remote jobs of one workspace for its supervisor."""

    POLL_S = 3.0    # at most one squeue (+ scontrol for the ids it no longer lists) per this many seconds

    def __init__(self, ws: Workspace, ledger: JobLedger, say: Callable[[str], None], *, stop_grace_s: float = 60.0):
        self.ws, self.ledger, self.say = ws, ledger, say
        self.stop_grace_s = float(stop_grace_s)
        self.poll_s = _poll_interval()
        self._last_poll = float("-inf")

    # ---- one round ---------------------------------------------------------------------------------------
    def tick(self) -> None:
        remote = [j for j in self.ledger.list(states=(QUEUED,) + ACTIVE) if j.is_remote]
        if not remote:
            return
        for job in remote:
            if job.state == QUEUED and job.remote_id is None:
                self._submit(job)
            elif job.state == STOPPING:
                self._stop(job)
        if time.monotonic() - self._last_poll >= self.poll_s:
            self._last_poll = time.monotonic()
            self.poll()

    def _submit(self, job: Job) -> None:
        from .. import executors, slurm
        from .remote import RemoteAttempt

        try:
            spec = executors.get_executor_spec(self.ws, job.executor)
            if spec.settings is None:
                raise MedArtError(f"Executor {job.executor!r} is not a Slurm executor.")
            folder = attempt_dir(self.ws, job.id, job.attempt)
            write_job_file(folder, job)
            remote_id, sub = slurm.submit(spec.settings, folder / SLURM_DIR, RemoteAttempt(), str(self.ws.root),
                                          job.id, job.attempt)
        except MedArtError as e:
            if self.ledger.remote_failed_to_submit(job.id, job.attempt, f"Could not submit to {job.executor}: {e}"):
                self.say(f"{job.id}: submit to {job.executor} failed: {e}")
            return
        if self.ledger.remote_submitted(job.id, job.attempt, remote_id, str(sub)):
            self.say(f"submitted {job.id} ({job.kind}) attempt {job.attempt} to {job.executor} as Slurm job "
                     f"{remote_id}")
        else:        # stopped or superseded while sbatch ran: do not leave it running there
            slurm.cancel(remote_id)

    def _stop(self, job: Job) -> None:
        from .. import slurm

        folder = attempt_dir(self.ws, job.id, job.attempt)
        if request_stop_file(folder):
            self.say(f"{job.id}: stop flag written for Slurm job {job.remote_id}")
        if job.remote_id is None or job.stop_requested_at is None or job.term_sent_at is not None:
            return
        if _now() - job.stop_requested_at > self.stop_grace_s:
            self.say(f"{job.id}: no stop after {self.stop_grace_s:.0f} s; scancel {job.remote_id}")
            try:
                slurm.cancel(job.remote_id)
            except slurm.SlurmError as e:
                self.say(f"{job.id}: {e}")
                return
            self.ledger.signal_sent(job.id, job.attempt, signal.SIGTERM)

    # ---- poll and ingest ---------------------------------------------------------------------------------
    def poll(self) -> None:
        """One Slurm query for every remote attempt in flight, then each attempt's files into the ledger."""
        from .. import slurm

        jobs = [j for j in self.ledger.list(states=(QUEUED,) + ACTIVE) if j.is_remote and j.remote_id]
        if not jobs:
            return
        try:
            statuses = slurm.poll([j.remote_id for j in jobs])
        except slurm.SlurmError as e:
            self.say(f"Slurm did not answer ({e}); states unchanged")
            return
        for job in jobs:
            try:
                self._ingest(job, statuses[job.remote_id])
            except MedArtError as e:
                self.say(f"{job.id}: {e}")

    def _ingest(self, job: Job, st) -> None:
        from .. import slurm

        folder = attempt_dir(self.ws, job.id, job.attempt)
        rep = read_remote(folder)           # after Slurm's answer: a final record is never missed
        mapped, message = slurm.map_state(st.state, st.reason, rep.final is not None, st.exit_code)
        slurm_state = slurm.base_state(st.state)
        if job.state == QUEUED and (mapped != QUEUED or rep.final is not None):
            if self.ledger.remote_running(job.id, job.attempt):
                self.say(f"{job.id}: running on {job.executor} (Slurm job {job.remote_id})")
        if mapped != QUEUED or rep.final is not None:      # it ran: take its heartbeat, progress, checkpoints
            self._ingest_progress(job, rep)
        if rep.final is not None:
            self._finish(job, rep.final, slurm_state)
            return
        if mapped == QUEUED:
            if job.state == STOPPING and slurm_state == "PENDING":
                slurm.cancel(job.remote_id)        # never started: nothing to checkpoint
            else:
                reason = st.reason if st.reason and st.reason != "None" else slurm_state
                self.ledger.remote_pending(job.id, job.attempt, reason)
        elif mapped in (FAILED, INTERRUPTED):
            if self.ledger.remote_gone(job.id, job.attempt, mapped, message, slurm_state=slurm_state):
                self.say(f"{job.id}: Slurm job {job.remote_id} {slurm_state or 'gone'} -> "
                         f"{self.ledger.get(job.id).state}")

    def _ingest_progress(self, job: Job, rep) -> None:
        if rep.heartbeat_at is not None or rep.progress is not None:
            self.ledger.remote_beat(job.id, job.attempt, rep.heartbeat_at, rep.progress, rep.info)
        seen = sum(1 for e in self.ledger.events(job.id) if e.event == "checkpoint" and e.attempt == job.attempt)
        for ck in rep.checkpoints[seen:]:
            self.ledger.checkpoint(job.id, job.attempt, str(ck.get("path")), ck.get("step"))

    def _finish(self, job: Job, final: dict, slurm_state: str) -> None:
        from .. import slurm

        state = final.get("state")
        detail = dict(final.get("detail") or {}, remote_id=job.remote_id)
        cause = str(detail.get("cause") or "")
        current = self.ledger.get(job.id)
        if state == STOPPED and current.state != STOPPING and cause in _SIGNAL_CAUSES:
            # Slurm signalled it (scancel behind our back, or a node going down): resumable, not "stopped".
            _, message = slurm.map_state(slurm_state if slurm_state not in ("", "RUNNING", "COMPLETING")
                                         else "CANCELLED", "", False)
            if self.ledger.remote_gone(job.id, job.attempt, INTERRUPTED, message, slurm_state=slurm_state):
                self.say(f"{job.id}: stopped by a Slurm signal ({cause}) -> interrupted")
            return
        if self.ledger.finish(job.id, job.attempt, str(state), error=final.get("error"), result=final.get("result"),
                              progress=final.get("progress"), info=final.get("info"), detail=detail):
            self.say(f"{job.id} attempt {job.attempt} on {job.executor}: {state}")
