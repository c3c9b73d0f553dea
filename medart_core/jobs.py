"""Out-of-process jobs: a durable ledger in SQLite, a supervisor that owns the accelerator, heartbeats, stop,
reconcile and resume, behind a small ``Executor`` seam.

Why this shape (see /work/shared/NOTES.md "Jobs"): a trainer that runs inside the web server dies with it, and
a ledger without a liveness check leaves crashed jobs ``running`` forever and blocks the queue. So:

* **The ledger** (``W/jobs.sqlite``, WAL) has one row per job (its current state) and an append-only
  ``job_events`` table (UPDATE/DELETE abort in triggers). Every state change writes the event and the row in
  one transaction, so the row is always the fold of the events (``JobLedger.state_from_events``).
* **A job** runs as ``python -m medart_core.jobs _run W ID ATTEMPT`` in its own session (process group),
  stdout/stderr appended to ``W/jobs/<id>/log.txt``. A thread in the job process writes a heartbeat (2 s) and
  the progress (at most twice a second) and reads the stop flag (every 0.5 s), so the training loop itself
  never waits on SQLite. The job writes its own final state (``done``, ``stopped``, ``failed``).
* **The supervisor** (``python -m medart_core worker``, at most one per workspace: an ``flock`` on
  ``W/jobs/_supervisor.lock``, released by the kernel when it dies) starts queued jobs when the accelerator
  slot is free (one ``uses_gpu`` job at a time by default; CPU-light kinds beside it), escalates stops
  (flag, then SIGTERM after ``stop_grace_s``, then SIGKILL of the group after ``kill_grace_s``), and
  reconciles: a ``running`` row whose process is gone (pid missing, or a different process under the same pid:
  the start time in ``/proc/<pid>/stat`` field 22 and the boot id differ) or whose heartbeat is stale is
  marked ``interrupted``, never left ``running``. Every decision is read from the DB, so a supervisor (or the
  studio) restarted mid-job reconnects to it.
* **Resume** of an ``interrupted``/``stopped``/``failed`` job queues a new *attempt of the same job* (same id,
  ``attempt + 1``, a ``resumed`` event). For ``train`` the new attempt calls ``train(None, ws, store,
  resume=run)``, which continues bitwise-exactly from the run's latest checkpoint.

A job process that receives SIGTERM or SIGINT (Ctrl-C) sets the same flag a stop request does: training
checkpoints at its next step boundary and the job ends ``stopped``. A second signal ends it at once.

Kinds are registered with ``register_kind(name, run_fn, uses_gpu=...)``; the row stores the function's
``module:qualname`` and ``uses_gpu``, so neither the supervisor nor the job process needs the registering
module imported beforehand. Built in: ``train`` and ``sleep`` (a cheap diagnostic kind).

The ledger must live on a local disk (SQLite WAL needs shared memory; not a network mount).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from . import durable
from .errors import ConfigError, MedArtError, NotFoundError
from .workspace import Workspace, private_file, validate_name

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 15_000

QUEUED, RUNNING, STOPPING = "queued", "running", "stopping"
DONE, FAILED, INTERRUPTED, STOPPED = "done", "failed", "interrupted", "stopped"
STATES = (QUEUED, RUNNING, STOPPING, DONE, FAILED, INTERRUPTED, STOPPED)
ACTIVE = (RUNNING, STOPPING)                   # a process is (or should be) alive
FINAL = (DONE, FAILED, INTERRUPTED, STOPPED)   # no process; the last three can be resumed
RESUMABLE = (INTERRUPTED, STOPPED, FAILED)

HEARTBEAT_S = 2.0          # job process -> row.heartbeat_at
FLAG_POLL_S = 0.5          # how often the job process reads the stop flag / flushes progress
START_WAIT_S = 30.0        # a job process waits this long for the supervisor to record its pid

REPO_ROOT = Path(__file__).resolve().parent.parent

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS jobs (
    id                TEXT PRIMARY KEY,
    kind              TEXT NOT NULL,
    target            TEXT NOT NULL,            -- "module:function" the job process runs
    uses_gpu          INTEGER NOT NULL,         -- needs the accelerator slot
    config            TEXT NOT NULL,            -- JSON, as normalised by the kind at submit
    owner             TEXT,
    cwd               TEXT,                     -- the submitter's folder: relative paths mean the same
    state             TEXT NOT NULL CHECK (state IN ({", ".join(repr(s) for s in STATES)})),
    attempt           INTEGER NOT NULL DEFAULT 1,
    run               TEXT,                     -- training run name (runs/<run>/), when the kind has one
    pid               INTEGER,
    pid_start         TEXT,                     -- boot id + start time of pid: pids are reused
    heartbeat_at      REAL,
    progress          REAL NOT NULL DEFAULT 0,  -- 0..1
    progress_info     TEXT NOT NULL DEFAULT '{{}}',  -- JSON: step, total, eta_s, loss, ...
    last_checkpoint   TEXT,
    log_path          TEXT NOT NULL,
    error             TEXT,                     -- one sentence naming the cause
    result            TEXT,                     -- JSON returned by the kind
    stop_requested_at REAL,
    term_sent_at      REAL,
    kill_sent_at      REAL,
    created_at        REAL NOT NULL,
    queued_at         REAL NOT NULL,
    started_at        REAL,
    finished_at       REAL,
    updated_at        REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, queued_at);
CREATE INDEX IF NOT EXISTS jobs_by_run ON jobs (run);
CREATE TABLE IF NOT EXISTS job_events (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id    TEXT NOT NULL REFERENCES jobs(id),
    attempt   INTEGER NOT NULL,
    event     TEXT NOT NULL,                    -- submitted, started, stop_requested, signal, checkpoint,
                                                -- finished, interrupted, resumed
    state     TEXT NOT NULL,                    -- the job's state after this event
    detail    TEXT NOT NULL DEFAULT '{{}}',
    at        REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS job_events_by_job ON job_events (job_id, id);
CREATE TRIGGER IF NOT EXISTS job_events_append_only_u BEFORE UPDATE ON job_events
    BEGIN SELECT RAISE(ABORT, 'job events are append-only'); END;
CREATE TRIGGER IF NOT EXISTS job_events_append_only_d BEFORE DELETE ON job_events
    BEGIN SELECT RAISE(ABORT, 'job events are append-only'); END;
CREATE TABLE IF NOT EXISTS supervisor (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    pid           INTEGER,
    pid_start     TEXT,
    started_at    REAL,
    heartbeat_at  REAL
)
"""


def _now() -> float:
    return time.time()


def _iso(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def jobs_dir(ws: Workspace) -> Path:
    """``W/jobs/``: one folder per job plus the supervisor's lock and log (names starting with '_' are not
    valid job ids, so they cannot collide)."""
    d = getattr(ws, "jobs_dir", None)
    d = Path(d) if d is not None else ws.root / "jobs"
    d.mkdir(parents=True, exist_ok=True)
    return d


# =========================================================================================================
# Process identity: pid + start time (pids are reused), zombies count as gone
# =========================================================================================================
_BOOT_ID: str | None = None


def _boot_id() -> str:
    global _BOOT_ID
    if _BOOT_ID is None:
        try:
            _BOOT_ID = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            _BOOT_ID = "noboot"
    return _BOOT_ID


def process_start_token(pid: int | None) -> str | None:
    """An identity of the live process ``pid`` that differs for any later process reusing the pid: the boot id
    and the start time in clock ticks since boot (field 22 of ``/proc/<pid>/stat``). None when there is no
    such process or it is a zombie (exited, not yet reaped)."""
    if not pid or pid <= 0:
        return None
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except FileNotFoundError:
        return None
    except OSError:
        data = ""
    if data:
        rest = data[data.rindex(")") + 2:].split()   # the command name may hold spaces and ')'
        if rest[0] in ("Z", "X"):
            return None
        return f"{_boot_id()}:{rest[19]}"
    try:  # not Linux: psutil's create time (a gradio dependency)
        import psutil

        p = psutil.Process(int(pid))
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        return f"ct:{p.create_time():.3f}"
    except Exception:
        return None


def process_alive(pid: int | None, token: str | None) -> bool:
    """True when ``pid`` is the very process whose start token was recorded."""
    return bool(pid) and token is not None and process_start_token(pid) == token


def signal_group(pid: int | None, token: str | None, sig: int) -> bool:
    """Send ``sig`` to the process group led by ``pid`` (jobs start their own session), after checking that
    ``pid`` is still the recorded process. Returns whether a signal was sent."""
    if not process_alive(pid, token):
        return False
    try:
        os.killpg(int(pid), sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return False


# =========================================================================================================
# Kinds
# =========================================================================================================
@dataclass(frozen=True)
class JobKind:
    name: str
    target: str                     # "module:qualname" of run_fn(ctx: JobContext) -> dict
    uses_gpu: bool
    prepare: Callable[[Workspace, dict], tuple[dict, str | None]] | None = None   # validate -> (config, run)


_KINDS: dict[str, JobKind] = {}


def register_kind(name: str, run_fn: Callable[["JobContext"], dict | None] | str, uses_gpu: bool = True, *,
                  prepare: Callable[[Workspace, dict], tuple[dict, str | None]] | str | None = None) -> JobKind:
    """Make ``name`` submittable. ``run_fn(ctx)`` runs in the job process and returns a JSON-able dict
    (``{"status": "stopped"}`` when it stopped early on ``ctx.should_stop()``); it must be a module-level
    function (the job process imports it by name), or its ``"module:function"`` name, which registers a kind
    without importing its module. ``prepare(ws, config) -> (config, run)`` (a function or its name) validates
    and normalises the config at submit time, in the submitter, so mistakes fail before anything is queued."""
    validate_name(name, "job kind")
    if isinstance(run_fn, str):
        module, _, qual = run_fn.partition(":")
        if not module or not qual:
            raise ConfigError(f"Job kind {name!r}: a target name must read 'module:function', got {run_fn!r}.")
    else:
        qual = getattr(run_fn, "__qualname__", "")
        if "<" in qual or not getattr(run_fn, "__module__", None):
            raise ConfigError(f"Job kind {name!r}: run_fn must be a module-level function (got {qual!r}).")
        module = run_fn.__module__
    if module == "__main__":
        raise ConfigError(f"Job kind {name!r}: run_fn must live in an importable module, not __main__.")
    if isinstance(prepare, str):
        target = prepare

        def prepare(ws: Workspace, config: dict, _target: str = target) -> tuple[dict, str | None]:
            return _resolve_target(_target)(ws, config)
    kind = JobKind(name, f"{module}:{qual}", bool(uses_gpu), prepare)
    _KINDS[name] = kind
    return kind


def job_kinds() -> dict[str, JobKind]:
    return dict(_KINDS)


def _kind(name: str) -> JobKind:
    if name not in _KINDS:
        raise ConfigError(f"Unknown job kind {name!r}; known kinds are {sorted(_KINDS)}.")
    return _KINDS[name]


def _resolve_target(target: str) -> Callable[["JobContext"], Any]:
    module, _, qual = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


# =========================================================================================================
# Records
# =========================================================================================================
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

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Job":
        d = dict(row)
        d["uses_gpu"] = bool(d["uses_gpu"])
        d["config"] = json.loads(d["config"] or "{}")
        d["progress_info"] = json.loads(d["progress_info"] or "{}")
        d["result"] = json.loads(d["result"]) if d["result"] else None
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
        parts = [self.state + (f" (attempt {self.attempt})" if self.attempt > 1 else "")]
        if self.step is not None:
            parts.append(f"step {self.step}/{self.total}" if self.total else f"step {self.step}")
        parts.append(f"{100 * self.progress:.0f}%")
        if self.eta_s is not None:
            parts.append(f"ETA {_fmt_duration(self.eta_s)}")
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
            "uses_gpu": self.uses_gpu, "last_checkpoint": self.last_checkpoint, "log": self.log_path,
            "progress_info": self.progress_info, "result": self.result, "config": self.config,
            "stop_requested": self.stop_requested_at is not None,
            "created_at": _iso(self.created_at), "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at), "heartbeat_at": _iso(self.heartbeat_at),
        }


@dataclass(frozen=True)
class JobEvent:
    id: int
    job_id: str
    attempt: int
    event: str
    state: str
    detail: dict[str, Any]
    at: float


def _fmt_duration(s: float) -> str:
    s = max(0, int(round(s)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


# =========================================================================================================
# The ledger
# =========================================================================================================
class JobLedger:
    """The job table and its event log over ``ws.jobs_db``; safe across threads and processes."""

    def __init__(self, ws: Workspace):
        self.ws = ws
        self.db_path = Path(ws.jobs_db)
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._pid = os.getpid()
        self._init_schema()

    @classmethod
    def for_workspace(cls, ws: Workspace) -> "JobLedger":
        return cls(ws)

    # ---- connections -------------------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        if os.getpid() != self._pid:          # forked: never reuse the parent's connections
            self._local = threading.local()
            self._pid = os.getpid()
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(private_file(self.db_path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            con.row_factory = sqlite3.Row
            con.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            con.execute("PRAGMA foreign_keys = ON")
            con.execute("PRAGMA synchronous = FULL")
            self._local.con = con
        return con

    def close(self) -> None:
        """Close this thread's connection (others close when their thread ends)."""
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        con = self._conn()
        try:
            con.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            if "locked" in str(e) or "busy" in str(e):
                raise MedArtError(f"The job ledger {self.db_path} is busy (another process held it for over "
                                  f"{BUSY_TIMEOUT_MS // 1000} s); try again in a moment.") from e
            raise
        try:
            tx = durable.begin(durable.JOBS, con, self.db_path)   # None unless MEDART_DURABLE_DIR is set
            yield con
            entry = durable.collect(tx)          # new job events + their jobs rows (heartbeats write no event)
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        else:
            con.execute("COMMIT")
            durable.record(entry)                # appended + fsynced to the durable folder before we return

    def _init_schema(self) -> None:
        con = self._conn()
        if con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
            return                   # the common case: no write lock just to open the ledger
        mode = con.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            import warnings

            warnings.warn(f"Job ledger {self.db_path} could not use WAL mode (got {mode!r}); keep the workspace "
                          "on a local disk.", RuntimeWarning, stacklevel=3)
        with self._write() as con:
            version = con.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ConfigError(f"{self.db_path} was written by a newer Med-Art Studio (jobs schema {version}); "
                                  "upgrade Med-Art Studio to open it.")
            if version < SCHEMA_VERSION:
                for stmt in _SCHEMA.split(";\n"):
                    if stmt.strip():
                        con.execute(stmt)
                con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # ---- primitives --------------------------------------------------------------------------------------
    @staticmethod
    def _event(con: sqlite3.Connection, job_id: str, attempt: int, event: str, state: str,
               detail: dict[str, Any] | None = None, at: float | None = None) -> None:
        con.execute("INSERT INTO job_events (job_id, attempt, event, state, detail, at) VALUES (?, ?, ?, ?, ?, ?)",
                    (job_id, attempt, event, state, json.dumps(detail or {}, sort_keys=True), at or _now()))

    @staticmethod
    def _row(con: sqlite3.Connection, job_id: str) -> sqlite3.Row | None:
        return con.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()

    def _transition(self, con: sqlite3.Connection, row: sqlite3.Row, event: str, state: str,
                    detail: dict[str, Any] | None = None, **fields_: Any) -> None:
        """Change the row and append its event in the caller's transaction (the row is the events' fold)."""
        now = _now()
        fields_ = dict(fields_, state=state, updated_at=now)
        cols = ", ".join(f"{k} = ?" for k in fields_)
        con.execute(f"UPDATE jobs SET {cols} WHERE id = ?", (*fields_.values(), row["id"]))
        self._event(con, row["id"], int(fields_.get("attempt", row["attempt"])), event, state, detail, now)

    # ---- reading -----------------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job:
        row = self._row(self._conn(), job_id)
        if row is None:
            raise NotFoundError(f"No job {job_id!r} in {self.db_path}; `jobs list` shows the jobs.")
        return Job.from_row(row)

    def list(self, *, states: Sequence[str] | None = None, kind: str | None = None, owner: str | None = None,
             run: str | None = None, limit: int | None = None) -> list[Job]:
        """Jobs, newest first."""
        where, args = [], []
        if states:
            where.append(f"state IN ({', '.join('?' * len(states))})")
            args += list(states)
        for col, val in (("kind", kind), ("owner", owner), ("run", run)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "") + \
              " ORDER BY created_at DESC, id DESC" + (f" LIMIT {int(limit)}" if limit else "")
        return [Job.from_row(r) for r in self._conn().execute(sql, args).fetchall()]

    def events(self, job_id: str) -> list[JobEvent]:
        rows = self._conn().execute("SELECT * FROM job_events WHERE job_id = ? ORDER BY id", (job_id,)).fetchall()
        return [JobEvent(r["id"], r["job_id"], r["attempt"], r["event"], r["state"], json.loads(r["detail"]),
                         r["at"]) for r in rows]

    def state_from_events(self, job_id: str) -> tuple[str, int] | None:
        """(state, attempt) folded from the event log alone: equals the row's, by construction."""
        r = self._conn().execute("SELECT state, attempt FROM job_events WHERE job_id = ? ORDER BY id DESC LIMIT 1",
                                 (job_id,)).fetchone()
        return (r["state"], r["attempt"]) if r else None

    def log_path(self, job_id: str) -> Path:
        return jobs_dir(self.ws) / validate_name(job_id, "job id") / "log.txt"

    def log_tail(self, job_id: str, lines: int = 40, max_bytes: int = 64_000) -> str:
        """The last ``lines`` lines of the job's log, reading at most ``max_bytes`` from its end (O(1))."""
        return tail_text(self.log_path(job_id), lines, max_bytes)

    def error_report(self, job: Job | str, lines: int = 20) -> str:
        """What a user sees for a failed/interrupted job: the cause in one sentence, the log tail below."""
        job = self.get(job) if isinstance(job, str) else job
        if not job.error:
            return ""
        tail = self.log_tail(job.id, lines)
        return f"{job.error}\n\nLast lines of {job.log_path}:\n{tail}" if tail else job.error

    # ---- submitting and steering ------------------------------------------------------------------------
    def submit(self, kind: str, config: dict[str, Any] | None = None, *, owner: str | None = None,
               job_id: str | None = None, cwd: str | os.PathLike | None = None) -> Job:
        """Queue a job of a registered kind; the kind's ``prepare`` validates the config first."""
        k = _kind(kind)
        config = dict(config or {})
        run = None
        if k.prepare is not None:
            config, run = k.prepare(self.ws, config)
        try:
            json.dumps(config)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"A {kind} job's config must be JSON data: {e}") from None
        now = _now()
        job_id = validate_name(job_id, "job id") if job_id else \
            f"{kind}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now))}-{secrets.token_hex(2)}"
        log = self.log_path(job_id)
        log.parent.mkdir(parents=True, exist_ok=True)
        with self._write() as con:
            if self._row(con, job_id) is not None:
                raise ConfigError(f"A job {job_id!r} exists already; choose another id.")
            if run is not None:
                clash = con.execute("SELECT id, state FROM jobs WHERE run = ? AND (state IN (?, ?, ?) OR ? = 0)",
                                    (run, QUEUED, RUNNING, STOPPING, 1 if config.get("resume") else 0)).fetchone()
                if clash is not None:
                    raise ConfigError(f"Run {run!r} belongs to job {clash['id']} ({clash['state']}); "
                                      + ("wait for it or stop it first." if clash["state"] in (QUEUED,) + ACTIVE
                                         else f"resume that job, or choose another run name."))
            con.execute(
                "INSERT INTO jobs (id, kind, target, uses_gpu, config, owner, cwd, state, attempt, run, log_path, "
                "created_at, queued_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?, ?, ?)",
                (job_id, kind, k.target, int(k.uses_gpu), json.dumps(config, sort_keys=True), owner,
                 str(Path(cwd or os.getcwd()).resolve()), QUEUED, run, str(log), now, now, now))
            self._event(con, job_id, 1, "submitted", QUEUED, {"owner": owner, "run": run}, now)
        return self.get(job_id)

    def request_stop(self, job_id: str, *, reason: str = "requested") -> Job:
        """Set the stop flag: the job checkpoints at its next safe point and ends ``stopped``. A queued job is
        stopped at once (it never started). The supervisor escalates to SIGTERM/SIGKILL after a grace."""
        with self._write() as con:
            row = self._row(con, job_id)
            if row is None:
                raise NotFoundError(f"No job {job_id!r}; `jobs list` shows the jobs.")
            if row["state"] == QUEUED:
                self._transition(con, row, "stop_requested", STOPPED, {"reason": reason, "before_start": True},
                                 stop_requested_at=_now(), finished_at=_now())
            elif row["state"] == RUNNING:
                self._transition(con, row, "stop_requested", STOPPING, {"reason": reason},
                                 stop_requested_at=_now())
            elif row["state"] == STOPPING:
                pass
            else:
                raise ConfigError(f"Job {job_id} is {row['state']} already; there is nothing to stop.")
        return self.get(job_id)

    def resume(self, job_id: str, *, max_steps: int | None = None, owner: str | None = None) -> Job:
        """Queue a new attempt of an interrupted, stopped or failed job (same id, attempt + 1). A ``done`` job
        may be resumed with a larger ``max_steps`` (training continues past its end)."""
        with self._write() as con:
            row = self._row(con, job_id)
            if row is None:
                raise NotFoundError(f"No job {job_id!r}; `jobs list` shows the jobs.")
            state = row["state"]
            if state in (QUEUED,) + ACTIVE:
                raise ConfigError(f"Job {job_id} is {state}; only an interrupted, stopped or failed job can be "
                                  "resumed.")
            if state == DONE and max_steps is None:
                raise ConfigError(f"Job {job_id} is done; to train further, resume it with a larger max_steps.")
            if row["run"] is not None:
                clash = con.execute("SELECT id FROM jobs WHERE run = ? AND id != ? AND state IN (?, ?, ?)",
                                    (row["run"], job_id, QUEUED, RUNNING, STOPPING)).fetchone()
                if clash is not None:
                    raise ConfigError(f"Run {row['run']!r} is in use by job {clash['id']}; wait for it to end.")
            config = json.loads(row["config"])
            detail: dict[str, Any] = {"from_state": state}
            if max_steps is not None:
                if int(max_steps) < 1:
                    raise ConfigError(f"max_steps must be >= 1, got {max_steps}.")
                config["max_steps"] = int(max_steps)
                detail["max_steps"] = int(max_steps)
            if owner:
                detail["by"] = owner
            now = _now()
            self._transition(con, row, "resumed", QUEUED, detail, attempt=row["attempt"] + 1,
                             config=json.dumps(config, sort_keys=True), error=None, result=None, pid=None,
                             pid_start=None, stop_requested_at=None, term_sent_at=None, kill_sent_at=None,
                             finished_at=None, queued_at=now)
        return self.get(job_id)

    # ---- reconcile (anyone may call it; only state changes that are certain) -----------------------------
    def reconcile(self, *, heartbeat_timeout_s: float | None = None, started_grace_s: float = 60.0,
                  children: Sequence[str] = ()) -> list[Job]:
        """Mark every active job whose process is gone as ``interrupted`` (``stopped`` when a stop was asked).
        With ``heartbeat_timeout_s``, a live process whose heartbeat is older is killed (its group) and
        marked likewise. ``children``: jobs whose exit the caller learns from ``wait()`` (the supervisor's own
        children; their exit status says more than a vanished pid). Returns the jobs changed."""
        changed = []
        now = _now()
        for job in self.list(states=ACTIVE):
            if job.id in children:
                pass
            elif job.pid is None:
                if now - (job.started_at or job.updated_at) > started_grace_s:
                    cause = "The supervisor stopped before recording the job's process."
                    if self._process_gone(job.id, job.attempt, None, cause=cause):
                        changed.append(job.id)
                continue
            elif not process_alive(job.pid, job.pid_start):
                if self._process_gone(job.id, job.attempt, None):
                    changed.append(job.id)
                continue
            if heartbeat_timeout_s is not None and job.heartbeat_at is not None \
                    and now - job.heartbeat_at > heartbeat_timeout_s:
                age = now - job.heartbeat_at
                signal_group(job.pid, job.pid_start, signal.SIGKILL)
                cause = (f"The job's process (pid {job.pid}) sent no heartbeat for {age:.0f} s (hung or frozen) "
                         f"and was killed{_resume_hint(job)}")
                if self._process_gone(job.id, job.attempt, None, cause=cause, event_detail={"heartbeat_age_s": age}):
                    changed.append(job.id)
        return [self.get(j) for j in changed]

    def _process_gone(self, job_id: str, attempt: int, returncode: int | None, *, cause: str | None = None,
                      event_detail: dict[str, Any] | None = None) -> bool:
        """The process of ``attempt`` ended without writing its final state: record why."""
        with self._write() as con:
            row = self._row(con, job_id)
            if row is None or row["attempt"] != attempt or row["state"] not in ACTIVE:
                return False      # it reported its own end, or a newer attempt owns the row
            job = Job.from_row(row)
            detail = dict(event_detail or {}, pid=job.pid, returncode=returncode)
            now = _now()
            if row["state"] == STOPPING:
                how = "killed after the stop grace period" if row["kill_sent_at"] else "exited while stopping"
                self._transition(con, row, "finished", STOPPED, dict(detail, how=how), finished_at=now)
                return True
            if returncode is not None and returncode > 0:
                msg = (f"The job's process exited with code {returncode} without reporting a result; the log "
                       "below says why.")
                self._transition(con, row, "finished", FAILED, detail, error=msg, finished_at=now)
                return True
            if cause is None:
                if returncode is not None and returncode < 0:
                    try:
                        name = signal.Signals(-returncode).name
                    except ValueError:
                        name = f"signal {-returncode}"
                    cause = (f"The job's process was killed by {name}"
                             f"{_at_step(job)} (out of memory, or killed by hand){_resume_hint(job)}")
                else:
                    cause = (f"The job's process (pid {job.pid}) is gone{_at_step(job)} (killed, out of memory, or "
                             f"the machine restarted){_resume_hint(job)}")
            self._transition(con, row, "interrupted", INTERRUPTED, detail, error=cause, finished_at=now)
            return True

    # ---- supervisor side ---------------------------------------------------------------------------------
    def _start_attempt(self, job_id: str, spawn: Callable[[Job], subprocess.Popen]) -> subprocess.Popen | None:
        """queued -> running: spawn the process and record its pid + start token in one transaction (the
        job process waits until it sees its own pid in the row, so an orphan of a crashed supervisor
        cannot run a job twice)."""
        with self._write() as con:
            row = self._row(con, job_id)
            if row is None or row["state"] != QUEUED:
                return None
            job = Job.from_row(row)
            try:
                proc = spawn(job)
            except OSError as e:
                self._transition(con, row, "finished", FAILED, {"spawn_error": str(e)},
                                 error=f"The job's process could not start: {e}.", finished_at=_now())
                return None
            now = _now()
            self._transition(con, row, "started", RUNNING, {"pid": proc.pid}, pid=proc.pid,
                             pid_start=process_start_token(proc.pid), started_at=now, heartbeat_at=now,
                             finished_at=None)
        return proc

    def _signal_sent(self, job_id: str, attempt: int, sig: int) -> None:
        col = "term_sent_at" if sig == signal.SIGTERM else "kill_sent_at"
        with self._write() as con:
            row = self._row(con, job_id)
            if row is None or row["attempt"] != attempt or row["state"] not in ACTIVE:
                return
            self._transition(con, row, "signal", row["state"], {"signal": signal.Signals(sig).name},
                             **{col: _now()})

    # ---- job-process side --------------------------------------------------------------------------------
    def _beat(self, job_id: str, attempt: int, *, progress: float | None = None,
              info: dict[str, Any] | None = None, heartbeat: bool = True) -> tuple[bool, bool]:
        """Heartbeat and progress from the job process. Returns (still ours, stop requested)."""
        sets, args = ["updated_at = ?"], [_now()]
        if heartbeat:
            sets.append("heartbeat_at = ?")
            args.append(_now())
        if progress is not None:
            sets.append("progress = ?")
            args.append(float(progress))
        if info is not None:
            sets.append("progress_info = ?")
            args.append(json.dumps(info, sort_keys=True))
        with self._write() as con:
            cur = con.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id = ? AND attempt = ? AND state IN (?, ?)",
                              (*args, job_id, attempt, RUNNING, STOPPING))
            if cur.rowcount == 0:
                return False, True
            r = con.execute("SELECT stop_requested_at FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return True, r["stop_requested_at"] is not None

    def _read_flags(self, job_id: str, attempt: int) -> tuple[bool, bool]:
        r = self._conn().execute("SELECT state, attempt, stop_requested_at FROM jobs WHERE id = ?",
                                 (job_id,)).fetchone()
        if r is None or r["attempt"] != attempt or r["state"] not in ACTIVE:
            return False, True
        return True, r["stop_requested_at"] is not None

    def _checkpoint(self, job_id: str, attempt: int, path: str, step: int | None) -> None:
        with self._write() as con:
            row = self._row(con, job_id)
            if row is None or row["attempt"] != attempt or row["state"] not in ACTIVE:
                return
            self._transition(con, row, "checkpoint", row["state"], {"path": path, "step": step},
                             last_checkpoint=path)

    def _finish(self, job_id: str, attempt: int, state: str, *, error: str | None = None,
                result: dict[str, Any] | None = None, progress: float | None = None,
                info: dict[str, Any] | None = None, detail: dict[str, Any] | None = None) -> bool:
        with self._write() as con:
            row = self._row(con, job_id)
            if row is None or row["attempt"] != attempt or row["state"] not in ACTIVE:
                return False
            fields_: dict[str, Any] = {"error": error, "finished_at": _now(),
                                       "result": json.dumps(result, sort_keys=True, default=str) if result else None}
            if progress is not None:
                fields_["progress"] = float(progress)
            if info is not None:
                fields_["progress_info"] = json.dumps(info, sort_keys=True)
            self._transition(con, row, "finished", state, detail, **fields_)
        return True

    # ---- supervisor row (for display; the flock is what guarantees one supervisor) ----------------------
    def _supervisor_beat(self, pid: int, token: str | None, started_at: float) -> None:
        with self._write() as con:
            con.execute("INSERT INTO supervisor (id, pid, pid_start, started_at, heartbeat_at) VALUES (1, ?, ?, ?, ?) "
                        "ON CONFLICT(id) DO UPDATE SET pid = excluded.pid, pid_start = excluded.pid_start, "
                        "started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at",
                        (pid, token, started_at, _now()))

    def supervisor_row(self) -> dict[str, Any] | None:
        r = self._conn().execute("SELECT * FROM supervisor WHERE id = 1").fetchone()
        return dict(r) if r else None


def _at_step(job: Job) -> str:
    return f" at step {job.step}" if job.step is not None else ""


def _resume_hint(job: Job) -> str:
    if job.kind == "train":
        ck = job.last_checkpoint
        where = f" ({Path(ck).name})" if ck else ""
        return f"; resume continues from the last checkpoint{where}."
    return "; resume starts a new attempt."


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


# =========================================================================================================
# Inside the job process
# =========================================================================================================
class JobContext:
    """What a kind's ``run_fn`` gets: the workspace, the job, and the calls to report progress and to learn
    that it should stop. Progress is buffered in memory and written by a background thread."""

    def __init__(self, ledger: JobLedger, job: Job):
        self.ledger = ledger
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

    @property
    def resumed(self) -> bool:
        return self.attempt > 1

    @property
    def run(self) -> str | None:
        return self.job.run

    def log(self, msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)

    def should_stop(self) -> bool:
        """True once a stop was asked (DB flag, read every 0.5 s in the background), SIGTERM/SIGINT arrived, or
        another attempt took over the row. Cheap: no I/O."""
        return self._stop_flag or self.signal_name is not None or self._lost

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
        self.ledger._checkpoint(self.job.id, self.attempt, str(path), step)

    # ---- used by the runner ------------------------------------------------------------------------------
    def _snapshot(self) -> tuple[float, dict[str, Any], bool]:
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
        led = JobLedger(ctx.ws)   # own connection in this thread
        while not self.halt.wait(FLAG_POLL_S):
            try:
                progress, info, dirty = ctx._snapshot()
                now = time.monotonic()
                if dirty or now - last_beat >= HEARTBEAT_S:
                    ours, stop = led._beat(ctx.job.id, ctx.attempt, progress=progress if dirty else None,
                                           info=info if dirty else None)
                    last_beat = now
                else:
                    ours, stop = led._read_flags(ctx.job.id, ctx.attempt)
                ctx._lost = not ours
                ctx._stop_flag = stop
            except Exception as e:  # a busy DB must not kill the job; the next pulse retries
                print(f"[jobs] heartbeat failed: {e}", file=sys.stderr, flush=True)
        led.close()


class JobFailed(MedArtError):
    """A job ended with a failure whose message names the cause (raised by kinds for the user to see)."""


def describe_failure(exc: BaseException) -> str:
    """One sentence naming the cause: a MedArtError's own message, else the exception type and message."""
    if isinstance(exc, MedArtError):
        return str(exc)
    if isinstance(exc, MemoryError) or _is_host_oom(exc):
        return "Out of host memory (RAM): lower batch_size or resolution, or close other programs."
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"Unexpected {type(exc).__name__}: {first} (a bug; the traceback is in the log below)."


def _is_cuda_oom(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower() and "cuda" in str(exc).lower())


def _is_host_oom(exc: BaseException) -> bool:
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
    ctx = JobContext(ledger, job)

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
    pulse = _Pulse(ctx)
    pulse.start()
    print(f"===== job {job_id} ({job.kind}) attempt {attempt}, pid {os.getpid()}, "
          f"{time.strftime('%Y-%m-%d %H:%M:%S')} =====", flush=True)
    state, error, result, detail = DONE, None, None, {}
    try:
        fn = _resolve_target(job.target)
        result = fn(ctx) or {}
        if not isinstance(result, dict):
            result = {"value": result}
        if result.get("status") == "stopped":
            state = STOPPED
            detail["cause"] = ctx.signal_name or ("lost" if ctx._lost else "stop request")
    except BaseException as e:  # noqa: BLE001 - every end is recorded, then the code is the exit status
        state, error = FAILED, describe_failure(e)
        if not isinstance(e, MedArtError) or e.__cause__ is not None:
            traceback.print_exc()
        print(f"[jobs] failed: {error}", file=sys.stderr, flush=True)
    finally:
        pulse.halt.set()
        pulse.join(timeout=5)
    progress, info, _ = ctx._snapshot()
    if state == DONE:
        progress = 1.0
        info.pop("eta_s", None)
    info.pop("phase", None)
    ledger._finish(job_id, attempt, state, error=error, result=result, progress=progress, info=info, detail=detail)
    print(f"===== job {job_id} attempt {attempt}: {state}{': ' + error if error else ''} =====", flush=True)
    return 1 if state == FAILED else 0


# =========================================================================================================
# The supervisor
# =========================================================================================================
def _lock_path(ws: Workspace) -> Path:
    return jobs_dir(ws) / "_supervisor.lock"


def supervisor_log_path(ws: Workspace) -> Path:
    return jobs_dir(ws) / "_supervisor.log"


def _try_lock(path: Path):
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

        def halt(signum, frame):
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
                    self.ledger._supervisor_beat(os.getpid(), token, started)
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
        return bool(self.ledger.list(states=(QUEUED,) + ACTIVE, limit=1))

    def _reap(self) -> None:
        for job_id, (proc, attempt) in list(self.children.items()):
            rc = proc.poll()
            if rc is None:
                continue
            del self.children[job_id]
            if self.ledger._process_gone(job_id, attempt, rc):
                job = self.ledger.get(job_id)
                self.say(f"{job_id} attempt {attempt} exited ({rc}) -> {job.state}: {job.error or ''}")
            else:
                self.say(f"{job_id} attempt {attempt} exited ({rc}) -> {self.ledger.get(job_id).state}")

    def _escalate(self) -> None:
        now = _now()
        for job in self.ledger.list(states=(STOPPING,)):
            if job.stop_requested_at is None:
                continue
            if job.term_sent_at is None and now - job.stop_requested_at > self.stop_grace_s:
                if signal_group(job.pid, job.pid_start, signal.SIGTERM):
                    self.say(f"{job.id}: no stop after {self.stop_grace_s:.0f} s; SIGTERM to its group")
                self.ledger._signal_sent(job.id, job.attempt, signal.SIGTERM)
            elif job.term_sent_at is not None and job.kill_sent_at is None \
                    and now - job.term_sent_at > self.kill_grace_s:
                if signal_group(job.pid, job.pid_start, signal.SIGKILL):
                    self.say(f"{job.id}: still alive {self.kill_grace_s:.0f} s after SIGTERM; SIGKILL to its group")
                self.ledger._signal_sent(job.id, job.attempt, signal.SIGKILL)

    def _schedule(self) -> None:
        active = self.ledger.list(states=ACTIVE)
        gpu = sum(1 for j in active if j.uses_gpu)
        cpu = len(active) - gpu
        queued = sorted(self.ledger.list(states=(QUEUED,)), key=lambda j: (j.queued_at, j.id))
        gpu_head_blocked = False
        for job in queued:
            if job.uses_gpu:
                if gpu >= self.gpu_slots or gpu_head_blocked:
                    gpu_head_blocked = True     # first come, first served on the accelerator
                    continue
            elif cpu >= self.cpu_slots:
                continue
            proc = self.ledger._start_attempt(job.id, self._spawn)
            if proc is None:
                continue
            self.children[job.id] = (proc, job.attempt)
            self.say(f"started {job.id} ({job.kind}) attempt {job.attempt} as pid {proc.pid}")
            if job.uses_gpu:
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
    cmd = [sys.executable, "-m", "medart_core.jobs", "worker", "--workspace", str(ws.root), *extra_args]
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


# =========================================================================================================
# Executor seam: what the studio and the CLI use (a cluster backend implements the same verbs)
# =========================================================================================================
class Executor(ABC):
    """Where jobs run, and the only door to them: the studio and the CLI submit, steer **and read** jobs
    through these verbs (a cluster backend such as Slurm through submitit implements the same ones). The
    ledger behind them stays the source of truth."""

    # ---- steering
    @abstractmethod
    def submit(self, kind: str, config: dict[str, Any], *, owner: str | None = None) -> Job: ...

    @abstractmethod
    def stop(self, job_id: str) -> Job: ...

    @abstractmethod
    def resume(self, job_id: str, *, max_steps: int | None = None, owner: str | None = None) -> Job: ...

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


class LocalExecutor(Executor):
    """Jobs on this machine, supervised by ``python -m medart_core worker`` (spawned on demand)."""

    def __init__(self, ws: Workspace, *, start_supervisor: bool = True, idle_exit_s: float | None = None):
        self.ws = ws
        self.ledger = JobLedger(ws)
        self.start_supervisor = start_supervisor
        self.idle_exit_s = idle_exit_s

    def _ensure(self) -> None:
        if self.start_supervisor:
            ensure_supervisor(self.ws, idle_exit_s=self.idle_exit_s)

    def submit(self, kind: str, config: dict[str, Any], *, owner: str | None = None) -> Job:
        job = self.ledger.submit(kind, config, owner=owner)
        self._ensure()
        return job

    def stop(self, job_id: str) -> Job:
        job = self.ledger.request_stop(job_id)
        if job.state == STOPPING:
            self._ensure()       # someone must escalate if the job ignores the flag
        return job

    def resume(self, job_id: str, *, max_steps: int | None = None, owner: str | None = None) -> Job:
        job = self.ledger.resume(job_id, max_steps=max_steps, owner=owner)
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


def wait_for(ledger: JobLedger, job_id: str, states: Sequence[str] = FINAL, timeout_s: float = 600.0,
             poll_s: float = 0.2) -> Job:
    """Block until the job reaches one of ``states`` (MedArtError on timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        job = ledger.get(job_id)
        if job.state in states:
            return job
        if time.monotonic() > deadline:
            raise MedArtError(f"Job {job_id} is still {job.state} after {timeout_s:.0f} s.")
        time.sleep(poll_s)


# =========================================================================================================
# Built-in kinds
# =========================================================================================================
# "preset" and "purpose" ("calibration") are labels for lists and the studio; they change nothing.
TRAIN_CONFIG_KEYS = ("train", "run", "resume", "max_steps", "preset", "purpose")


def prepare_train(ws: Workspace, config: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """``{"train": TrainConfig dict, "run": name?}`` for a new run, or ``{"resume": RUN, "train": ...?}`` to
    continue an existing one; optional ``max_steps`` overrides, ``preset``/``purpose`` labels. Validated here,
    at submit."""
    from .spaces import environment, training_allowed
    from .train import TrainConfig

    allowed, why = training_allowed(environment(ws.root))
    if not allowed:   # e.g. ZeroGPU: a GPU per call, for seconds to minutes
        raise ConfigError(why)
    unknown = sorted(set(config) - set(TRAIN_CONFIG_KEYS))
    if unknown:
        raise ConfigError(f"Unknown train job keys {unknown}; use {list(TRAIN_CONFIG_KEYS)}.")
    c = dict(config)
    if c.get("train") is not None:
        cfg = c["train"] if isinstance(c["train"], TrainConfig) else TrainConfig.from_dict(dict(c["train"]))
        c["train"] = cfg.to_dict()
    if c.get("max_steps") is not None:
        if int(c["max_steps"]) < 1:
            raise ConfigError(f"max_steps must be >= 1, got {c['max_steps']}.")
        c["max_steps"] = int(c["max_steps"])
    if c.get("resume"):
        run = validate_name(c["resume"], "run name")
        if not ws.run_layout(run).config.is_file():
            raise NotFoundError(f"There is no run {run!r} to resume in {ws.runs_dir}.")
        c.pop("run", None)
        return c, run
    c.pop("resume", None)
    if not c.get("train"):
        raise ConfigError("A train job needs a training config ('train') or the run to resume ('resume').")
    run = c.get("run")
    if not run:
        base = f"{c['train']['dataset']}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
        run, n = base, 1
        while ws.run_layout(run).root.exists() or JobLedger(ws).list(run=run, limit=1):
            n += 1
            run = f"{base}-{n}"
    validate_name(run, "run name")
    if ws.run_layout(run).config.exists():
        raise ConfigError(f"Run {run!r} already exists; resume it (jobs submit train --resume {run}) or choose "
                          "another run name.")
    c["run"] = run
    return c, run


class _TrainJobCallbacks:
    """Training hooks -> job progress (buffered; no I/O on the training thread except checkpoint events)."""

    def __init__(self, ctx: JobContext, total: int | None):
        self.ctx = ctx
        self.step = 0
        self.total = total
        if total:
            ctx.progress(total=total)
        ctx.set_info(phase="loading")

    def on_start(self, info: dict[str, Any]) -> None:
        self.step, self.total = int(info.get("step", 0)), int(info.get("total_steps") or self.total or 0) or None
        self.ctx.progress(step=self.step, total=self.total, phase="training")

    def on_step(self, r: dict[str, Any]) -> None:
        self.step = int(r["step"])
        info = {k: r[k] for k in ("loss", "loss_latent", "lr", "images_per_s", "peak_mem_mb", "epoch") if k in r}
        if "loss_color" in r:
            info["loss_color"] = r["loss_color"]
        self.ctx.progress(step=self.step, phase="training", **info)

    def on_validation(self, grid: Any) -> None:
        self.ctx.set_info(validation_grid=str(grid), validation_step=self.step)

    def on_checkpoint(self, path: Any) -> None:
        if path is not None:
            self.ctx.checkpoint(str(path), self.step)

    def should_stop(self) -> bool:
        return self.ctx.should_stop()


def _oom_message(step: int, cfg: Any) -> str:
    bs = getattr(cfg, "batch_size", None)
    res = getattr(cfg, "resolution", None)
    at = f"at {res} px" if res else "at the backbone's resolution"
    hint = "try batch 1 or the small-gpu preset" if (bs or 1) > 1 else \
        "try the small-gpu preset (frozen T5, truncated pixel-loss gradients) or a lower resolution"
    return f"CUDA out of memory at step {step} with batch {bs} {at}: {hint}."


def run_train_job(ctx: JobContext) -> dict[str, Any]:
    """The ``train`` kind: a new run, or (a later attempt, or ``resume``) the run continued bitwise-exactly
    from its latest checkpoint."""
    from .captions import CaptionStore
    from .train import TrainConfig, train

    c = ctx.config
    run = ctx.job.run
    layout = ctx.ws.run_layout(run)
    resume = run if (c.get("resume") or (ctx.attempt > 1 and layout.config.is_file())) else None
    if resume:
        saved = TrainConfig.from_json(layout.config.read_text(encoding="utf-8"))
        cfg = None
        if c.get("max_steps") is not None:
            cfg = saved
            cfg.max_steps = int(c["max_steps"])
        elif c.get("resume") and c.get("train"):
            cfg = TrainConfig.from_dict(c["train"])     # e.g. `jobs submit train --resume RUN --max-steps N`
        shown = cfg or saved
    else:
        cfg = TrainConfig.from_dict(c["train"])
        if c.get("max_steps") is not None:
            cfg.max_steps = int(c["max_steps"])
        shown = cfg
    cbs = _TrainJobCallbacks(ctx, shown.max_steps)
    ctx.log(f"{'resuming' if resume else 'starting'} run {run}"
            f"{' (attempt %d)' % ctx.attempt if ctx.attempt > 1 else ''}")
    store = CaptionStore.for_workspace(ctx.ws)
    try:
        res = train(cfg, ctx.ws, store, run_name=None if resume else run, resume=resume, callbacks=cbs,
                    log=lambda m: ctx.log(f"[train] {m}"))
    except MedArtError:
        raise
    except BaseException as e:
        if _is_cuda_oom(e):
            raise JobFailed(_oom_message(cbs.step + 1, shown)) from e
        raise
    finally:
        close = getattr(store, "close", None)
        if close:
            close()
    ctx.progress(step=res.step, total=res.total_steps)
    return {"status": res.status, "run": res.run, "step": res.step, "total_steps": res.total_steps,
            "last_checkpoint": str(res.last_checkpoint) if res.last_checkpoint else None, "exports": res.exports,
            "elapsed_s": res.elapsed_s, "train_images_per_s": res.train_images_per_s}


def prepare_sleep(ws: Workspace, config: dict[str, Any]) -> tuple[dict[str, Any], None]:
    unknown = sorted(set(config) - {"seconds", "steps", "ignore_stop", "fail"})
    if unknown:
        raise ConfigError(f"Unknown sleep job keys {unknown}.")
    c = {"seconds": float(config.get("seconds", 1.0)), "steps": int(config.get("steps", 10)),
         "ignore_stop": bool(config.get("ignore_stop", False)), "fail": bool(config.get("fail", False))}
    if c["steps"] < 1 or c["seconds"] < 0:
        raise ConfigError("sleep needs steps >= 1 and seconds >= 0.")
    return c, None


def run_sleep_job(ctx: JobContext) -> dict[str, Any]:
    """The ``sleep`` kind: ``steps`` ticks over ``seconds``, with progress; a cheap check of the queue, stop
    (``ignore_stop`` exercises the SIGTERM/SIGKILL escalation) and resume (continues at the reported step)."""
    c = ctx.config
    step = int(ctx.job.progress_info.get("step") or 0) if ctx.resumed else 0
    ctx.progress(step=step, total=c["steps"])
    while step < c["steps"]:
        if ctx.should_stop() and not c["ignore_stop"]:
            return {"status": "stopped", "step": step}
        time.sleep(c["seconds"] / c["steps"])
        step += 1
        ctx.progress(step=step)
        if c["fail"] and step == c["steps"] // 2:
            raise JobFailed(f"sleep job failed on purpose at step {step}.")
    return {"status": "finished", "step": step}


if __name__ != "__main__":   # as `python -m medart_core.jobs`, the canonical module (imported below) registers
    register_kind("train", run_train_job, uses_gpu=True, prepare=prepare_train)
    register_kind("sleep", run_sleep_job, uses_gpu=False, prepare=prepare_sleep)
    # Kinds of other stages, by name: their modules load only when such a job is submitted or run.
    register_kind("evaluate", "medart_core.evaluate:run_evaluate_job", uses_gpu=True,
                  prepare="medart_core.evaluate:prepare_evaluate_job")
    register_kind("generate", "medart_core.generate:run_generate_job", uses_gpu=True,
                  prepare="medart_core.generate:prepare_generate_job")
    register_kind("ablation", "medart_core.ablation:run_ablation_job", uses_gpu=True,
                  prepare="medart_core.ablation:prepare_ablation_job")


# =========================================================================================================
# CLI: worker, jobs submit|list|show|stop|resume|logs
# =========================================================================================================
def _has_option(p: argparse.ArgumentParser, opt: str) -> bool:
    return opt in p._option_string_actions


def _add_workspace(p: argparse.ArgumentParser) -> None:
    if not _has_option(p, "--workspace"):
        p.add_argument("--workspace", "-w", default=None,
                       help="workspace folder (default: $MEDART_HOME or ./workspace)")


def _add_train_options(p: argparse.ArgumentParser) -> None:
    from . import train as train_mod

    add = getattr(train_mod, "add_train_arguments", None) or getattr(train_mod, "_train_arguments")
    add(p)


def _print_job(job: Job, as_json: bool, ledger: JobLedger | None = None, full: bool = False) -> None:
    if as_json:
        d = job.to_dict()
        if full and ledger is not None:
            d["events"] = [dataclasses.asdict(e) for e in ledger.events(job.id)]
            d["log_tail"] = ledger.log_tail(job.id, 40)
        print(json.dumps(d, sort_keys=True, default=str))
        return
    if not full:
        err = f"  {job.error[:80]}" if job.error else ""
        print(f"{job.id}\t{job.kind}\t{job.progress_text()}\trun={job.run or '-'}\tpid={job.pid or '-'}{err}")
        return
    print(f"job {job.id} ({job.kind}), {job.progress_text()}")
    for k in ("run", "owner", "pid", "last_checkpoint", "log_path"):
        print(f"  {k}: {getattr(job, k)}")
    for k in ("created_at", "started_at", "finished_at", "heartbeat_at"):
        print(f"  {k}: {_iso(getattr(job, k))}")
    if ledger is not None:
        print("  events:")
        for e in ledger.events(job.id):
            print(f"    {_iso(e.at)}  #{e.attempt} {e.event:<15} -> {e.state}  {json.dumps(e.detail)}")
        if job.error:
            print("\n" + ledger.error_report(job))


def _cmd_worker(args: argparse.Namespace) -> int:
    ws = Workspace.open(args.workspace)
    return Supervisor(ws, gpu_slots=args.gpu_slots, cpu_slots=args.cpu_slots, poll_s=args.poll,
                      stop_grace_s=args.stop_grace, kill_grace_s=args.kill_grace,
                      heartbeat_timeout_s=args.heartbeat_timeout, idle_exit_s=args.idle_exit).run()


def _cmd_submit(args: argparse.Namespace) -> int:
    ws = Workspace.open(args.workspace)
    if args.kind == "train":
        from .train import config_from_args

        cfg = config_from_args(args)
        if args.resume:
            config = {"resume": args.resume, "train": cfg.to_dict() if cfg is not None else None}
        else:
            config = {"train": cfg.to_dict(), "run": args.run, "preset": args.preset or "cpu-smoke"}
    else:
        config = {"seconds": args.seconds, "steps": args.steps, "ignore_stop": args.ignore_stop}
    ex = LocalExecutor(ws, start_supervisor=not args.no_worker)
    _print_job(ex.submit(args.kind, config, owner=args.owner), args.json)
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    ledger = JobLedger(Workspace.open(args.workspace))
    ledger.reconcile()
    for job in ledger.list(states=args.state or None, kind=args.kind, limit=args.limit):
        _print_job(job, args.json)
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    ledger = JobLedger(Workspace.open(args.workspace))
    ledger.reconcile()
    _print_job(ledger.get(args.id), args.json, ledger, full=True)
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    ws = Workspace.open(args.workspace)
    ex = LocalExecutor(ws, start_supervisor=not args.no_worker)
    job = ex.stop(args.id)
    if args.wait:
        job = wait_for(ex.ledger, args.id, FINAL, timeout_s=args.wait)
    _print_job(job, args.json)
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    ws = Workspace.open(args.workspace)
    ex = LocalExecutor(ws, start_supervisor=not args.no_worker)
    _print_job(ex.resume(args.id, max_steps=args.max_steps), args.json)
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    ledger = JobLedger(Workspace.open(args.workspace))
    job = ledger.get(args.id)
    if not args.follow:
        print(ledger.log_tail(job.id, args.lines))
        return 0
    path = ledger.log_path(job.id)
    pos = 0
    while True:
        if path.is_file():
            with open(path, "rb") as f:
                f.seek(pos)
                chunk = f.read()
                pos += len(chunk)
            if chunk:
                sys.stdout.write(chunk.decode("utf-8", "replace"))
                sys.stdout.flush()
        job = ledger.get(job.id)
        if job.is_final:
            return 0
        time.sleep(0.5)


def _cmd_run(args: argparse.Namespace) -> int:
    return run_job_process(Workspace.open(args.workspace), args.id, int(args.attempt))


def register_cli(subparsers: Any) -> None:
    """Add ``worker`` and ``jobs`` (submit, list, show, stop, resume, logs) to the ``python -m medart_core``
    parser. Nothing heavy is imported here."""
    p = subparsers.add_parser("worker", help="run the job supervisor in the foreground (owns the accelerator)")
    _add_workspace(p)
    p.add_argument("--gpu-slots", type=int, default=1, help="accelerator jobs at once (default 1)")
    p.add_argument("--cpu-slots", type=int, default=2, help="CPU-light jobs at once beside them (default 2)")
    p.add_argument("--poll", type=float, default=0.5, help="seconds between supervision rounds")
    p.add_argument("--stop-grace", type=float, default=60.0, help="seconds after a stop request before SIGTERM")
    p.add_argument("--kill-grace", type=float, default=120.0, help="seconds after SIGTERM before SIGKILL")
    p.add_argument("--heartbeat-timeout", type=float, default=120.0,
                   help="a job silent this long is killed and marked interrupted")
    p.add_argument("--idle-exit", type=float, default=None, help="exit after this many seconds with nothing to do")
    p.set_defaults(func=_cmd_worker)

    jp = subparsers.add_parser("jobs", help="submit, list, show, stop, resume jobs and read their logs")
    jsub = jp.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")

    sp = jsub.add_parser("submit", help="queue a job (the supervisor is started if none runs)")
    ksub = sp.add_subparsers(dest="kind", required=True, metavar="KIND")
    kp = ksub.add_parser("train", help="a training run (same options as `train`)")
    _add_train_options(kp)
    kp = ksub.add_parser("sleep", help="a cheap diagnostic job (queue, stop and resume checks)")
    kp.add_argument("--seconds", type=float, default=5.0)
    kp.add_argument("--steps", type=int, default=10)
    kp.add_argument("--ignore-stop", action="store_true", help="ignore the stop flag (exercises SIGTERM/SIGKILL)")
    for kp in ksub.choices.values():
        _add_workspace(kp)
        kp.add_argument("--owner", default=None, help="who submits (shown in the list)")
        kp.add_argument("--json", action="store_true", help="print the job as one JSON line")
        kp.add_argument("--no-worker", action="store_true", help="do not start a supervisor if none runs")
        kp.set_defaults(func=_cmd_submit)

    p = jsub.add_parser("list", help="jobs, newest first")
    _add_workspace(p)
    p.add_argument("--state", action="append", choices=STATES, help="only jobs in this state (repeatable)")
    p.add_argument("--kind", default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--json", action="store_true", help="one JSON object per job per line")
    p.set_defaults(func=_cmd_list)

    p = jsub.add_parser("show", help="one job: state, progress, events, error with the log tail")
    p.add_argument("id")
    _add_workspace(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_show)

    p = jsub.add_parser("stop", help="ask a job to checkpoint and stop")
    p.add_argument("id")
    _add_workspace(p)
    p.add_argument("--wait", type=float, default=None, metavar="SECONDS", help="wait until it has stopped")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-worker", action="store_true", help="do not start a supervisor if none runs")
    p.set_defaults(func=_cmd_stop)

    p = jsub.add_parser("resume", help="queue a new attempt of an interrupted, stopped or failed job")
    p.add_argument("id")
    _add_workspace(p)
    p.add_argument("--max-steps", type=int, default=None, help="train to this step (also extends a done run)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-worker", action="store_true", help="do not start a supervisor if none runs")
    p.set_defaults(func=_cmd_resume)

    p = jsub.add_parser("logs", help="the job's log (stdout and stderr of every attempt)")
    p.add_argument("id")
    _add_workspace(p)
    p.add_argument("--lines", type=int, default=200)
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    p.set_defaults(func=_cmd_logs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m medart_core.jobs", description="Med-Art jobs and supervisor.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_cli(sub)
    p = sub.add_parser("_run", help=argparse.SUPPRESS)   # the job process itself (started by the supervisor)
    p.add_argument("workspace")
    p.add_argument("id")
    p.add_argument("attempt", type=int)
    p.set_defaults(func=_cmd_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m medart_core.jobs worker|jobs ...`` (the same commands ``python -m medart_core`` has)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MedArtError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # Run the canonical module (not a second copy named __main__), so kinds and classes are the same objects.
    from medart_core.jobs import main as _main

    sys.exit(_main())
