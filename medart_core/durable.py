"""Nothing lost on a restart: every acknowledged write of the workspace's SQLite stores is also appended to a log
in a durable folder, and a workspace on a fresh local disk is rebuilt from that log at start.

Why not simply put the workspace on the durable folder: on Hugging Face Spaces that folder is a mounted
storage bucket (a network filesystem), and SQLite in WAL mode must not live on a network mount (its
shared-memory index and locks need one kernel). So the databases stay on local disk and the durable folder
(``MEDART_DURABLE_DIR``) receives a copy of each write on its way out:

* **The write path.** Each store (captions, blind reviews, the job ledger, the users table: :data:`USERS`) calls
  three hooks in its one write transaction; :meth:`medart_core.store.SqliteStore.write` does it for them::

      con.execute("BEGIN IMMEDIATE")
      tx = durable.begin(durable.CAPTIONS, con, db_path)   # under the write lock: remember MAX(id) per table
      ...                                                  # the store's own inserts/updates
      entry = durable.collect(tx)                          # still under the lock: exactly this transaction's rows
      con.execute("COMMIT")
      durable.record(entry)                                # one JSON line, appended and fsynced, then return

  ``record`` runs *after* the COMMIT, so the log never holds a write the database rolled back (no phantom,
  no id that SQLite later hands to another row), and replay is idempotent (rows keyed by their primary key;
  a row seen twice is the same row). With ``MEDART_DURABLE_DIR`` unset, ``begin`` returns None after one
  environment lookup and the other two return at once: no query, no I/O.
* **Log files.** ``<durable>/<kind>/<start ns>-<pid>-<token>.jsonl`` (``captions``, ``reviews``, ``jobs``,
  ``users``; a store file that is not the workspace's own logs to ``<kind>@<file name>``, apart): one file per
  writing process (the
  studio, each job process, the CLI), so no two processes ever append to one file on a filesystem whose
  O_APPEND semantics across clients we cannot rely on. Each line is one committed transaction: the rows it
  inserted (append-only tables: caption ``images``/``events``, ``studies``/``pairs``/``votes``,
  ``job_events``), the whole row of each row of a small table it added, changed or deleted (``datasets``,
  ``users``), and a snapshot of each ``jobs`` row an event of the transaction belongs to (heartbeats and
  progress, which write no event, are not logged). A failed append starts a new file, so a torn line can only
  ever be a file's last.
* **One history.** A database may append only once it is in step with the log: merged at start, or begun while
  the log was empty. A sidecar marker ``<db>-durable`` (beside ``-wal``/``-shm``) says so; a fresh disk has
  none, so a write before the restore is refused (:class:`DurableWriteError`, nothing saved) instead of
  starting a second history whose ids collide with the logged one.
* **Files.** An import copies its normalised PNGs and the dataset's new manifest into
  ``<durable>/files/datasets/<name>/`` *before* its database commit; a blind-review study copies the images
  of its pairs that lie inside the workspace before its commit. Files are content-addressed (PNGs are named
  by pixel hash), so an orphan copy from a failed import is harmless, and a restored manifest keeps only
  the lines of images that are in the restored database.
* **At start** (:func:`medart_core.startup.prepare_workspace`, which the studio calls before anything else
  uses the stores; it opens each store once for its schema, then calls :func:`merge_store`): for each store,
  rows in the log but not in the local database are inserted (restore onto a fresh disk), rows in the local
  database but not in the log are appended to the log (a write whose append was cut short, or a workspace
  that existed before ``MEDART_DURABLE_DIR`` was set), and the caption cache is rebuilt from the events. For
  small tables a database that was in step before is the newer truth (a role changed or a user removed after
  the last logged line stays so). The same key with different contents in an append-only table (a database
  that took writes with the durable folder unset) stops the start with :class:`RestoreConflictError`,
  changing nothing, instead of merging two histories.

**Window of loss.** A write is acknowledged when its call returns without an exception; by then its log line
has been fsynced into the durable folder (as durable as ``fsync`` on that mount makes it), so a restart with
a fresh local disk restores it. A write can be committed locally and *not* be in the log only when the
process dies between the SQLite COMMIT and the end of the fsync (SIGKILL, out-of-memory, power loss) or when
the durable folder fails (the call then raises :class:`DurableWriteError` and the next write of the process
retries the append). Such a write was never acknowledged; it stays in the local database, and the next
:func:`~medart_core.startup.prepare_workspace` on the same disk copies it to the log. It is lost only if the
local disk is lost before that start: e.g. a job process SIGKILLed in that window on a Space that is then
restarted before the studio starts again. Not covered: job heartbeats/progress between events (a restored
running job is reconciled to ``interrupted``), job log files, training runs and checkpoints, generated samples
and caches (large, local).

One durable folder belongs to one workspace.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator

from .errors import ConfigError, MedArtError
from .fileio import atomic_write, fsync_dir

ENV_VAR = "MEDART_DURABLE_DIR"
FORMAT_VERSION = 1
FILES_DIR = "files"

__all__ = ["ENV_VAR", "CAPTIONS", "REVIEWS", "JOBS", "SPECS", "DurableWriteError", "RestoreConflictError",
           "Spec", "StoreMerge", "StartupReport", "durable_dir", "enabled", "begin", "collect", "record",
           "save_files", "merge_store", "sync_caption_files", "sync_review_files", "iter_log"]


class DurableWriteError(MedArtError):
    """A write was saved on this machine but could not be appended to the durable folder."""


class RestoreConflictError(MedArtError):
    """The local database and the durable log hold different rows under the same key."""


# ------------------------------------------------------------------------------------------------
# What each store logs
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    """How one SQLite store is replicated. Tables are listed parents first (the order a restore inserts)."""

    kind: str
    db_name: str                                       # file name in the workspace root
    small: tuple[tuple[str, str], ...] = ()            # (table, key): few rows that may go; compared whole
    snapshot: tuple[str, str, str, str] | None = None  # (table, key, event table, its column naming the key)
    append_only: tuple[tuple[str, str], ...] = ()      # (table, integer key): rows never change once inserted
    mutable: tuple[str, ...] = ()                      # small tables whose rows are also updated in place

    @property
    def log_name(self) -> str:
        return PurePosixPath(self.db_name).stem

    def log_folder(self, root: Path, db_path: str | os.PathLike) -> Path:
        """The workspace's own database logs to ``<root>/<kind>``; any other file of that store (a test's, a
        scratch copy) to a folder named after it, so it can never mix into the workspace's history."""
        name = Path(db_path).name
        return root / (self.log_name if name == self.db_name else f"{self.log_name}@{name}")


CAPTIONS = Spec("captions", "captions.sqlite", small=(("datasets", "name"),),
                append_only=(("images", "id"), ("events", "id")))
REVIEWS = Spec("reviews", "reviews.sqlite", append_only=(("studies", "id"), ("pairs", "id"), ("votes", "id")))
JOBS = Spec("jobs", "jobs.sqlite", snapshot=("jobs", "id", "job_events", "job_id"),
            append_only=(("job_events", "id"),))
# The users table (accounts.py): roles and removals survive too (lockouts are never logged).
USERS = Spec("users", "users.sqlite", small=(("users", "name"),), mutable=("users",))
SPECS = (CAPTIONS, REVIEWS, JOBS, USERS)


def durable_dir() -> Path | None:
    """``$MEDART_DURABLE_DIR`` as a path, or None when it is unset or empty (durability off)."""
    value = os.environ.get(ENV_VAR)
    return Path(value).expanduser() if value else None


def enabled() -> bool:
    return durable_dir() is not None


def ensure_root(root: Path) -> Path:
    """The durable folder, created if only its last component is missing. A missing parent usually means the
    bucket is not mounted: writing there would put the 'durable' copy on the local disk, so refuse."""
    if root.is_dir():
        return root
    if not root.parent.is_dir():
        raise DurableWriteError(
            f"{ENV_VAR}={root} does not exist and neither does {root.parent}: mount the storage bucket (Space "
            f"settings → Storage) or create the folder, or unset {ENV_VAR} to run without a durable copy.")
    root.mkdir(exist_ok=True)
    return root


# ------------------------------------------------------------------------------------------------
# Rows
# ------------------------------------------------------------------------------------------------
def _rows(con: sqlite3.Connection, sql: str, args: Iterable[Any] = ()) -> list[dict[str, Any]]:
    cur = con.execute(sql, tuple(args))
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, tuple(r))) for r in cur.fetchall()]


def _by_key(con: sqlite3.Connection, table: str, key: str) -> dict[Any, dict[str, Any]]:
    return {r[key]: r for r in _rows(con, f"SELECT * FROM {table}")}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal on the columns both have (a log written before a schema migration lacks the new columns)."""
    return all(a[c] == b[c] for c in a.keys() & b.keys())


# ------------------------------------------------------------------------------------------------
# The write path
# ------------------------------------------------------------------------------------------------
@dataclass
class _Tx:
    spec: Spec
    con: sqlite3.Connection
    db_path: Path
    root: Path
    maxima: dict[str, int]
    small: dict[str, dict[Any, dict[str, Any]]]


# A database may append to the log only once it is in step with it: merged by merge_store, or started while
# the log was still empty. The sidecar marker ``<db>-durable`` (beside -wal/-shm) records that; a fresh disk
# has none, so a write before the restore is refused instead of forking the history.
_IN_STEP: set[tuple[str, str]] = set()


def _marker(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + "-durable")


def _mark_in_step(spec: Spec, db_path: Path, root: Path) -> None:
    m = _marker(db_path)
    if not m.exists():
        m.write_text(json.dumps({"log": str(spec.log_folder(root, db_path)), "at": time.time()}) + "\n")
    _IN_STEP.add((str(db_path), str(root)))


def _in_step(spec: Spec, db_path: Path, root: Path) -> bool:
    if (str(db_path), str(root)) in _IN_STEP and _marker(db_path).exists():
        return True
    if _marker(db_path).exists() or not has_log(spec, root, db_path):
        _mark_in_step(spec, db_path, root)
        return True
    return False


@dataclass
class _Entry:
    spec: Spec
    folder: Path            # the log folder of the database it came from
    line: dict[str, Any]


def begin(spec: Spec, con: sqlite3.Connection, db_path: str | os.PathLike) -> _Tx | None:
    """Call right after ``BEGIN IMMEDIATE``: remembers where each table ends. None when durability is off.
    ``db_path`` is the store's database file (the log folder is named after it)."""
    root = durable_dir()
    if root is None:
        return None
    maxima, small = {}, {}
    for table, key in spec.append_only:
        try:
            maxima[table] = int(con.execute(f"SELECT COALESCE(MAX({key}), 0) FROM {table}").fetchone()[0])
        except sqlite3.OperationalError:   # the schema is being created in this very transaction
            maxima[table] = 0
    for table, key in spec.small:
        try:
            small[table] = _by_key(con, table, key)
        except sqlite3.OperationalError:
            small[table] = {}
    return _Tx(spec, con, Path(db_path), root, maxima, small)


def collect(tx: _Tx | None) -> _Entry | None:
    """Call just before ``COMMIT`` (the write lock is still held, so every new row is this transaction's).
    Returns what :func:`record` appends after the commit, or None when nothing durable changed."""
    if tx is None:
        return None
    spec, con = tx.spec, tx.con
    rows: dict[str, list[dict[str, Any]]] = {}
    deleted: dict[str, list[dict[str, Any]]] = {}
    for table, key in spec.small:
        now = _by_key(con, table, key)
        before = tx.small[table]
        changed = [r for k, r in now.items() if before.get(k) != r]
        gone = [r for k, r in before.items() if k not in now]
        if changed:
            rows[table] = changed
        if gone:
            deleted[table] = gone
    for table, key in spec.append_only:
        new = _rows(con, f"SELECT * FROM {table} WHERE {key} > ? ORDER BY {key}", (tx.maxima[table],))
        if new:
            rows[table] = new
    snapshot_event: dict[str, int] = {}
    if spec.snapshot is not None:
        table, key, ev_table, ev_col = spec.snapshot
        ev_key = dict(spec.append_only)[ev_table]
        for ev in rows.get(ev_table, []):
            snapshot_event[str(ev[ev_col])] = max(snapshot_event.get(str(ev[ev_col]), 0), int(ev[ev_key]))
        if snapshot_event:
            marks = ", ".join("?" * len(snapshot_event))
            rows[table] = _rows(con, f"SELECT * FROM {table} WHERE {key} IN ({marks})", list(snapshot_event))
    if not rows and not deleted:
        return None
    if not _in_step(spec, tx.db_path, tx.root):
        raise DurableWriteError(
            f"Nothing was saved: {tx.db_path} has not been restored from the durable folder "
            f"{spec.log_folder(tx.root, tx.db_path)} yet, and writing now would start a second history beside the "
            "logged one. Restart the studio (it restores at start) or run `python -m medart_core.startup`.")
    line: dict[str, Any] = {"v": FORMAT_VERSION, "kind": spec.kind, "t": time.time(), "pid": os.getpid(),
                            "rows": rows}
    if deleted:
        line["deleted"] = deleted
    if snapshot_event:
        line["snapshot_event"] = snapshot_event
    return _Entry(spec, spec.log_folder(tx.root, tx.db_path), line)


class _Log:
    """This process's append-only log file for one store (a new file after any failed append)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.fd: int | None = None
        self.path: Path | None = None
        self.backlog: list[bytes] = []
        self.lock = threading.Lock()

    def _open(self) -> int:
        ensure_root(self.folder.parent)
        self.folder.mkdir(exist_ok=True)
        self.path = self.folder / f"{time.time_ns()}-{os.getpid()}-{secrets.token_hex(4)}.jsonl"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
        fsync_dir(self.folder)
        return fd

    def append(self, data: bytes) -> None:
        with self.lock:
            pending = self.backlog + [data]
            try:
                if self.fd is None:
                    self.fd = self._open()
                view = memoryview(b"".join(pending))
                while view:
                    n = os.write(self.fd, view)
                    view = view[n:]
                os.fsync(self.fd)
            except (OSError, DurableWriteError) as e:
                self.backlog = pending
                if self.fd is not None:
                    try:
                        os.close(self.fd)
                    except OSError:
                        pass
                self.fd = None   # the next try writes a new file: a torn line stays the last of this one
                if isinstance(e, DurableWriteError):
                    raise
                raise DurableWriteError(
                    f"Saved on this machine, but the durable copy in {self.folder} failed ({e.strerror or e}); "
                    f"it is retried with the next save and at the next start. Until then a restart of the Space "
                    f"could lose this change: check the storage mount ({ENV_VAR})."
                ) from e
            self.backlog = []


_LOGS: dict[tuple[int, str], _Log] = {}
_LOGS_LOCK = threading.Lock()


def _log_for(folder: Path) -> _Log:
    k = (os.getpid(), str(folder))      # a forked child never writes through its parent's descriptor
    with _LOGS_LOCK:
        log = _LOGS.get(k)
        if log is None:
            log = _LOGS[k] = _Log(folder)
        return log


def record(entry: _Entry | None) -> None:
    """Append ``entry`` (from :func:`collect`, after the COMMIT) to this process's log and fsync it; only then
    may the write be acknowledged. Raises :class:`DurableWriteError` when the durable folder fails."""
    if entry is None:
        return
    data = (json.dumps(entry.line, ensure_ascii=False, separators=(",", ":"), allow_nan=False) + "\n").encode()
    _log_for(entry.folder).append(data)


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------
def _copy_durably(src: Path, dst: Path) -> None:
    def copy(out: Any) -> None:
        with open(src, "rb") as inp:
            shutil.copyfileobj(inp, out, 1 << 20)

    atomic_write(dst, copy, binary=True)


def save_files(pairs: Iterable[tuple[str | os.PathLike, str]], *, overwrite: bool = False) -> int:
    """Copy each ``(local file, path relative to the workspace)`` into ``<durable>/files/`` (fsynced).

    Without ``overwrite`` a copy of the same size already there is kept (PNG names are pixel hashes). Returns
    the number of files written; 0 and no I/O when durability is off."""
    root = durable_dir()
    if root is None:
        return 0
    base = ensure_root(root) / FILES_DIR
    n = 0
    try:
        for src, rel in pairs:
            src = Path(src)
            dst = base / _safe_rel(rel)
            if not overwrite and dst.is_file() and dst.stat().st_size == src.stat().st_size:
                continue
            _copy_durably(src, dst)
            n += 1
    except OSError as e:
        raise DurableWriteError(f"Could not copy files to the durable folder {base} ({e.strerror or e}); nothing "
                                f"was saved: check the storage mount ({ENV_VAR}) and try again.") from e
    return n


def _safe_rel(rel: str | os.PathLike) -> PurePosixPath:
    p = PurePosixPath(Path(rel).as_posix())
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise ConfigError(f"Durable file path {rel!r} must be relative to the workspace.")
    return p


def workspace_rel(ws_root: str | os.PathLike, path: str | os.PathLike) -> str | None:
    """``path`` relative to the workspace root, or None when it lies outside (then it is not copied)."""
    try:
        return Path(path).resolve().relative_to(Path(ws_root).resolve()).as_posix()
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------------
# Reading the log
# ------------------------------------------------------------------------------------------------
@dataclass
class _LogRead:
    entries: list[dict[str, Any]] = field(default_factory=list)
    torn: int = 0          # an unterminated last line (a write cut short: never acknowledged)
    corrupt: int = 0       # a line that does not parse although later lines follow
    files: int = 0


def _read_log(folder: Path) -> _LogRead:
    out = _LogRead()
    if not folder.is_dir():
        return out
    order: list[tuple[float, int, int, dict]] = []
    for fi, path in enumerate(sorted(folder.glob("*.jsonl"))):
        out.files += 1
        data = path.read_bytes()
        lines = data.split(b"\n")
        for li, raw in enumerate(lines):
            if not raw.strip():
                continue
            last = li == len(lines) - 1     # no newline after it
            try:
                line = json.loads(raw)
            except ValueError:
                if last:
                    out.torn += 1
                else:
                    out.corrupt += 1
                continue
            if last:
                out.torn += 1   # parsed, but its newline (written in the same call) is missing: not fsynced whole
                continue
            order.append((float(line.get("t", 0.0)), fi, li, line))
    order.sort(key=lambda x: x[:3])
    out.entries = [x[3] for x in order]
    return out


@dataclass
class _Folded:
    small: dict[str, dict[Any, dict[str, Any]]]
    snapshot: dict[Any, tuple[int, dict[str, Any]]]
    append_only: dict[str, dict[int, dict[str, Any]]]


def _fold(spec: Spec, entries: list[dict[str, Any]]) -> _Folded:
    small: dict[str, dict[Any, dict[str, Any]]] = {t: {} for t, _ in spec.small}
    snap: dict[Any, tuple[int, dict[str, Any]]] = {}
    appended: dict[str, dict[int, dict[str, Any]]] = {t: {} for t, _ in spec.append_only}
    for line in entries:
        rows, deleted = line.get("rows", {}), line.get("deleted", {})
        for table, key in spec.small:
            for r in rows.get(table, []):
                small[table][r[key]] = r
            for r in deleted.get(table, []):
                cur = small[table].get(r[key])
                # an immutable row goes only if it is the one that was deleted (not a later re-creation)
                if cur is not None and (table in spec.mutable or _same(cur, r)):
                    del small[table][r[key]]
        if spec.snapshot is not None:
            table, key, _, _ = spec.snapshot
            marks = line.get("snapshot_event", {})
            for r in rows.get(table, []):
                ev = int(marks.get(str(r[key]), 0))
                if r[key] not in snap or ev >= snap[r[key]][0]:
                    snap[r[key]] = (ev, r)
        for table, key in spec.append_only:
            for r in rows.get(table, []):
                appended[table].setdefault(int(r[key]), r)
    return _Folded(small, snap, appended)


# ------------------------------------------------------------------------------------------------
# Start: restore and sync
# ------------------------------------------------------------------------------------------------
@dataclass
class StoreMerge:
    kind: str
    restored: int = 0        # rows written into the local database from the log
    appended: int = 0        # rows copied from the local database into the log
    orphans: int = 0         # log rows whose parent row exists nowhere (skipped)
    torn: int = 0
    corrupt: int = 0


@dataclass
class StartupReport:
    enabled: bool
    durable_dir: Path | None = None
    stores: dict[str, StoreMerge] = field(default_factory=dict)
    files_restored: int = 0
    files_saved: int = 0
    seconds: float = 0.0

    @property
    def restored(self) -> int:
        return sum(m.restored for m in self.stores.values())

    @property
    def appended(self) -> int:
        return sum(m.appended for m in self.stores.values())

    def summary(self) -> str:
        if not self.enabled:
            return (f"No durable folder ({ENV_VAR} unset): the workspace lives on this disk only.")
        parts = [f"{k}: {m.restored} restored, {m.appended} saved" for k, m in self.stores.items()
                 if m.restored or m.appended]
        s = f"Durable folder {self.durable_dir}: " + ("; ".join(parts) if parts else "in step with the workspace")
        s += f"; files {self.files_restored} restored, {self.files_saved} saved ({self.seconds:.1f} s)."
        bad = sum(m.corrupt + m.orphans for m in self.stores.values())
        if bad:
            s += f" {bad} unreadable or orphaned log row(s) skipped."
        return s


def _insert(con: sqlite3.Connection, table: str, row: dict[str, Any], cols: set[str], *, replace: bool = False) -> None:
    keys = [c for c in row if c in cols]
    verb = "INSERT OR REPLACE" if replace else "INSERT"
    con.execute(f"{verb} INTO {table} ({', '.join(keys)}) VALUES ({', '.join('?' * len(keys))})",
                [row[c] for c in keys])


def _columns(con: sqlite3.Connection, table: str) -> set[str]:
    return {r[1] for r in con.execute(f"PRAGMA table_info({table})").fetchall()}


def has_log(spec: Spec, root: Path | None = None, db_path: str | os.PathLike | None = None) -> bool:
    """Whether the durable folder holds any log file for ``spec``'s database (the workspace's by default)."""
    root = root or durable_dir()
    return root is not None and any(spec.log_folder(root, db_path or spec.db_name).glob("*.jsonl"))


def merge_store(spec: Spec, db_path: str | os.PathLike, root: Path | None = None) -> StoreMerge:
    """Two-way merge of one store with its log: log rows missing locally are inserted, local rows missing
    from the log are appended to it. The database must exist with its schema (open the store once first).
    Raises RestoreConflictError, changing nothing, when both sides hold different rows under one key."""
    root = root or durable_dir()
    if root is None:
        raise ConfigError(f"merge_store needs a durable folder: set {ENV_VAR}.")
    root = ensure_root(root)
    report = StoreMerge(spec.kind)
    db_path = Path(db_path)
    folder = spec.log_folder(root, db_path)
    read = _read_log(folder)
    report.torn, report.corrupt = read.torn, read.corrupt
    log = _fold(spec, read.entries)
    # A database that was in step with the log before (its marker survives) is the newer truth for small tables:
    # a logged row it lacks was deleted here after its last logged line. A fresh one is restored from the log.
    was_in_step = _marker(db_path).exists()
    con = sqlite3.connect(db_path, timeout=30, isolation_level=None)
    conflicts: list[str] = []
    missing: dict[str, list[dict[str, Any]]] = {}
    gone: dict[str, list[dict[str, Any]]] = {}
    missing_marks: dict[str, int] = {}
    try:
        con.execute("PRAGMA busy_timeout = 30000")
        con.execute("PRAGMA foreign_keys = ON")
        con.execute("BEGIN IMMEDIATE")
        for table, key in spec.small:
            cols, db = _columns(con, table), _by_key(con, table, key)
            missing[table] = [r for k, r in db.items() if k not in log.small[table]]
            for k, row in log.small[table].items():
                if k not in db and was_in_step:
                    gone.setdefault(table, []).append(row)
                elif k not in db:
                    _insert(con, table, row, cols)
                    report.restored += 1
                elif not _same(db[k], row):
                    if table in spec.mutable:
                        missing[table].append(db[k])      # changed here after its last logged line
                    else:
                        conflicts.append(f"{table} {key}={k!r}")
        if spec.snapshot is not None:
            table, key, ev_table, ev_col = spec.snapshot
            ev_key = dict(spec.append_only)[ev_table]
            cols, db = _columns(con, table), _by_key(con, table, key)
            latest = {r[0]: int(r[1]) for r in con.execute(
                f"SELECT {ev_col}, MAX({ev_key}) FROM {ev_table} GROUP BY {ev_col}").fetchall()}
            for k, (ev, row) in log.snapshot.items():
                if k not in db:
                    _insert(con, table, row, cols)
                    report.restored += 1
                elif ev > latest.get(k, 0):
                    _insert(con, table, row, cols, replace=True)
                    report.restored += 1
            for k, row in db.items():
                if k not in log.snapshot or latest.get(k, 0) > log.snapshot[k][0]:
                    missing.setdefault(table, []).append(row)
                    missing_marks[str(k)] = latest.get(k, 0)
        for table, key in spec.append_only:
            cols, db = _columns(con, table), _by_key(con, table, key)
            for k in sorted(log.append_only[table]):
                row = log.append_only[table][k]
                if k in db:
                    if not _same(db[k], row):
                        conflicts.append(f"{table} {key}={k}")
                    continue
                try:
                    _insert(con, table, row, cols)
                    report.restored += 1
                except sqlite3.IntegrityError:
                    report.orphans += 1
            rows = [r for k, r in db.items() if k not in log.append_only[table]]
            if rows:
                missing[table] = rows
        if conflicts:
            con.execute("ROLLBACK")
            raise RestoreConflictError(
                f"The local {db_path.name} and the durable log in {folder} disagree about "
                f"{len(conflicts)} row(s) (first: {', '.join(conflicts[:3])}): the local database took writes "
                "before it was restored (with the durable folder unset). Nothing was changed. Stop the studio, "
                f"move the local {db_path.name} and its {db_path.name}-* files aside, and start again to restore "
                "from the log.")
        con.execute("COMMIT")
    finally:
        con.close()
    missing = {t: rows for t, rows in missing.items() if rows}
    if missing or gone:
        line: dict[str, Any] = {"v": FORMAT_VERSION, "kind": spec.kind, "t": time.time(), "pid": os.getpid(),
                                "rows": missing, "sync": True}
        if gone:
            line["deleted"] = gone
        if missing_marks:
            line["snapshot_event"] = missing_marks
        record(_Entry(spec, folder, line))
        report.appended = sum(len(r) for r in missing.values()) + sum(len(r) for r in gone.values())
    _mark_in_step(spec, db_path, root)
    return report


def sync_caption_files(ws, root: Path | None = None) -> tuple[int, int]:
    """Images and manifests: durable → local where missing locally, local → durable where missing there.
    Returns (files restored, files saved)."""
    root = root or durable_dir()
    if root is None or not (Path(ws.root) / CAPTIONS.db_name).exists():
        return 0, 0
    con = sqlite3.connect(Path(ws.root) / CAPTIONS.db_name, timeout=30)
    try:
        images = con.execute("SELECT dataset, file_name, pixel_hash FROM images").fetchall()
    finally:
        con.close()
    base = root / FILES_DIR
    restored, saved, to_save = 0, 0, []
    hashes: dict[str, set[str]] = {}
    for dataset, file_name, pixel_hash in images:
        hashes.setdefault(dataset, set()).add(pixel_hash)
        local = ws.image_path(dataset, file_name)
        rel = workspace_rel(ws.root, local)
        if rel is None:
            continue
        restored += _restore_or_queue(local, base / rel, rel, to_save)
    for dataset, keep in hashes.items():
        local = ws.manifest_path(dataset)
        rel = workspace_rel(ws.root, local)
        remote = base / rel
        if not local.is_file() and remote.is_file():
            lines = [ln for ln in remote.read_text(encoding="utf-8").splitlines()
                     if ln.strip() and json.loads(ln).get("pixel_hash") in keep]
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_text("".join(ln + "\n" for ln in lines), encoding="utf-8")
            restored += 1
        if local.is_file() and (not remote.is_file() or remote.read_bytes() != local.read_bytes()):
            saved += save_files([(local, rel)], overwrite=True)
    return restored, saved + save_files(to_save)


def sync_review_files(ws, root: Path | None = None) -> tuple[int, int]:
    """The images of blind-review pairs that lie inside the workspace, both ways like the caption files."""
    root = root or durable_dir()
    db = Path(ws.root) / REVIEWS.db_name
    if root is None or not db.exists():
        return 0, 0
    con = sqlite3.connect(db, timeout=30)
    try:
        paths = {p for row in con.execute("SELECT path_a, path_b FROM pairs").fetchall() for p in row}
    finally:
        con.close()
    restored, to_save = 0, []
    for p in sorted(paths):
        rel = workspace_rel(ws.root, p)
        if rel is None:
            continue
        restored += _restore_or_queue(Path(p), root / FILES_DIR / rel, rel, to_save)
    return restored, save_files(to_save)


def _restore_or_queue(local: Path, remote: Path, rel: str, to_save: list[tuple[Path, str]]) -> int:
    """A file lost locally comes back from the durable copy (returns 1); one present locally is queued in
    ``to_save`` to be saved (``save_files`` skips those already saved)."""
    if not local.is_file() and remote.is_file():
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(remote, local)
        return 1
    if local.is_file():
        to_save.append((local, rel))
    return 0


def iter_log(kind: str) -> Iterator[dict[str, Any]]:
    """Every committed transaction logged for ``kind`` ("captions", "reviews", "jobs"), in commit-time order."""
    root = durable_dir()
    if root is None:
        return iter(())
    spec = {s.kind: s for s in SPECS}[kind]
    return iter(_read_log(root / spec.log_name).entries)
