"""Who may use the studio, and with which role: the users table of a workspace (``W/users.sqlite``).

Three roles, each one including the one before it:

* ``annotator``: captions (review, edit, approve, batches) and blind review;
* ``trainer``: also fine-tuning, generation and evaluation (Compare);
* ``admin``: also users, dataset imports, deletions and caption exports.

Passwords are stored as bcrypt hashes (``bcrypt`` pinned in requirements.txt), never as text; a user
without a password signs in through Hugging Face OAuth on a Space only. The table is managed with
``python -m medart_core users add|list|set-role|passwd|unlock|remove``; ``add`` and ``passwd`` read the password
from ``--password-stdin`` or a prompt, never from a command-line argument (which ``ps`` shows to everyone).

With no users at all the studio runs open on 127.0.0.1 (see ``app.py``): this module only answers "who is
this, and what may they do"; the studio enforces it in every handler (``studio/auth.py``).
"""
from __future__ import annotations

import re
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from . import durable
from .clock import utc_now
from .errors import ConfigError, NotFoundError
from .store import SqliteStore, run_script

ANNOTATOR, TRAINER, ADMIN = "annotator", "trainer", "admin"
ROLES: tuple[str, ...] = (ANNOTATOR, TRAINER, ADMIN)       # weakest first; each includes the ones before
ROLE_DOES = {
    ANNOTATOR: "captions and blind review",
    TRAINER: "captions, blind review, fine-tuning, generation and evaluation",
    ADMIN: "everything, including users, imports, deletions and caption exports",
}
# HF usernames, e-mail-like logins and plain names; the name is shown in pages and stored in caption events,
# so it never carries markup or control characters.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_PASSWORD_BYTES = 8
MAX_PASSWORD_BYTES = 72          # bcrypt uses only the first 72 bytes; bcrypt 5 refuses longer ones
BCRYPT_ROUNDS = 12
USERS_DB = "users.sqlite"
ADMINS_ENV = "MEDART_ADMINS"
# Brute-force back-off per account: after LOCK_AFTER failed sign-ins in a row the account is locked for
# LOCK_FIRST_S, doubling with each further failure up to LOCK_MAX_S; a successful sign-in or `users unlock`
# clears it. A lock refuses the right password too (that is the point).
LOCK_AFTER = 5
LOCK_FIRST_S = 60.0
LOCK_MAX_S = 3600.0


def validate_username(name: Any) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name.strip()):
        raise ConfigError(f"Invalid user name {str(name)[:80]!r}: use 1-64 letters, digits, '.', '_', '-' or '@', "
                          "starting with a letter or digit.")
    return name.strip()


def validate_role(role: Any) -> str:
    if role not in ROLES:
        raise ConfigError(f"Unknown role {role!r}: choose one of {', '.join(ROLES)}.")
    return role


def role_rank(role: str | None) -> int:
    """0 for no role, then 1, 2, 3 for annotator, trainer, admin."""
    return ROLES.index(role) + 1 if role in ROLES else 0


def role_allows(role: str | None, needed: str) -> bool:
    """True when ``role`` includes ``needed`` (an admin may do what a trainer may, and so on)."""
    return role_rank(role) >= role_rank(validate_role(needed))


def _check_password(password: Any) -> bytes:
    if not isinstance(password, str):
        raise ConfigError("A password must be text.")
    raw = password.encode("utf-8")
    if len(raw) < MIN_PASSWORD_BYTES:
        raise ConfigError(f"Password too short: use at least {MIN_PASSWORD_BYTES} characters.")
    if len(raw) > MAX_PASSWORD_BYTES:
        raise ConfigError(f"Password too long: bcrypt uses at most {MAX_PASSWORD_BYTES} bytes; use a shorter one.")
    return raw


def hash_password(password: str) -> str:
    """A bcrypt hash (salted, ``BCRYPT_ROUNDS`` cost) of an acceptable password."""
    import bcrypt

    return bcrypt.hashpw(_check_password(password), bcrypt.gensalt(rounds=BCRYPT_ROUNDS)).decode("ascii")


def check_password(password: str, hashed: str) -> bool:
    import bcrypt

    try:
        raw = password.encode("utf-8")
        return len(raw) <= MAX_PASSWORD_BYTES and bcrypt.checkpw(raw, hashed.encode("ascii"))
    except (ValueError, TypeError, AttributeError):
        return False


@dataclass(frozen=True)
class User:
    """One row of the users table, without its password hash (nothing outside this module sees hashes)."""

    name: str
    role: str
    has_password: bool
    created_at: str
    updated_at: str
    created_by: str | None = None
    stamp: str = ""              # changes with every change to the user: sessions signed in before it end

    @property
    def sign_in(self) -> str:
        return "password" if self.has_password else "Hugging Face"


@dataclass(frozen=True)
class Lockout:
    """Failed sign-ins of one account in a row, and until when (epoch seconds) it is locked."""

    name: str
    failures: int
    locked_until: float
    last_failure: float

    def locked(self, now: float | None = None) -> bool:
        return self.locked_until > (time.time() if now is None else now)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY COLLATE NOCASE,
    role TEXT NOT NULL CHECK (role IN ('annotator', 'trainer', 'admin')),
    password_hash TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    created_by TEXT,
    stamp TEXT
);
CREATE TABLE IF NOT EXISTS lockouts (
    name TEXT PRIMARY KEY COLLATE NOCASE,
    failures INTEGER NOT NULL,
    locked_until REAL NOT NULL,
    last_failure REAL NOT NULL
);
"""
# Lockouts are not replicated by durable.py (only `users` is in its spec): failed sign-ins are attacker-driven
# writes and must not grow the durable log; a lock does not need to survive a restart of a Space.


def _from_unversioned(con: sqlite3.Connection) -> None:
    """Version 0: a users file from before the store kept a version (``lockouts`` or ``stamp`` may be missing)."""
    run_script(con, _SCHEMA)
    if "stamp" not in {r[1] for r in con.execute("PRAGMA table_info(users)")}:
        con.execute("ALTER TABLE users ADD COLUMN stamp TEXT")   # tables written before stamps existed


def lock_until(failures: int, now: float) -> float:
    """When an account with ``failures`` failed sign-ins in a row is unlocked again (0.0: not locked)."""
    over = failures - LOCK_AFTER
    return now + min(LOCK_MAX_S, LOCK_FIRST_S * 2 ** over) if over >= 0 else 0.0


def _new_stamp() -> str:
    return secrets.token_hex(8)


class UserStore(SqliteStore):
    """The users table. Lookups are cheap (one indexed row), so every request may ask for a role afresh:
    ``set-role`` and ``remove`` take effect on the next click, without a restart.

    A :class:`~medart_core.store.SqliteStore` opened lazily: the file (0600: password hashes are readable by the
    owner only) is made by the first write, or by :meth:`conn`; reading a workspace without one never makes it."""

    SCHEMA_VERSION = 1
    SCHEMA = _SCHEMA
    MIGRATIONS = {0: _from_unversioned}
    DURABLE_SPEC = durable.USERS
    BUSY_MESSAGE = ("The users table {path} is busy (another process held it for over {seconds} s); try again "
                    "in a moment.")
    LAZY = True

    def __init__(self, path: str | Path):
        super().__init__(path)
        self._dummy: str | None = None

    @classmethod
    def for_workspace(cls, ws: Any) -> "UserStore":
        return cls(getattr(ws, "users_db", None) or Path(ws.root) / USERS_DB)

    def exists(self) -> bool:
        """True when the table file exists (reading never creates it: an open studio leaves no users file)."""
        return self.path.is_file()

    # ---- reading ---------------------------------------------------------------------------------
    @staticmethod
    def _user(row: sqlite3.Row) -> User:
        return User(row["name"], row["role"], row["password_hash"] is not None, row["created_at"], row["updated_at"],
                    row["created_by"], row["stamp"] or "")

    def list(self) -> list[User]:
        if not self.exists():
            return []
        rows = self.conn().execute("SELECT * FROM users ORDER BY name COLLATE NOCASE").fetchall()
        return [self._user(r) for r in rows]

    def count(self) -> int:
        if not self.exists():
            return 0
        return int(self.conn().execute("SELECT COUNT(*) FROM users").fetchone()[0])

    def get(self, name: str | None) -> User | None:
        if not name or not self.exists():
            return None
        row = self.conn().execute("SELECT * FROM users WHERE name = ?", (str(name).strip(),)).fetchone()
        return self._user(row) if row is not None else None

    def role_of(self, name: str | None) -> str | None:
        u = self.get(name)
        return u.role if u is not None else None

    def canonical(self, name: str | None) -> str | None:
        """The stored spelling of ``name`` (names are case-insensitive: ``ANN`` and ``ann`` are one account and
        one identity everywhere), or None for an unknown name."""
        u = self.get(name)
        return u.name if u is not None else None

    # ---- brute-force back-off --------------------------------------------------------------------
    def lockout(self, name: str | None) -> Lockout | None:
        if not name or not self.exists():
            return None
        row = self.conn().execute("SELECT * FROM lockouts WHERE name = ?", (str(name).strip(),)).fetchone()
        return Lockout(row["name"], row["failures"], row["locked_until"], row["last_failure"]) if row else None

    def record_failure(self, name: str, *, now: float | None = None) -> Lockout | None:
        """Count one failed sign-in of an existing account; locks it after :data:`LOCK_AFTER` in a row. None for
        an unknown name (nothing is stored for names that do not exist)."""
        canonical = self.canonical(name)
        if canonical is None:
            return None
        now = time.time() if now is None else now
        with self.write(replicate=False) as con:      # failed sign-ins stay out of the durable log
            row = con.execute("SELECT failures FROM lockouts WHERE name = ?", (canonical,)).fetchone()
            failures = (row["failures"] if row else 0) + 1
            con.execute("INSERT INTO lockouts (name, failures, locked_until, last_failure) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT(name) DO UPDATE SET failures = excluded.failures, "
                        "locked_until = excluded.locked_until, last_failure = excluded.last_failure",
                        (canonical, failures, lock_until(failures, now), now))
        return self.lockout(canonical)

    def clear_failures(self, name: str) -> bool:
        """Forget an account's failed sign-ins (a successful sign-in, or an admin's `users unlock`)."""
        if not self.exists():
            return False
        with self.write(replicate=False) as con:
            return con.execute("DELETE FROM lockouts WHERE name = ?", (str(name).strip(),)).rowcount > 0

    def lockouts(self) -> list[Lockout]:
        """Accounts with failed sign-ins, locked ones first (the Users tab and `users list` show them)."""
        if not self.exists():
            return []
        rows = self.conn().execute("SELECT * FROM lockouts ORDER BY locked_until DESC, name").fetchall()
        return [Lockout(r["name"], r["failures"], r["locked_until"], r["last_failure"]) for r in rows]

    def verify(self, name: str, password: str) -> bool:
        """The sign-in check: True only for an existing user with a password that matches. Unknown users cost
        one bcrypt check too, so the time taken does not tell which names exist."""
        row = None
        if isinstance(name, str) and self.exists():
            row = self.conn().execute("SELECT password_hash FROM users WHERE name = ?", (name.strip(),)).fetchone()
        hashed = row["password_hash"] if row is not None else None
        if not isinstance(password, str):
            password = ""
        if hashed is None:
            if self._dummy is None:
                self._dummy = hash_password("not-a-password-of-anyone")
            check_password(password, self._dummy)
            return False
        return check_password(password, hashed)

    # ---- writing ---------------------------------------------------------------------------------
    def add(self, name: str, role: str, password: str | None = None, *, by: str | None = None) -> User:
        """A new user; ``password=None`` makes one who signs in through Hugging Face (Spaces) only."""
        name, role = validate_username(name), validate_role(role)
        hashed = hash_password(password) if password is not None else None
        now = utc_now()
        with self.write() as con:
            if con.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
                raise ConfigError(f"User {name!r} exists already: use set-role or passwd to change it.")
            con.execute("INSERT INTO users (name, role, password_hash, created_at, updated_at, created_by, stamp) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)", (name, role, hashed, now, now, by, _new_stamp()))
        self.clear_failures(name)           # a re-created account starts without the old one's failures
        return self.get(name)  # type: ignore[return-value]

    def _admins_left(self, con: sqlite3.Connection, without: str) -> int:
        return int(con.execute("SELECT COUNT(*) FROM users WHERE role = 'admin' AND name != ?",
                               (without,)).fetchone()[0])

    def _others(self, con: sqlite3.Connection, without: str) -> int:
        return int(con.execute("SELECT COUNT(*) FROM users WHERE name != ?", (without,)).fetchone()[0])

    def set_role(self, name: str, role: str, *, force: bool = False) -> User:
        role = validate_role(role)
        with self.write() as con:
            row = con.execute("SELECT role FROM users WHERE name = ?", (str(name).strip(),)).fetchone()
            if row is None:
                raise NotFoundError(f"No user named {name!r}: `users list` shows them.")
            if row["role"] == ADMIN and role != ADMIN and not force and self._admins_left(con, name.strip()) == 0:
                raise ConfigError(f"{name!r} is the last admin: make another user admin first (or pass --force).")
            con.execute("UPDATE users SET role = ?, updated_at = ?, stamp = ? WHERE name = ?",
                        (role, utc_now(), _new_stamp(), name.strip()))
        return self.get(name)  # type: ignore[return-value]

    def set_password(self, name: str, password: str | None) -> User:
        hashed = hash_password(password) if password is not None else None
        with self.write() as con:
            cur = con.execute("UPDATE users SET password_hash = ?, updated_at = ?, stamp = ? WHERE name = ?",
                              (hashed, utc_now(), _new_stamp(), str(name).strip()))
            if cur.rowcount == 0:
                raise NotFoundError(f"No user named {name!r}: `users list` shows them.")
        self.clear_failures(name)           # a new password is also the way out of a lock
        return self.get(name)  # type: ignore[return-value]

    def remove(self, name: str, *, force: bool = False) -> None:
        """Remove a user; they are refused from their next click on (their session cookie is worth nothing)."""
        with self.write() as con:
            row = con.execute("SELECT role FROM users WHERE name = ?", (str(name).strip(),)).fetchone()
            if row is None:
                raise NotFoundError(f"No user named {name!r}: `users list` shows them.")
            if (row["role"] == ADMIN and not force and self._admins_left(con, name.strip()) == 0
                    and self._others(con, name.strip()) > 0):
                raise ConfigError(f"{name!r} is the last admin and other users remain: make another user admin "
                                  "first (or pass --force).")
            con.execute("DELETE FROM users WHERE name = ?", (name.strip(),))
        self.clear_failures(name)

    def seed_admins(self, names: Iterable[str], *, by: str = ADMINS_ENV) -> list[str]:
        """Make each name an admin (added without a password, or promoted): the ``MEDART_ADMINS`` secret of a
        Space. Names dropped from the secret later are not demoted; use ``set-role`` for that."""
        done = []
        for raw in names:
            name = raw.strip()
            if not name:
                continue
            name = validate_username(name)
            now = utc_now()
            with self.write() as con:
                row = con.execute("SELECT role FROM users WHERE name = ?", (name,)).fetchone()
                if row is None:
                    con.execute("INSERT INTO users (name, role, password_hash, created_at, updated_at, created_by, "
                                "stamp) VALUES (?, 'admin', NULL, ?, ?, ?, ?)", (name, now, now, by, _new_stamp()))
                elif row["role"] != ADMIN:
                    con.execute("UPDATE users SET role = 'admin', updated_at = ?, stamp = ? WHERE name = ?",
                                (now, _new_stamp(), name))
            done.append(name)
        return done



def admins_from_env(value: str | None) -> list[str]:
    """``MEDART_ADMINS="alice, bob"`` -> ["alice", "bob"]."""
    return [n.strip() for n in (value or "").split(",") if n.strip()]
