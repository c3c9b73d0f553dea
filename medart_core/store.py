"""One SQLite store base for the workspace's databases (captions, users, blind reviews, the job ledger).

A store is a subclass of :class:`SqliteStore` that sets a few class attributes and writes its queries; the
base owns the connection, the schema version and the write transaction with its durable write-through::

    class ReviewStore(SqliteStore):
        SCHEMA_VERSION = 1                     # PRAGMA user_version of a database this code writes
        SCHEMA = "CREATE TABLE ..."            # what create(con) runs on a fresh database (or override create)
        MIGRATIONS = {0: "CREATE ..."}         # from_version -> SQL script or callable(con): one step up
        DURABLE_SPEC = durable.REVIEWS         # or None: nothing replicated to MEDART_DURABLE_DIR
        BUSY_MESSAGE = "The review database {path} is busy ..."   # optional; {path} and {seconds} filled in

        def vote(self, ...):
            with self.write() as con:          # BEGIN IMMEDIATE ... COMMIT, then the durable append
                con.execute("INSERT INTO votes ...")

The contract:

* ``__init__(path)`` opens the file (made with mode 0600 through :func:`~medart_core.workspace.private_file`,
  its folder created) and brings its schema up to date, unless the class sets ``LAZY = True``: then the file
  is made by the first :meth:`~SqliteStore.conn` (the users table: reading never creates it).
* :meth:`~SqliteStore.conn` is the calling thread's connection: ``sqlite3.Row`` rows, ``isolation_level=None``
  (transactions only where a store asks for one), WAL (set once, persistent in the file), ``busy_timeout``,
  ``foreign_keys=ON``, ``synchronous=FULL``. A forked child never touches its parent's connections (pid check),
  and a pickled store reopens its file on the other side. :meth:`~SqliteStore.close` closes every connection
  the store opened, in any thread; the store refuses use afterwards (``RuntimeError``): open a new one.
* Schema: a database at ``SCHEMA_VERSION`` opens without taking the write lock. One without tables gets
  :meth:`~SqliteStore.create`; an older one (``user_version`` below, tables present: also a file written
  before the store kept a version, at 0) gets :meth:`~SqliteStore.migrate` ``(con, from_version)``, which by
  default applies ``MIGRATIONS[v]`` for each version up to ``SCHEMA_VERSION``; both run inside one
  ``BEGIN IMMEDIATE`` transaction with the new ``user_version``, so a failed upgrade changes nothing. A newer
  one is refused (:class:`~medart_core.errors.ConfigError`). Schema transactions are not logged to the durable
  folder (they add no rows; the start-up merge reconciles a migrated database with its log).
* :meth:`~SqliteStore.write` ``(*, replicate=True)`` is one write transaction, in the order
  :mod:`medart_core.durable` documents: ``BEGIN IMMEDIATE`` (a database locked for longer than the busy
  timeout raises :class:`StoreBusyError` with ``BUSY_MESSAGE``, not a raw ``OperationalError``),
  ``durable.begin``, the caller's statements, ``durable.collect``, ``COMMIT``, ``durable.record``; any
  exception rolls back and nothing is logged. ``replicate=False`` keeps a transaction out of the durable log
  (failed sign-ins: attacker-driven writes).
* :meth:`~SqliteStore.read` is one consistent snapshot across several statements (``BEGIN`` ... ``COMMIT``;
  WAL readers never wait for the writer). Inside a running read or write it simply joins it.
"""
from __future__ import annotations

import os
import sqlite3
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Mapping, Union

from . import durable
from .errors import ConfigError, MedArtError
from .workspace import private_file

__all__ = ["SqliteStore", "StoreBusyError", "run_script"]

Migration = Union[str, Callable[[sqlite3.Connection], None]]
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6


class StoreBusyError(MedArtError):
    """Another process held a store's write lock for longer than the busy timeout; nothing was written."""


def run_script(con: sqlite3.Connection, sql: str) -> None:
    """Run a multi-statement script statement by statement: ``executescript`` would COMMIT first, which
    must not happen inside the store's schema transaction."""
    stmt = ""
    for line in sql.splitlines(keepends=True):
        stmt += line
        if sqlite3.complete_statement(stmt):     # trigger bodies hold ';' too: split only on whole statements
            con.execute(stmt)
            stmt = ""
    if stmt.strip():
        con.execute(stmt)


def _is_busy(e: sqlite3.OperationalError) -> bool:
    code = getattr(e, "sqlite_errorcode", None)
    return (code is not None and code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)) or "locked" in str(e) or \
        "busy" in str(e)


class SqliteStore:
    """Connection per thread and process, schema by version, write transactions with durable write-through."""

    SCHEMA_VERSION: ClassVar[int] = 1
    SCHEMA: ClassVar[str] = ""
    MIGRATIONS: ClassVar[Mapping[int, Migration]] = {}
    DURABLE_SPEC: ClassVar[durable.Spec | None] = None
    BUSY_MESSAGE: ClassVar[str] = ("The database {path} is busy (another process held it for over {seconds} s); "
                                   "try again in a moment.")
    BUSY_TIMEOUT_MS: ClassVar[int] = 30_000
    LAZY: ClassVar[bool] = False

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._reset()
        if not self.LAZY:
            self.conn()

    @property
    def db_path(self) -> Path:
        return self.path

    # ---- connections -------------------------------------------------------------------------------------
    def _reset(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[sqlite3.Connection] = []
        self._closed = False
        self._pid = os.getpid()
        self._ready = False            # schema checked by this process

    def __getstate__(self) -> dict[str, Any]:
        # Connections cannot cross processes: a pickled store reopens the same file on the other side.
        skip = {"_local", "_lock", "_conns", "_closed", "_pid", "_ready"}
        return {k: v for k, v in self.__dict__.items() if k not in skip}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # check_same_thread=False only so close() may close every thread's connection.
        con = sqlite3.connect(private_file(self.path), timeout=self.BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                              check_same_thread=False)
        con.row_factory = sqlite3.Row
        con.execute(f"PRAGMA busy_timeout = {int(self.BUSY_TIMEOUT_MS)}")
        con.execute("PRAGMA foreign_keys = ON")
        con.execute("PRAGMA synchronous = FULL")     # an acknowledged write must survive a power cut
        return con

    def conn(self) -> sqlite3.Connection:
        """The calling thread's connection (opened, and the schema brought up to date, on first use)."""
        if os.getpid() != self._pid:
            self._reset()              # forked child: the parent's connections must not be used (or closed) here
        if self._closed:
            raise RuntimeError(f"This {type(self).__name__} is closed; open a new one.")
        con = getattr(self._local, "con", None)
        if con is not None:
            return con
        con = self._connect()
        try:
            if not self._ready:
                self._ensure_schema(con)
                self._ready = True
        except BaseException:
            con.close()
            raise
        with self._lock:
            if self._closed:           # closed by another thread meanwhile
                con.close()
                raise RuntimeError(f"This {type(self).__name__} is closed; open a new one.")
            self._conns.append(con)
        self._local.con = con
        return con

    def close(self) -> None:
        """Close every connection this store opened (in any thread). The store is unusable afterwards."""
        if os.getpid() != self._pid:
            self._reset()              # a forked child closes nothing of its parent's
        with self._lock:
            conns, self._conns = self._conns, []
            self._closed = True
        for con in conns:
            try:
                con.close()
            except sqlite3.Error:
                pass

    def __enter__(self) -> "SqliteStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- transactions ------------------------------------------------------------------------------------
    @contextmanager
    def write(self, *, replicate: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction; IMMEDIATE takes the write lock up front, so what the body reads and what it
        writes see the same database. ``replicate=False``: not logged to the durable folder."""
        with self._transaction(self.conn(), replicate=replicate) as con:
            yield con

    @contextmanager
    def _transaction(self, con: sqlite3.Connection, *, replicate: bool) -> Iterator[sqlite3.Connection]:
        try:
            con.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            if _is_busy(e):
                raise StoreBusyError(self.BUSY_MESSAGE.format(
                    path=self.path, seconds=self.BUSY_TIMEOUT_MS // 1000)) from e
            raise
        try:
            spec = self.DURABLE_SPEC if replicate else None
            tx = durable.begin(spec, con, self.path) if spec is not None else None   # None: durability off
            yield con
            entry = durable.collect(tx)          # this transaction's rows, read under the write lock
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        durable.record(entry)                    # appended + fsynced to the durable folder before we return

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A snapshot across several statements; inside a running transaction, that transaction's view."""
        con = self.conn()
        if con.in_transaction:
            yield con
            return
        con.execute("BEGIN")
        try:
            yield con
        finally:
            if con.in_transaction:
                con.execute("COMMIT")

    # ---- schema ------------------------------------------------------------------------------------------
    def create(self, con: sqlite3.Connection) -> None:
        """Make the tables of a fresh database (inside the schema transaction); default: run ``SCHEMA``."""
        run_script(con, self.SCHEMA)

    def migrate(self, con: sqlite3.Connection, from_version: int) -> None:
        """Bring a database at ``from_version`` up to ``SCHEMA_VERSION`` (inside the schema transaction)."""
        for version in range(from_version, self.SCHEMA_VERSION):
            step = self.MIGRATIONS.get(version)
            if step is None:
                raise ConfigError(f"{self.path} has schema {version}, which this Med-Art Studio cannot upgrade "
                                  f"to {self.SCHEMA_VERSION}; open it with the version that wrote it and export.")
            if callable(step):
                step(con)
            else:
                run_script(con, step)

    def _check_version(self, version: int) -> None:
        if version > self.SCHEMA_VERSION:
            raise ConfigError(f"{self.path} was written by a newer Med-Art Studio (schema {version}, this one knows "
                              f"{self.SCHEMA_VERSION}); upgrade Med-Art Studio to open it.")

    def _ensure_schema(self, con: sqlite3.Connection) -> None:
        version = int(con.execute("PRAGMA user_version").fetchone()[0])
        if version == self.SCHEMA_VERSION:
            return                     # the common case: no write lock just to open the store
        self._check_version(version)
        mode = con.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            # e.g. a network filesystem without shared memory: still correct, just less concurrent
            warnings.warn(f"{self.path} could not use WAL mode (got {mode!r}); keep the workspace on a local "
                          "disk, or readers will wait for writers.", RuntimeWarning, stacklevel=4)
        with self._transaction(con, replicate=False):
            version = int(con.execute("PRAGMA user_version").fetchone()[0])   # another process may have won
            self._check_version(version)
            if version < self.SCHEMA_VERSION:
                if con.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0:
                    self.create(con)
                else:
                    self.migrate(con, version)
                con.execute(f"PRAGMA user_version = {int(self.SCHEMA_VERSION)}")
