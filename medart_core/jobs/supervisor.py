"""The supervisor (``python -m medart_core worker``, at most one per workspace: an ``flock`` on
``W/jobs/_supervisor.lock``, released by the kernel when it dies). It starts queued jobs when the accelerator
slot is free (one ``uses_gpu`` job at a time by default; CPU-light kinds beside it), escalates stops (flag,
then SIGTERM after ``stop_grace_s``, then SIGKILL of the group after ``kill_grace_s``), and reconciles: a
``running`` row whose process is gone or whose heartbeat is stale is marked ``interrupted``, never left
``running``. Every decision is read from the ledger, so a supervisor restarted mid-job reconnects to it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Callable, Sequence

from ..errors import MedArtError
from ..workspace import Workspace
from .ledger import JobLedger
from .process import process_start_token, signal_group
from .records import ACTIVE, QUEUED, STOPPING, Job, jobs_dir
from .slurm_bridge import SlurmBridge
from .records import now as _now

REPO_ROOT = Path(__file__).resolve().parents[2]


def _lock_path(ws: Workspace) -> Path:
    return jobs_dir(ws) / "_supervisor.lock"


def supervisor_log_path(ws: Workspace) -> Path:
    return jobs_dir(ws) / "_supervisor.log"


def _try_lock(path: Path) -> IO[str] | None:
    """An open file holding an exclusive flock, or None when another process holds it."""
    import fcntl

    f = open(path, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def supervisor_pid(ws: Workspace) -> int | None:
    """The pid of the live supervisor of this workspace, or None."""
    path = _lock_path(ws)
    f = _try_lock(path)
    if f is not None:               # nobody holds it
        f.close()
        return None
    for _ in range(50):             # the holder writes its pid right after locking
        try:
            text = path.read_text().strip()
            if text:
                return int(text.split()[0])
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    return None


class Supervisor:
    """Starts queued jobs into free slots, escalates stops, reconciles dead or silent job processes. Owns the
    accelerator: one ``uses_gpu`` job at a time by default (the slot is per machine)."""

    def __init__(self, ws: Workspace, *, gpu_slots: int = 1, cpu_slots: int = 2, poll_s: float = 0.5,
                 stop_grace_s: float = 60.0, kill_grace_s: float = 120.0, heartbeat_timeout_s: float = 120.0,
                 idle_exit_s: float | None = None, log: Callable[[str], None] | None = None):
        self.ws = ws
        self.ledger = JobLedger(ws)
        self.gpu_slots, self.cpu_slots = int(gpu_slots), int(cpu_slots)
        self.poll_s = float(poll_s)
        self.stop_grace_s, self.kill_grace_s = float(stop_grace_s), float(kill_grace_s)
        self.heartbeat_timeout_s = float(heartbeat_timeout_s)
        self.idle_exit_s = idle_exit_s
        self.say = log or (lambda m: print(f"{time.strftime('%H:%M:%S')} [supervisor] {m}", flush=True))
        self.children: dict[str, tuple[subprocess.Popen, int]] = {}
        # Jobs of Slurm executors: submitted, stopped and polled by the same loop (no local slot for them).
        self.remote = SlurmBridge(ws, self.ledger, self.say, stop_grace_s=self.stop_grace_s)
        self._halt = threading.Event()
        self._last_tick = time.monotonic()

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def run(self) -> int:
        """Run in the foreground until SIGTERM/SIGINT (jobs keep running; the next supervisor adopts them).
        Returns 0, also when another supervisor holds the workspace (this one then exits at once)."""
        lock = None
        for _ in range(20):      # a prober (supervisor_pid) holds the lock for microseconds: retry briefly
            lock = _try_lock(_lock_path(self.ws))
            if lock is not None:
                break
            time.sleep(0.05)
        if lock is None:
            self.say(f"another supervisor (pid {supervisor_pid(self.ws)}) runs for {self.ws.root}; exiting")
            return 0
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        started = _now()
        token = process_start_token(os.getpid())

        def halt(signum: int, frame: object) -> None:
            self._halt.set()

        old = {s: signal.signal(s, halt) for s in (signal.SIGTERM, signal.SIGINT)}
        self.say(f"pid {os.getpid()} supervising {self.ws.root} (gpu slots {self.gpu_slots}, cpu slots "
                 f"{self.cpu_slots})")
        try:
            for job in self.ledger.reconcile():
                self.say(f"reconciled {job.id} -> {job.state}: {job.error or ''}")
            idle_since = time.monotonic()
            last_beat = 0.0
            while not self._halt.is_set():
                if time.monotonic() - last_beat > 5.0:
                    self.ledger.supervisor_beat(os.getpid(), token, started)
                    last_beat = time.monotonic()
                busy = self.tick()
                if busy:
                    idle_since = time.monotonic()
                elif self.idle_exit_s is not None and time.monotonic() - idle_since > self.idle_exit_s:
                    self.say(f"idle for {self.idle_exit_s:.0f} s; exiting")
                    break
                self._halt.wait(self.poll_s)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            live = [j for j, (p, _) in self.children.items() if p.poll() is None]
            if live:
                self.say(f"exiting; {len(live)} job(s) keep running ({', '.join(live)}); the next supervisor "
                         "adopts them")
            lock.close()
        return 0

    def stop(self) -> None:
        self._halt.set()

    # ---- one round ---------------------------------------------------------------------------------------
    def tick(self) -> bool:
        """Reap, reconcile, escalate stops, start what fits. Returns whether any job is queued or active."""
        now_m = time.monotonic()
        # If this process itself was frozen (suspend, SIGSTOP), heartbeats look stale: skip that check once.
        stalled = now_m - self._last_tick > max(10 * self.poll_s, self.heartbeat_timeout_s / 2)
        self._last_tick = now_m
        self._reap()
        for job in self.ledger.reconcile(heartbeat_timeout_s=None if stalled else self.heartbeat_timeout_s,
                                         children=tuple(self.children)):
            self.say(f"{job.id} -> {job.state}: {job.error or ''}")
        self._escalate()
        self._schedule()
        try:
            self.remote.tick()
        except Exception as e:     # a Slurm hiccup must not take the local jobs' supervisor down
            self.say(f"Slurm round failed: {type(e).__name__}: {e}")
        return bool(self.ledger.list(states=(QUEUED,) + ACTIVE, limit=1))

    def _reap(self) -> None:
        for job_id, (proc, attempt) in list(self.children.items()):
            rc = proc.poll()
            if rc is None:
                continue
            del self.children[job_id]
            if self.ledger.process_gone(job_id, attempt, rc):
                job = self.ledger.get(job_id)
                self.say(f"{job_id} attempt {attempt} exited ({rc}) -> {job.state}: {job.error or ''}")
            else:
                self.say(f"{job_id} attempt {attempt} exited ({rc}) -> {self.ledger.get(job_id).state}")

    def _escalate(self) -> None:
        now = _now()
        for job in self.ledger.list(states=(STOPPING,)):
            if job.stop_requested_at is None or job.is_remote:   # remote: the Slurm bridge escalates
                continue
            if job.term_sent_at is None and now - job.stop_requested_at > self.stop_grace_s:
                if signal_group(job.pid, job.pid_start, signal.SIGTERM):
                    self.say(f"{job.id}: no stop after {self.stop_grace_s:.0f} s; SIGTERM to its group")
                self.ledger.signal_sent(job.id, job.attempt, signal.SIGTERM)
            elif job.term_sent_at is not None and job.kill_sent_at is None \
                    and now - job.term_sent_at > self.kill_grace_s:
                if signal_group(job.pid, job.pid_start, signal.SIGKILL):
                    self.say(f"{job.id}: still alive {self.kill_grace_s:.0f} s after SIGTERM; SIGKILL to its group")
                self.ledger.signal_sent(job.id, job.attempt, signal.SIGKILL)

    def _schedule(self) -> None:
        active = [j for j in self.ledger.list(states=ACTIVE) if not j.is_remote]
        gpu = sum(1 for j in active if j.needs_gpu_slot)     # a coordinator of a Slurm array takes none
        cpu = len(active) - gpu
        queued = sorted((j for j in self.ledger.list(states=(QUEUED,)) if not j.is_remote),
                        key=lambda j: (j.queued_at, j.id))
        gpu_head_blocked = False
        for job in queued:
            if job.needs_gpu_slot:
                if gpu >= self.gpu_slots or gpu_head_blocked:
                    gpu_head_blocked = True     # first come, first served on the accelerator
                    continue
            elif cpu >= self.cpu_slots:
                continue
            proc = self.ledger.start_attempt(job.id, self._spawn)
            if proc is None:
                continue
            self.children[job.id] = (proc, job.attempt)
            self.say(f"started {job.id} ({job.kind}) attempt {job.attempt} as pid {proc.pid}")
            if job.needs_gpu_slot:
                gpu += 1
            else:
                cpu += 1

    def _spawn(self, job: Job) -> subprocess.Popen:
        log = Path(job.log_path)
        log.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = _pythonpath(env)
        env.update(PYTHONUNBUFFERED="1", MEDART_JOB_ID=job.id, MEDART_JOB_ATTEMPT=str(job.attempt))
        cwd = job.cwd if job.cwd and Path(job.cwd).is_dir() else str(self.ws.root)
        with open(log, "ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "medart_core.jobs", "_run", str(self.ws.root), job.id, str(job.attempt)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                start_new_session=True, close_fds=True)


_SPAWNED: list[subprocess.Popen] = []


def _pythonpath(env: dict[str, str]) -> str:
    """This checkout first, so the worker and job processes import the same medart_core as their parent."""
    return os.pathsep.join([str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])


def ensure_supervisor(ws: Workspace, *, idle_exit_s: float | None = None, timeout_s: float = 20.0,
                      extra_args: Sequence[str] = ()) -> int:
    """The pid of this workspace's supervisor, spawning a detached one (own session, log in
    ``W/jobs/_supervisor.log``) when none is running. Safe to call from several processes at once: the
    flock lets one supervisor run; the others exit at once."""
    pid = supervisor_pid(ws)
    if pid is not None:
        return pid
    for p in list(_SPAWNED):      # reap earlier ones that exited
        if p.poll() is not None:
            _SPAWNED.remove(p)
    env = dict(os.environ)
    env["PYTHONPATH"] = _pythonpath(env)
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, "-m", "medart_core", "worker", "--workspace", str(ws.root), *extra_args]
    if idle_exit_s is not None:
        cmd += ["--idle-exit", str(idle_exit_s)]
    with open(supervisor_log_path(ws), "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=str(ws.root), start_new_session=True, close_fds=True)
    _SPAWNED.append(proc)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pid = supervisor_pid(ws)
        if pid is not None:
            return pid
        if proc.poll() is not None and supervisor_pid(ws) is None:
            raise MedArtError(f"The job supervisor could not start (exit {proc.returncode}); see "
                              f"{supervisor_log_path(ws)}.")
        time.sleep(0.05)
    raise MedArtError(f"The job supervisor did not start within {timeout_s:.0f} s; see {supervisor_log_path(ws)}.")
