"""The ledger: ``W/jobs.sqlite`` (WAL) with one row per job (its current state) and the append-only
``job_events`` log. Every state change writes the event and the row in one transaction, so the row is always
the fold of the events (``state_from_events``).

Besides reading, submitting and steering, it has one public method per role's write: the supervisor's
(``start_attempt``, ``process_gone``, ``signal_sent``, ``supervisor_beat``) and the job process's
(``beat``, ``read_flags``, ``checkpoint``, ``finish``). Connection per thread, WAL, schema version and the
write transaction with its durable write-through (``durable.JOBS``) come from ``store.SqliteStore``. The
ledger must live on a local disk (SQLite WAL needs shared memory; not a network mount).
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .. import durable
from ..errors import ConfigError, NotFoundError
from ..store import SqliteStore
from ..workspace import Workspace, validate_name
from .channel import slurm_log_section
from .kinds import get_kind, resume_hint
from .process import process_alive, process_start_token, signal_group
from .records import ACTIVE, DONE, FAILED, INTERRUPTED, QUEUED, RUNNING, STATES, STOPPED, STOPPING, Job, JobEvent
from .records import at_step as _at_step
from .records import jobs_dir, tail_text
from .records import now as _now

SCHEMA_VERSION = 2
BUSY_TIMEOUT_MS = 15_000

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
    updated_at        REAL NOT NULL,
    executor          TEXT NOT NULL DEFAULT 'local',  -- a name from medart_core.executors (schema 2)
    remote_id         TEXT,                     -- the Slurm job id of the current attempt
    remote_folder     TEXT,                     -- its submitit folder (Slurm's stdout/stderr)
    remote_reason     TEXT                      -- Slurm's PENDING reason / the interruption's cause
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


# Schema 2 (issue 17): where a job runs. A ledger of schema 1 gets the columns (every old row: "local").
_V2_COLUMNS = (("executor", "TEXT NOT NULL DEFAULT 'local'"), ("remote_id", "TEXT"), ("remote_folder", "TEXT"),
               ("remote_reason", "TEXT"))


def _add_executor_columns(con: sqlite3.Connection) -> None:
    have = {r[1] for r in con.execute("PRAGMA table_info(jobs)").fetchall()}
    for name, decl in _V2_COLUMNS:
        if name not in have:      # a schema-0 file just created by _SCHEMA has them already
            con.execute(f"ALTER TABLE jobs ADD COLUMN {name} {decl}")


class JobLedger(SqliteStore):
    """The job table and its event log over ``ws.jobs_db``; safe across threads and processes. Connection,
    schema version and the write transaction with its durable write-through come from ``SqliteStore``."""

    SCHEMA_VERSION = SCHEMA_VERSION
    SCHEMA = _SCHEMA
    # A ledger written before it kept a version (user_version 0): the script only adds what is missing.
    MIGRATIONS = {0: _SCHEMA, 1: _add_executor_columns}
    DURABLE_SPEC = durable.JOBS          # new job events + their jobs rows (heartbeats write no event)
    BUSY_TIMEOUT_MS = BUSY_TIMEOUT_MS
    BUSY_MESSAGE = ("The job ledger {path} is busy (another process held it for over {seconds} s); try again in "
                    "a moment.")

    def __init__(self, ws: Workspace):
        self.ws = ws
        super().__init__(ws.jobs_db)

    @classmethod
    def for_workspace(cls, ws: Workspace) -> "JobLedger":
        return cls(ws)

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
        row = self._row(self.conn(), job_id)
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
        return [Job.from_row(r) for r in self.conn().execute(sql, args).fetchall()]

    def events(self, job_id: str) -> list[JobEvent]:
        rows = self.conn().execute("SELECT * FROM job_events WHERE job_id = ? ORDER BY id", (job_id,)).fetchall()
        return [JobEvent(r["id"], r["job_id"], r["attempt"], r["event"], r["state"], json.loads(r["detail"]),
                         r["at"]) for r in rows]

    def state_from_events(self, job_id: str) -> tuple[str, int] | None:
        """(state, attempt) folded from the event log alone: equals the row's, by construction."""
        r = self.conn().execute("SELECT state, attempt FROM job_events WHERE job_id = ? ORDER BY id DESC LIMIT 1",
                                 (job_id,)).fetchone()
        return (r["state"], r["attempt"]) if r else None

    def log_path(self, job_id: str) -> Path:
        return jobs_dir(self.ws) / validate_name(job_id, "job id") / "log.txt"

    def log_tail(self, job_id: str, lines: int = 40, max_bytes: int = 64_000) -> str:
        """The last ``lines`` lines of the job's log, reading at most ``max_bytes`` from its end (O(1)); for a
        remote job that failed before its code started, Slurm's own stderr/stdout tail below it."""
        own = tail_text(self.log_path(job_id), lines, max_bytes)
        slurm_part = self._slurm_section(job_id, lines)
        return "\n\n".join(p for p in (own, slurm_part) if p)

    def _slurm_section(self, job: Job | str, lines: int) -> str:
        job = self.get(job) if isinstance(job, str) else job
        if not job.is_remote:
            return ""
        return slurm_log_section(self.ws, job, lines)

    def error_report(self, job: Job | str, lines: int = 20) -> str:
        """What a user sees for a failed/interrupted job: the cause in one sentence, the log tail below."""
        job = self.get(job) if isinstance(job, str) else job
        if not job.error:
            return ""
        tail = tail_text(self.log_path(job.id), lines)
        out = f"{job.error}\n\nLast lines of {job.log_path}:\n{tail}" if tail else job.error
        slurm_part = self._slurm_section(job, lines)     # the failure happened before our code ran
        return f"{out}\n\n{slurm_part}" if slurm_part else out

    # ---- submitting and steering ------------------------------------------------------------------------
    def submit(self, kind: str, config: dict[str, Any] | None = None, *, owner: str | None = None,
               job_id: str | None = None, cwd: str | os.PathLike | None = None, executor: str = "local") -> Job:
        """Queue a job of a registered kind; the kind's ``prepare`` validates the config first. ``executor``:
        where it runs (the caller checked the name); the supervisor starts or submits it from this row."""
        k = get_kind(kind)
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
        with self.write() as con:
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
                "created_at, queued_at, updated_at, executor) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?)",
                (job_id, kind, k.target, int(k.uses_gpu), json.dumps(config, sort_keys=True), owner,
                 str(Path(cwd or os.getcwd()).resolve()), QUEUED, run, str(log), now, now, now, executor))
            self._event(con, job_id, 1, "submitted", QUEUED, {"owner": owner, "run": run, "executor": executor},
                        now)
        return self.get(job_id)

    def request_stop(self, job_id: str, *, reason: str = "requested") -> Job:
        """Set the stop flag: the job checkpoints at its next safe point and ends ``stopped``. A queued job is
        stopped at once (it never started). The supervisor escalates to SIGTERM/SIGKILL after a grace."""
        with self.write() as con:
            row = self._row(con, job_id)
            if row is None:
                raise NotFoundError(f"No job {job_id!r}; `jobs list` shows the jobs.")
            if row["state"] == QUEUED and row["remote_id"] is not None:
                # already handed to Slurm: the supervisor cancels it there (or it stops at its next step)
                self._transition(con, row, "stop_requested", STOPPING, {"reason": reason, "remote": True},
                                 stop_requested_at=_now())
            elif row["state"] == QUEUED:
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

    def resume(self, job_id: str, *, max_steps: int | None = None, owner: str | None = None,
               executor: str | None = None) -> Job:
        """Queue a new attempt of an interrupted, stopped or failed job (same id, attempt + 1). A ``done`` job
        may be resumed with a larger ``max_steps`` (training continues past its end). ``executor``: where the
        new attempt runs (None: where the last one ran)."""
        with self.write() as con:
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
            where = executor or row["executor"] or "local"
            if where != (row["executor"] or "local"):
                detail["executor"] = where
            now = _now()
            self._transition(con, row, "resumed", QUEUED, detail, attempt=row["attempt"] + 1, executor=where,
                             remote_id=None, remote_folder=None, remote_reason=None,
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
            if job.is_remote:
                continue         # Slurm says whether it lives: the supervisor's poll reconciles it
            if job.id in children:
                pass
            elif job.pid is None:
                if now - (job.started_at or job.updated_at) > started_grace_s:
                    cause = "The supervisor stopped before recording the job's process."
                    if self.process_gone(job.id, job.attempt, None, cause=cause):
                        changed.append(job.id)
                continue
            elif not process_alive(job.pid, job.pid_start):
                if self.process_gone(job.id, job.attempt, None):
                    changed.append(job.id)
                continue
            if heartbeat_timeout_s is not None and job.heartbeat_at is not None \
                    and now - job.heartbeat_at > heartbeat_timeout_s:
                age = now - job.heartbeat_at
                signal_group(job.pid, job.pid_start, signal.SIGKILL)
                cause = (f"The job's process (pid {job.pid}) sent no heartbeat for {age:.0f} s (hung or frozen) "
                         f"and was killed{resume_hint(job)}")
                if self.process_gone(job.id, job.attempt, None, cause=cause, event_detail={"heartbeat_age_s": age}):
                    changed.append(job.id)
        return [self.get(j) for j in changed]

    def process_gone(self, job_id: str, attempt: int, returncode: int | None, *, cause: str | None = None,
                      event_detail: dict[str, Any] | None = None) -> bool:
        """The process of ``attempt`` ended without writing its final state: record why."""
        with self.write() as con:
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
                             f"{_at_step(job)} (out of memory, or killed by hand){resume_hint(job)}")
                else:
                    cause = (f"The job's process (pid {job.pid}) is gone{_at_step(job)} (killed, out of memory, or "
                             f"the machine restarted){resume_hint(job)}")
            self._transition(con, row, "interrupted", INTERRUPTED, detail, error=cause, finished_at=now)
            return True

    # ---- supervisor side ---------------------------------------------------------------------------------
    def start_attempt(self, job_id: str, spawn: Callable[[Job], subprocess.Popen]) -> subprocess.Popen | None:
        """queued -> running: spawn the process and record its pid + start token in one transaction (the
        job process waits until it sees its own pid in the row, so an orphan of a crashed supervisor
        cannot run a job twice)."""
        with self.write() as con:
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

    def signal_sent(self, job_id: str, attempt: int, sig: int) -> None:
        col = "term_sent_at" if sig == signal.SIGTERM else "kill_sent_at"
        with self.write() as con:
            row = self._row(con, job_id)
            if row is None or row["attempt"] != attempt or row["state"] not in ACTIVE:
                return
            self._transition(con, row, "signal", row["state"], {"signal": signal.Signals(sig).name},
                             **{col: _now()})

    # ---- job-process side --------------------------------------------------------------------------------
    def beat(self, job_id: str, attempt: int, *, progress: float | None = None,
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
        with self.write() as con:
            cur = con.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id = ? AND attempt = ? AND state IN (?, ?)",
                              (*args, job_id, attempt, RUNNING, STOPPING))
            if cur.rowcount == 0:
                return False, True
            r = con.execute("SELECT stop_requested_at FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return True, r["stop_requested_at"] is not None

    def read_flags(self, job_id: str, attempt: int) -> tuple[bool, bool]:
        r = self.conn().execute("SELECT state, attempt, stop_requested_at FROM jobs WHERE id = ?",
                                 (job_id,)).fetchone()
        if r is None or r["attempt"] != attempt or r["state"] not in ACTIVE:
            return False, True
        return True, r["stop_requested_at"] is not None

    def checkpoint(self, job_id: str, attempt: int, path: str, step: int | None) -> None:
        with self.write() as con:
            row = self._row(con, job_id)
            if row is None or row["attempt"] != attempt or row["state"] not in ACTIVE:
                return
            self._transition(con, row, "checkpoint", row["state"], {"path": path, "step": step},
                             last_checkpoint=path)

    def finish(self, job_id: str, attempt: int, state: str, *, error: str | None = None,
                result: dict[str, Any] | None = None, progress: float | None = None,
                info: dict[str, Any] | None = None, detail: dict[str, Any] | None = None) -> bool:
        with self.write() as con:
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

    # ---- supervisor side, remote jobs (what the Slurm bridge learnt from Slurm and the job's files) -------
    def _remote_row(self, con: sqlite3.Connection, job_id: str, attempt: int,
                    states: Sequence[str]) -> sqlite3.Row | None:
        row = self._row(con, job_id)
        if row is None or row["attempt"] != attempt or row["state"] not in states:
            return None
        return row

    def remote_submitted(self, job_id: str, attempt: int, remote_id: str, folder: str) -> bool:
        """The attempt is in Slurm's queue: its Slurm id and submitit folder, with an event, in one transaction."""
        with self.write() as con:
            row = self._remote_row(con, job_id, attempt, (QUEUED, STOPPING))
            if row is None or row["remote_id"] is not None:
                return False
            self._transition(con, row, "submitted_remote", row["state"],
                             {"executor": row["executor"], "remote_id": remote_id, "folder": folder},
                             remote_id=remote_id, remote_folder=folder, remote_reason=None)
        return True

    def remote_pending(self, job_id: str, attempt: int, reason: str) -> bool:
        """Slurm holds the job PENDING (a requeued one too: running -> queued); an event when the reason changes."""
        with self.write() as con:
            row = self._remote_row(con, job_id, attempt, (QUEUED, RUNNING))
            if row is None:
                return False
            if row["state"] == RUNNING:      # submitit requeued it after a time limit or a preemption
                self._transition(con, row, "requeued", QUEUED, {"reason": reason}, remote_reason=reason,
                                 queued_at=_now())
            elif row["remote_reason"] != reason:
                self._transition(con, row, "pending", QUEUED, {"reason": reason}, remote_reason=reason)
        return True

    def remote_running(self, job_id: str, attempt: int) -> bool:
        """queued -> running: Slurm started the attempt on a node."""
        with self.write() as con:
            row = self._remote_row(con, job_id, attempt, (QUEUED,))
            if row is None:
                return False
            now = _now()
            self._transition(con, row, "started", RUNNING, {"remote_id": row["remote_id"]}, started_at=now,
                             heartbeat_at=now, remote_reason=None, finished_at=None)
        return True

    def remote_beat(self, job_id: str, attempt: int, heartbeat_at: float | None, progress: float | None,
                    info: dict[str, Any] | None) -> bool:
        """The job's own heartbeat and progress, read from its files (no event: heartbeats write none)."""
        sets, args = ["updated_at = ?"], [_now()]
        for col, val in (("heartbeat_at", heartbeat_at), ("progress", progress),
                         ("progress_info", json.dumps(info, sort_keys=True) if info is not None else None)):
            if val is not None:
                sets.append(f"{col} = ?")
                args.append(val)
        with self.write() as con:
            cur = con.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id = ? AND attempt = ? AND state IN (?, ?)",
                              (*args, job_id, attempt, RUNNING, STOPPING))
        return cur.rowcount > 0

    def remote_gone(self, job_id: str, attempt: int, state: str, message: str, *,
                    slurm_state: str = "") -> bool:
        """Slurm ended the attempt without its final record: ``state`` (interrupted/failed) with ``message``;
        a job being stopped through Med-Art ends ``stopped``."""
        with self.write() as con:
            row = self._remote_row(con, job_id, attempt, (QUEUED, RUNNING, STOPPING))
            if row is None:
                return False
            detail = {"remote_id": row["remote_id"], "slurm_state": slurm_state}
            if row["state"] == STOPPING:
                self._transition(con, row, "finished", STOPPED, dict(detail, how="cancelled on Slurm"),
                                 finished_at=_now())
            else:
                event = "interrupted" if state == INTERRUPTED else "finished"
                self._transition(con, row, event, state, detail, error=message, finished_at=_now(),
                                 remote_reason=slurm_state or None)
        return True

    def remote_failed_to_submit(self, job_id: str, attempt: int, message: str) -> bool:
        """sbatch refused the attempt: it fails with Slurm's words (nothing was queued there)."""
        with self.write() as con:
            row = self._remote_row(con, job_id, attempt, (QUEUED, STOPPING))
            if row is None or row["remote_id"] is not None:
                return False
            self._transition(con, row, "finished", FAILED, {"submit_error": message}, error=message,
                             finished_at=_now())
        return True

    # ---- supervisor row (for display; the flock is what guarantees one supervisor) ----------------------
    def supervisor_beat(self, pid: int, token: str | None, started_at: float) -> None:
        with self.write() as con:
            con.execute("INSERT INTO supervisor (id, pid, pid_start, started_at, heartbeat_at) VALUES (1, ?, ?, ?, ?) "
                        "ON CONFLICT(id) DO UPDATE SET pid = excluded.pid, pid_start = excluded.pid_start, "
                        "started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at",
                        (pid, token, started_at, _now()))

    def supervisor_row(self) -> dict[str, Any] | None:
        r = self.conn().execute("SELECT * FROM supervisor WHERE id = 1").fetchone()
        return dict(r) if r else None
