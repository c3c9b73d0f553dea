"""Inside the job process: ``run_job_process`` (the body of ``python -m medart_core.jobs _run W ID ATTEMPT``),
the ``JobContext`` a kind's function gets, the ``_Pulse`` thread that writes heartbeat and progress and reads
the stop flag (so the training loop itself never waits on SQLite), and the one-sentence failure messages.

A job process that receives SIGTERM or SIGINT (Ctrl-C) sets the same flag a stop request does: training
checkpoints at its next step boundary and the job ends ``stopped``. A second signal ends it at once.

Every write goes through a :class:`~.channel.JobChannel`: the ledger for a job on this machine, atomic files
in its attempt folder for a job on a Slurm node (:mod:`.remote`), which must not write SQLite.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from typing import Any

from ..errors import MedArtError
from ..workspace import Workspace
from .channel import JobChannel, LedgerChannel
from .kinds import resolve_target
from .ledger import JobLedger
from .records import ACTIVE, DONE, FAILED, FINAL, STOPPED, Job

HEARTBEAT_S = 2.0          # job process -> row.heartbeat_at
FLAG_POLL_S = 0.5          # how often the job process reads the stop flag / flushes progress
START_WAIT_S = 30.0        # a job process waits this long for the supervisor to record its pid


class JobContext:
    """What a kind's ``run_fn`` gets: the workspace, the job, and the calls to report progress and to learn
    that it should stop. Progress is buffered in memory and written by a background thread."""

    def __init__(self, ledger: JobLedger | JobChannel, job: Job, *, ws: Workspace | None = None):
        if isinstance(ledger, JobChannel):           # a remote job: files, no ledger
            self.ledger, self.channel = None, ledger
            if ws is None:
                raise TypeError("JobContext over a channel needs the workspace (ws=...)")
            self.ws = ws
        else:
            self.ledger, self.channel = ledger, LedgerChannel(ledger, job.id, job.attempt)
            self.ws = ledger.ws
        self.job = job
        self.attempt = job.attempt
        self.config = job.config
        self._lock = threading.Lock()
        self._info: dict[str, Any] = dict(job.progress_info)
        self._info.pop("eta_s", None)    # the previous attempt's pace says nothing about this one
        self._progress: float = job.progress
        self._dirty = False
        self._stop_flag = False          # from the DB (a stop request) or a lost row
        self._lost = False
        self.signal_name: str | None = None
        self._t0: float | None = None
        self._step0 = 0
        # Set by the remote runner: this attempt started before (a Slurm requeue), so it continues too.
        self.restarted = False
        self.requeue_requested = False   # submitit's time-limit/preemption signal: checkpoint, no final record

    @property
    def resumed(self) -> bool:
        """A later attempt, or the same attempt started again by Slurm: continue, do not start over."""
        return self.attempt > 1 or self.restarted

    @property
    def run(self) -> str | None:
        return self.job.run

    def log(self, msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)

    def should_stop(self) -> bool:
        """True once a stop was asked (DB flag, read every 0.5 s in the background), SIGTERM/SIGINT arrived, or
        another attempt took over the row. Cheap: no I/O."""
        return self._stop_flag or self.signal_name is not None or self._lost or self.requeue_requested

    def progress(self, step: int | None = None, total: int | None = None, **info: Any) -> None:
        """Report progress; ``eta_s`` is derived from the pace since the first report of this attempt."""
        now = time.monotonic()
        with self._lock:
            if total is not None:
                self._info["total"] = int(total)
            if step is not None:
                step = int(step)
                if self._t0 is None:
                    self._t0, self._step0 = now, step
                self._info["step"] = step
                tot = self._info.get("total")
                if tot:
                    self._progress = min(1.0, step / tot)
                    done = step - self._step0
                    if done > 0:
                        self._info["eta_s"] = round((tot - step) * (now - self._t0) / done, 1)
            self._info.update(info)
            self._dirty = True

    def set_info(self, **info: Any) -> None:
        with self._lock:
            self._info.update(info)
            self._dirty = True

    def checkpoint(self, path: str | os.PathLike, step: int | None = None) -> None:
        """Record a checkpoint now (an event plus ``last_checkpoint``)."""
        self.channel.checkpoint(str(path), step)

    # ---- used by the runner ------------------------------------------------------------------------------
    @property
    def lost(self) -> bool:
        """True once another attempt took over the row (or the row left the active states)."""
        return self._lost

    def update_flags(self, ours: bool, stop: bool) -> None:
        """What the pulse read from the row: whether it is still this attempt's, and whether to stop."""
        self._lost = not ours
        self._stop_flag = stop

    def snapshot(self) -> tuple[float, dict[str, Any], bool]:
        """(progress, info, changed since the last snapshot): what the pulse writes to the row."""
        with self._lock:
            dirty, self._dirty = self._dirty, False
            return self._progress, dict(self._info), dirty


class _Pulse(threading.Thread):
    """Heartbeat, progress flush and stop-flag poll of one job process."""

    def __init__(self, ctx: JobContext):
        super().__init__(name="job-pulse", daemon=True)
        self.ctx = ctx
        self.halt = threading.Event()

    def run(self) -> None:
        ctx, last_beat = self.ctx, 0.0
        ch = ctx.channel.for_thread()   # own connection in this thread
        while not self.halt.wait(FLAG_POLL_S):
            try:
                progress, info, dirty = ctx.snapshot()
                now = time.monotonic()
                if dirty or now - last_beat >= HEARTBEAT_S:
                    ours, stop = ch.beat(progress if dirty else None, info if dirty else None)
                    last_beat = now
                else:
                    ours, stop = ch.read_flags()
                ctx.update_flags(ours, stop)
            except Exception as e:  # a busy DB must not kill the job; the next pulse retries
                print(f"[jobs] heartbeat failed: {e}", file=sys.stderr, flush=True)
        ch.close()


class JobFailed(MedArtError):
    """A job ended with a failure whose message names the cause (raised by kinds for the user to see)."""


def describe_failure(exc: BaseException) -> str:
    """One sentence naming the cause: a MedArtError's own message, else the exception type and message."""
    if isinstance(exc, MedArtError):
        return str(exc)
    if isinstance(exc, MemoryError) or is_host_oom(exc):
        return "Out of host memory (RAM): lower batch_size or resolution, or close other programs."
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"Unexpected {type(exc).__name__}: {first} (a bug; the traceback is in the log below)."


def is_cuda_oom(exc: BaseException) -> bool:
    """A CUDA out-of-memory error (torch's ``OutOfMemoryError``, or the RuntimeError of older versions)."""
    return type(exc).__name__ == "OutOfMemoryError" or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower() and "cuda" in str(exc).lower())


def is_host_oom(exc: BaseException) -> bool:
    """The host (RAM) allocation failure torch raises as a RuntimeError."""
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc).lower()


def run_job_process(ws: Workspace, job_id: str, attempt: int) -> int:
    """Body of the job process: wait for the supervisor's row, run the kind, write the final state."""
    ledger = JobLedger(ws)
    deadline = time.monotonic() + START_WAIT_S
    while True:
        job = ledger.get(job_id)
        if job.attempt == attempt and job.state in ACTIVE and job.pid == os.getpid():
            break
        if job.attempt != attempt or job.state in FINAL or time.monotonic() > deadline:
            print(f"[jobs] job {job_id} attempt {attempt} is not assigned to this process (pid {os.getpid()}; row: "
                  f"attempt {job.attempt}, {job.state}, pid {job.pid}); exiting.", file=sys.stderr, flush=True)
            return 3
        time.sleep(0.05)
    return execute(JobContext(ledger, job))


def install_stop_signals(ctx: JobContext) -> None:
    """SIGTERM/SIGINT set the stop flag (checkpoint at the next safe point); a second one ends the process."""
    def on_signal(signum, frame):
        if ctx.signal_name is not None:          # second signal: stop now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        ctx.signal_name = signal.Signals(signum).name
        print(f"[jobs] {ctx.signal_name} received: stopping at the next safe point (again to stop now)",
              file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def _fan_out_target(job: Any) -> str | None:
    if not job.fans_out:
        return None
    from .kinds import job_kinds

    return job_kinds()[job.kind].fans_out


def execute(ctx: JobContext, *, signals: bool = True) -> int:
    """Run the kind's function under the pulse and write the final record through the context's channel
    (none when a Slurm requeue interrupted it: the same attempt starts again). ``signals``: install the
    stop handlers (only possible on the main thread)."""
    job, job_id, attempt = ctx.job, ctx.job.id, ctx.attempt
    if signals:
        install_stop_signals(ctx)
    pulse = _Pulse(ctx)
    pulse.start()
    print(f"===== job {job_id} ({job.kind}) attempt {attempt}, pid {os.getpid()}, "
          f"{time.strftime('%Y-%m-%d %H:%M:%S')} =====", flush=True)
    state, error, result, detail = DONE, None, None, {}
    try:
        # A fan-out kind on a Slurm executor runs its coordinator here instead (medart_core.fanout)
        fn = resolve_target(_fan_out_target(job) or job.target)
        result = fn(ctx) or {}
        if not isinstance(result, dict):
            result = {"value": result}
        if result.get("status") == "stopped":
            state = STOPPED
            detail["cause"] = ctx.signal_name or ("lost" if ctx.lost else "stop request")
    except BaseException as e:  # noqa: BLE001 - every end is recorded, then the code is the exit status
        state, error = FAILED, describe_failure(e)
        if not isinstance(e, MedArtError) or e.__cause__ is not None:
            traceback.print_exc()
        print(f"[jobs] failed: {error}", file=sys.stderr, flush=True)
    finally:
        pulse.halt.set()
        pulse.join(timeout=5)
    progress, info, _ = ctx.snapshot()
    if ctx.requeue_requested and state != FAILED:
        ctx.channel.beat(progress, info)
        print(f"===== job {job_id} attempt {attempt}: checkpointed for a Slurm requeue =====", flush=True)
        return 0
    if state == DONE:
        progress = 1.0
        info.pop("eta_s", None)
    info.pop("phase", None)
    ctx.channel.finish(state, error=error, result=result, progress=progress, info=info, detail=detail)
    print(f"===== job {job_id} attempt {attempt}: {state}{': ' + error if error else ''} =====", flush=True)
    return 1 if state == FAILED else 0
