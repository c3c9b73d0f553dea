"""The caption store: datasets, images and an append-only log of caption events in one SQLite file.

Every change to a caption is a new row in ``events`` (VLM/template draft, human edit, status change,
comment, restore); rows are never updated or deleted (triggers enforce it). What the studio shows as
"the caption" is *derived* from that log by one small fold (:func:`_fold`), so a VLM draft can never
silently overwrite a reviewer's words and every earlier text stays restorable.

A ``state`` table caches the fold's result per image so the caption studio can list 10,000 images in
one query. It is written in the same transaction as the event that changes it, and
:meth:`CaptionStore.rebuild_state` recomputes it from the log alone (the log is the source of truth).

Concurrency: the studio is multi-threaded and training/captioning jobs run in other processes, so the
store is a :class:`~medart_core.store.SqliteStore`: every connection is per thread and per process, the
database runs in WAL mode (readers never block the writer), and each write is one short ``BEGIN IMMEDIATE``
transaction. Human writes carry the ``expected_version`` the reviewer saw (the id of the image's latest
event); if anything was written since, :class:`~medart_core.errors.ConflictError` is raised and nothing
changes.

This module is storage only. Exports to and imports from other layouts (imagefolder, Med-Art CSV) live in
:mod:`medart_core.interchange`; the review rules of the Captions tab in :mod:`medart_core.review`.
"""
from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath
from typing import Any, NamedTuple, Sequence

from . import durable
from .clock import new_batch_id, utc_now_ms
from .constants import MAX_REVIEWER_CHARS
from .errors import ConfigError, ConflictError, NotFoundError
from .store import SqliteStore
from .userregex import compile_user_regex
from .workspace import validate_name

STATUSES = ("pending", "approved", "rejected", "needs-second-read")
EVENT_KINDS = ("draft", "edit", "status", "comment", "restore")
# Kinds whose text is a caption (comments carry text too, but it is never a caption).
CAPTION_KINDS = ("draft", "edit", "restore")
HUMAN_TEXT_KINDS = ("edit", "restore")
MAX_CAPTION_CHARS = 4000
SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 30_000

__all__ = [
    "STATUSES", "EVENT_KINDS", "MAX_CAPTION_CHARS", "ImageRecord", "CaptionEvent", "CaptionState",
    "DatasetInfo", "BatchConflict", "BatchResult", "UndoReport", "CaptionStore",
    "check_text", "check_status", "check_source",
]


# ------------------------------------------------------------------------------------------------
# Records
# ------------------------------------------------------------------------------------------------
@dataclass
class ImageRecord:
    id: int | None          # assigned by the store
    dataset: str
    file_name: str          # relative to ws.dataset_dir(dataset), e.g. "images/3fa9c1e2d4b5a6f7.png"
    label: str              # class
    pixel_hash: str         # sha256 hex of the normalised RGB pixels (data.pixel_hash)
    width: int
    height: int
    source: dict = field(default_factory=dict)   # provenance (package, file, frame, licence, original name…)


@dataclass
class CaptionEvent:
    id: int
    image_id: int
    kind: str               # "draft" | "edit" | "status" | "comment" | "restore"
    text: str | None
    status: str | None
    reviewer: str | None
    source: str | None      # drafts: "template", "vlm:<model id>", "shorten:<model id>", "import"
    prompt: str | None
    params: dict | None
    seed: int | None
    note: str | None
    created_at: str         # ISO 8601, UTC
    batch_id: str | None    # batch operations (undo as one unit)


@dataclass
class CaptionState:
    image_id: int
    text: str
    status: str
    version: int            # id of the image's latest event (0 if none): the token for optimistic writes
    caption_version: int    # id of the event that set the current text (0 if none)
    latest_draft: CaptionEvent | None
    edited: bool            # a human edit/restore has set the text
    reviewer: str | None    # who made the latest human edit/restore/status change
    updated_at: str | None
    label: str | None = None
    file_name: str | None = None


@dataclass
class DatasetInfo:
    name: str
    modality: str
    n_images: int
    created_at: str
    meta: dict = field(default_factory=dict)
    status_counts: dict[str, int] = field(default_factory=dict)


class BatchConflict(NamedTuple):
    """An image a batch left alone because its version moved (compares equal to the plain tuple)."""

    image_id: int
    expected: int | None    # the version the batch was based on
    actual: int | None      # the version it had when the batch came to it


@dataclass
class BatchResult:
    """What one batch of writes did: the store's bulk writes and the caption tab's batches both return it."""

    batch_id: str                                                    # pass to undo_batch to revert it
    events: list[CaptionEvent] = field(default_factory=list)         # written
    conflicts: list[BatchConflict] = field(default_factory=list)     # skipped, never overwritten
    since: str = "you loaded them (reload and retry)"                # what the versions came from (summary)

    @property
    def applied(self) -> list[int]:
        """Images the batch changed, in order (an image with a draft written but then skipped is not one)."""
        skipped = {c.image_id for c in self.conflicts}
        return [i for i in dict.fromkeys(e.image_id for e in self.events) if i not in skipped]

    def summary(self) -> str:
        s = f"Batch {self.batch_id}: {len(self.applied)} caption(s) changed"
        if self.conflicts:
            s += f"; {len(self.conflicts)} skipped because they changed since {self.since}"
        return s + "."


@dataclass
class UndoReport:
    batch_id: str
    reverted: list[int] = field(default_factory=list)            # image ids put back
    unchanged: list[int] = field(default_factory=list)           # batch left them as they were
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (image id, why not undone)
    undo_batch_id: str | None = None                             # batch id of the compensating events

    def summary(self) -> str:
        s = f"Undid batch {self.batch_id}: {len(self.reverted)} image(s) restored"
        if self.unchanged:
            s += f", {len(self.unchanged)} already as before"
        if self.skipped:
            s += f", {len(self.skipped)} skipped because they changed after the batch"
        return s + "."


# ------------------------------------------------------------------------------------------------
# The fold: current caption/status from the event log
# ------------------------------------------------------------------------------------------------
@dataclass
class _Derived:
    text: str = ""
    caption_event: int = 0
    status: str = "pending"
    version: int = 0
    latest_draft: int | None = None
    edited: bool = False
    reviewer: str | None = None
    updated_at: str | None = None


def _fold(d: _Derived, ev_id: int, kind: str, text: str | None, status: str | None,
          reviewer: str | None, created_at: str) -> _Derived:
    """Apply one event. The single place where the caption rules live (writes and rebuild share it)."""
    d = replace(d, version=ev_id, updated_at=created_at)
    if kind == "draft":
        d.latest_draft = ev_id
        # A machine draft fills in a caption nobody has written or signed off yet, never more.
        if not d.edited and d.status != "approved":
            d.text, d.caption_event = text or "", ev_id
    elif kind in HUMAN_TEXT_KINDS:
        # An approval signs off one text: changing the text asks for a new sign-off, so exports of
        # "approved" captions never carry words nobody approved.
        if d.status == "approved" and (text or "") != d.text:
            d.status = "pending"
        d.text, d.caption_event, d.edited, d.reviewer = text or "", ev_id, True, reviewer
    elif kind == "status":
        d.status, d.reviewer = status or "pending", reviewer
    # "comment": only the version moves (someone looked at the image and said something).
    return d


# ------------------------------------------------------------------------------------------------
# Validation helpers
# ------------------------------------------------------------------------------------------------
def check_text(text: Any, what: str = "Caption") -> str:
    """``text`` as the store keeps it (LF newlines), or ConfigError naming ``what`` is wrong with it."""
    if not isinstance(text, str):
        raise ConfigError(f"{what} must be text, got {type(text).__name__}.")
    # Browsers submit textareas with CRLF; one newline convention keeps diffs and exports stable.
    text = text.replace("\r\n", "\n")
    if "\x00" in text:
        raise ConfigError(f"{what} contains a NUL character; remove it and save again.")
    if len(text) > MAX_CAPTION_CHARS:
        raise ConfigError(
            f"{what} is {len(text):,} characters long; the store accepts at most {MAX_CAPTION_CHARS:,}. "
            "Shorten it (PixArt-α reads only the first 120 T5 tokens anyway) and save again."
        )
    return text


def _check_reviewer(reviewer: Any) -> str:
    if not isinstance(reviewer, str) or not reviewer.strip():
        raise ConfigError("A reviewer name is required for edits and status changes: sign in or enter your name.")
    if len(reviewer) > MAX_REVIEWER_CHARS:
        raise ConfigError(f"Reviewer name is longer than {MAX_REVIEWER_CHARS} characters.")
    return reviewer.strip()


def check_status(status: Any) -> str:
    """``status`` if it is one of :data:`STATUSES`, else ConfigError listing them."""
    if status not in STATUSES:
        raise ConfigError(f"Unknown caption status {status!r}; use one of: {', '.join(STATUSES)}.")
    return status


def check_source(source: Any) -> str:
    """A draft's non-empty source (``template``, ``vlm:<model id>``, ``import``, …), else ConfigError."""
    if not isinstance(source, str) or not source.strip():
        raise ConfigError("A draft needs a source such as 'template', 'vlm:<model id>' or 'import'.")
    return source


def _check_version(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ConfigError(f"expected_version must be a non-negative integer (the version you loaded), got {v!r}.")
    return v


def _json(obj: Any, what: str) -> str:
    try:
        return json.dumps(obj, sort_keys=True, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{what} must be JSON-serialisable: {e}") from None


def _check_rel_name(file_name: Any) -> str:
    if not isinstance(file_name, str) or not file_name or "\\" in file_name or "\x00" in file_name:
        raise ConfigError(f"Invalid image file name {file_name!r}: use a relative POSIX path like 'images/ab12.png'.")
    p = PurePosixPath(file_name)
    if p.is_absolute() or ".." in p.parts:
        raise ConfigError(f"Image file name {file_name!r} must stay inside the dataset folder.")
    return file_name


_EVENT_COLS = "id, image_id, kind, text, status, reviewer, source, prompt, params, seed, note, created_at, batch_id"
_STATE_COLS = "text, caption_event, status, version, latest_draft, edited, reviewer, updated_at"
_IMAGE_COLS = "id, dataset, file_name, label, pixel_hash, width, height, source"


def _event(row: Sequence[Any]) -> CaptionEvent:
    return CaptionEvent(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7],
                        json.loads(row[8]) if row[8] is not None else None,
                        row[9], row[10], row[11], row[12])


def _image(row: Sequence[Any]) -> ImageRecord:
    return ImageRecord(row[0], row[1], row[2], row[3], row[4], row[5], row[6], json.loads(row[7] or "{}"))


def _derived(row: Sequence[Any]) -> _Derived:
    return _Derived(row[0], row[1], row[2], row[3], row[4], bool(row[5]), row[6], row[7])


_SCHEMA = """
CREATE TABLE IF NOT EXISTS datasets (
    name        TEXT PRIMARY KEY,
    modality    TEXT NOT NULL,
    meta        TEXT NOT NULL DEFAULT '{}',
    created_at  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS images (
    id          INTEGER PRIMARY KEY,
    dataset     TEXT NOT NULL REFERENCES datasets(name),
    file_name   TEXT NOT NULL,
    label       TEXT NOT NULL,
    pixel_hash  TEXT NOT NULL,
    width       INTEGER NOT NULL,
    height      INTEGER NOT NULL,
    source      TEXT NOT NULL DEFAULT '{}',
    UNIQUE (dataset, pixel_hash),
    UNIQUE (dataset, file_name)
);
CREATE INDEX IF NOT EXISTS images_by_label ON images (dataset, label, id);
CREATE TABLE IF NOT EXISTS events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,   -- never reused: ids double as version tokens
    image_id    INTEGER NOT NULL REFERENCES images(id),
    kind        TEXT NOT NULL CHECK (kind IN ('draft', 'edit', 'status', 'comment', 'restore')),
    text        TEXT,
    status      TEXT,
    reviewer    TEXT,
    source      TEXT,
    prompt      TEXT,
    params      TEXT,
    seed        INTEGER,
    note        TEXT,
    batch_id    TEXT,
    created_at  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_image ON events (image_id, id);
CREATE INDEX IF NOT EXISTS events_by_batch ON events (batch_id, image_id) WHERE batch_id IS NOT NULL;
CREATE TRIGGER IF NOT EXISTS events_append_only_u BEFORE UPDATE ON events
    BEGIN SELECT RAISE(ABORT, 'caption events are append-only'); END;
CREATE TRIGGER IF NOT EXISTS events_append_only_d BEFORE DELETE ON events
    BEGIN SELECT RAISE(ABORT, 'caption events are append-only'); END;
-- Derived cache of _fold over each image's events; rebuild_state() recomputes it from the log.
CREATE TABLE IF NOT EXISTS state (
    image_id      INTEGER PRIMARY KEY REFERENCES images(id),
    text          TEXT NOT NULL DEFAULT '',
    caption_event INTEGER NOT NULL DEFAULT 0,
    status        TEXT NOT NULL DEFAULT 'pending',
    version       INTEGER NOT NULL DEFAULT 0,
    latest_draft  INTEGER,
    edited        INTEGER NOT NULL DEFAULT 0,
    reviewer      TEXT,
    updated_at    TEXT
);
CREATE INDEX IF NOT EXISTS state_by_status ON state (status);
"""


# ------------------------------------------------------------------------------------------------
# The store
# ------------------------------------------------------------------------------------------------
class CaptionStore(SqliteStore):
    """Caption store over one SQLite file; safe to share between threads and to open from many processes.

    ``close()`` closes the connections of every thread (the store refuses use afterwards); a pickled store
    reopens the same file on the other side."""

    SCHEMA_VERSION = SCHEMA_VERSION
    SCHEMA = _SCHEMA
    MIGRATIONS = {0: _SCHEMA}        # an unversioned file: the same tables (IF NOT EXISTS)
    DURABLE_SPEC = durable.CAPTIONS
    BUSY_TIMEOUT_MS = BUSY_TIMEOUT_MS
    BUSY_MESSAGE = ("The caption database is busy (another process held it for over {seconds} s); try again "
                    "in a moment.")

    # The rules every write applies, for code that vets rows before writing them (caption import, exports).
    check_text = staticmethod(check_text)
    check_status = staticmethod(check_status)
    check_source = staticmethod(check_source)

    @classmethod
    def for_workspace(cls, ws) -> "CaptionStore":
        return cls(ws.captions_db)

    # --- datasets -------------------------------------------------------------------------------
    def create_dataset(self, name: str, *, modality: str = "generic", meta: dict | None = None) -> None:
        validate_name(name, "dataset name")
        if not isinstance(modality, str) or not modality.strip():
            raise ConfigError("Modality must be a non-empty text such as 'endoscopy' or 'generic'.")
        meta_json = _json(meta or {}, "Dataset metadata")
        with self.write() as con:
            if con.execute("SELECT 1 FROM datasets WHERE name = ?", (name,)).fetchone():
                raise ConfigError(f"Dataset {name!r} already exists: pick another name or import into it.")
            con.execute("INSERT INTO datasets (name, modality, meta, created_at) VALUES (?, ?, ?, ?)",
                        (name, modality, meta_json, utc_now_ms()))

    def drop_empty_dataset(self, name: str) -> bool:
        """Remove a dataset that has no images (undoes a create whose first import failed); True if removed."""
        with self.write() as con:
            cur = con.execute("DELETE FROM datasets WHERE name = ? AND NOT EXISTS "
                              "(SELECT 1 FROM images WHERE dataset = ?)", (name, name))
            return cur.rowcount > 0

    def has_dataset(self, name: str) -> bool:
        return self.conn().execute("SELECT 1 FROM datasets WHERE name = ?", (name,)).fetchone() is not None

    def _require_dataset(self, con: sqlite3.Connection, name: str) -> None:
        if not con.execute("SELECT 1 FROM datasets WHERE name = ?", (name,)).fetchone():
            raise NotFoundError(f"No dataset named {name!r}; import images first or pick one from the list.")

    def list_datasets(self) -> list[DatasetInfo]:
        with self.read() as con:
            rows = con.execute("SELECT name, modality, meta, created_at FROM datasets ORDER BY name").fetchall()
            counts: dict[str, dict[str, int]] = {}
            for ds, status, n in con.execute(
                "SELECT i.dataset, s.status, COUNT(*) FROM images i JOIN state s ON s.image_id = i.id "
                "GROUP BY i.dataset, s.status"
            ):
                counts.setdefault(ds, {})[status] = n
        return [DatasetInfo(name, modality, sum(counts.get(name, {}).values()), created, json.loads(meta),
                            dict(counts.get(name, {})))
                for name, modality, meta, created in rows]

    def dataset_info(self, name: str) -> DatasetInfo:
        for info in self.list_datasets():
            if info.name == name:
                return info
        raise NotFoundError(f"No dataset named {name!r}; import images first or pick one from the list.")

    # --- images ---------------------------------------------------------------------------------
    def add_images(self, dataset: str, records: list[ImageRecord], *,
                   drafts: list[tuple[str, str] | None] | None = None) -> list[int]:
        """Add images (and optionally one initial draft ``(text, source)`` each) in ONE transaction."""
        if drafts is not None and len(drafts) != len(records):
            raise ConfigError(f"add_images got {len(records)} records but {len(drafts)} drafts; pass one per record.")
        rows = []
        for i, r in enumerate(records):
            if r.dataset != dataset:
                raise ConfigError(f"Record {r.file_name!r} belongs to dataset {r.dataset!r}, not {dataset!r}.")
            _check_rel_name(r.file_name)
            if not isinstance(r.label, str):
                raise ConfigError(f"Label of {r.file_name!r} must be text.")
            if not isinstance(r.pixel_hash, str) or not r.pixel_hash:
                raise ConfigError(f"Image {r.file_name!r} has no pixel hash.")
            for v in (r.width, r.height):
                if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                    raise ConfigError(f"Image {r.file_name!r} has invalid size {r.width}x{r.height}.")
            draft = drafts[i] if drafts is not None else None
            if draft is not None:
                text, source = draft
                draft = (check_text(text, f"Draft caption for {r.file_name!r}"), check_source(source))
            rows.append((r, _json(r.source or {}, f"Source of {r.file_name!r}"), draft))
        ids: list[int] = []
        with self.write() as con:
            self._require_dataset(con, dataset)
            now = utc_now_ms()
            for r, source_json, draft in rows:
                try:
                    cur = con.execute(
                        "INSERT INTO images (dataset, file_name, label, pixel_hash, width, height, source) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (dataset, r.file_name, r.label, r.pixel_hash, r.width, r.height, source_json))
                except sqlite3.IntegrityError as e:
                    what = "pixels" if "pixel_hash" in str(e) else "file name"
                    raise ConfigError(
                        f"Image {r.file_name!r} has the same {what} as an image already in dataset {dataset!r}; "
                        "nothing was added. Skip duplicates (has_pixel_hash) before adding."
                    ) from None
                image_id = int(cur.lastrowid)
                ids.append(image_id)
                d = _Derived()
                if draft is not None:
                    ev = self._insert_event(con, image_id, "draft", text=draft[0], source=draft[1], created_at=now)
                    d = _fold(d, ev, "draft", draft[0], None, None, now)
                self._write_state(con, image_id, d, insert=True)
        return ids

    def has_pixel_hash(self, dataset: str, pixel_hash: str) -> bool:
        return self.conn().execute("SELECT 1 FROM images WHERE dataset = ? AND pixel_hash = ?",
                                    (dataset, pixel_hash)).fetchone() is not None

    def get_image(self, image_id: int) -> ImageRecord:
        row = self.conn().execute(f"SELECT {_IMAGE_COLS} FROM images WHERE id = ?", (image_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"No image with id {image_id}; it may belong to a deleted or re-imported dataset.")
        return _image(row)

    def _image_where(self, dataset: str, label: str | None, status: str | None) -> tuple[str, list[Any]]:
        where, args = ["i.dataset = ?"], [dataset]
        if label is not None:
            where.append("i.label = ?")
            args.append(label)
        if status is not None:
            where.append("s.status = ?")
            args.append(check_status(status))
        return " AND ".join(where), args

    def list_images(self, dataset: str, *, offset: int = 0, limit: int | None = None,
                    label: str | None = None, status: str | None = None) -> list[ImageRecord]:
        where, args = self._image_where(dataset, label, status)
        with self.read() as con:
            self._require_dataset(con, dataset)
            rows = con.execute(
                f"SELECT {', '.join('i.' + c.strip() for c in _IMAGE_COLS.split(','))} FROM images i "
                f"JOIN state s ON s.image_id = i.id WHERE {where} ORDER BY i.id LIMIT ? OFFSET ?",
                (*args, -1 if limit is None else int(limit), int(offset))).fetchall()
        return [_image(r) for r in rows]

    def count_images(self, dataset: str, *, label: str | None = None, status: str | None = None) -> int:
        where, args = self._image_where(dataset, label, status)
        with self.read() as con:
            self._require_dataset(con, dataset)
            return con.execute(f"SELECT COUNT(*) FROM images i JOIN state s ON s.image_id = i.id WHERE {where}",
                               args).fetchone()[0]

    def labels(self, dataset: str) -> list[str]:
        with self.read() as con:
            self._require_dataset(con, dataset)
            return [r[0] for r in con.execute(
                "SELECT DISTINCT label FROM images WHERE dataset = ? ORDER BY label", (dataset,))]

    # --- events: low level ----------------------------------------------------------------------
    def _insert_event(self, con: sqlite3.Connection, image_id: int, kind: str, *, text: str | None = None,
                      status: str | None = None, reviewer: str | None = None, source: str | None = None,
                      prompt: str | None = None, params: dict | None = None, seed: int | None = None,
                      note: str | None = None, batch_id: str | None = None, created_at: str) -> int:
        cur = con.execute(
            "INSERT INTO events (image_id, kind, text, status, reviewer, source, prompt, params, seed, note, "
            "batch_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (image_id, kind, text, status, reviewer, source, prompt,
             None if params is None else _json(params, "Draft parameters"), seed, note, batch_id, created_at))
        return int(cur.lastrowid)

    def _write_state(self, con: sqlite3.Connection, image_id: int, d: _Derived, *, insert: bool = False) -> None:
        vals = (d.text, d.caption_event, d.status, d.version, d.latest_draft, int(d.edited), d.reviewer,
                d.updated_at)
        if insert:
            con.execute(f"INSERT OR REPLACE INTO state (image_id, {_STATE_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (image_id, *vals))
        else:
            con.execute("UPDATE state SET text = ?, caption_event = ?, status = ?, version = ?, latest_draft = ?, "
                        "edited = ?, reviewer = ?, updated_at = ? WHERE image_id = ?", (*vals, image_id))

    def _load_state(self, con: sqlite3.Connection, image_id: int) -> _Derived:
        row = con.execute(f"SELECT {_STATE_COLS} FROM state WHERE image_id = ?", (image_id,)).fetchone()
        if row is not None:
            return _derived(row)
        if con.execute("SELECT 1 FROM images WHERE id = ?", (image_id,)).fetchone() is None:
            raise NotFoundError(f"No image with id {image_id}; reload the dataset list.")
        d = self._replay(con, image_id)          # cache row missing: derive it from the log
        self._write_state(con, image_id, d, insert=True)
        return d

    @staticmethod
    def _replay(con: sqlite3.Connection, image_id: int, before: int | None = None) -> _Derived:
        d = _Derived()
        q = "SELECT id, kind, text, status, reviewer, created_at FROM events WHERE image_id = ?"
        args: tuple = (image_id,)
        if before is not None:
            q += " AND id < ?"
            args = (image_id, before)
        for ev_id, kind, text, status, reviewer, created_at in con.execute(q + " ORDER BY id", args):
            d = _fold(d, ev_id, kind, text, status, reviewer, created_at)
        return d

    def _append(self, con: sqlite3.Connection, image_id: int, kind: str, *,
                expected_version: int | None = None, **fields: Any) -> CaptionEvent:
        """Insert one event and update the cache, inside the caller's write transaction."""
        d = self._load_state(con, image_id)
        if expected_version is not None and d.version != expected_version:
            raise ConflictError(
                f"The caption of image {image_id} changed since you loaded it (you had version "
                f"{expected_version}, it is now {d.version}); nothing was saved. Reload the image, "
                "check the current text, then apply your change again.",
                expected=expected_version, actual=d.version, current_text=d.text)
        now = utc_now_ms()
        ev_id = self._insert_event(con, image_id, kind, created_at=now, **fields)
        d = _fold(d, ev_id, kind, fields.get("text"), fields.get("status"), fields.get("reviewer"), now)
        self._write_state(con, image_id, d)
        row = con.execute(f"SELECT {_EVENT_COLS} FROM events WHERE id = ?", (ev_id,)).fetchone()
        return _event(row)

    # --- events: public writes ------------------------------------------------------------------
    def add_draft(self, image_id: int, text: str, *, source: str, prompt: str | None = None,
                  params: dict | None = None, seed: int | None = None, note: str | None = None,
                  reviewer: str | None = None, batch_id: str | None = None) -> CaptionEvent:
        """Record a machine draft. It becomes the caption only while no human has written or approved one."""
        text = check_text(text, "Draft caption")
        fields = _draft_fields(source, prompt, params, seed, note, reviewer, batch_id)
        with self.write() as con:
            return self._append(con, image_id, "draft", text=text, **fields)

    def add_drafts(self, items: list[tuple[int, str]], *, source: str, prompt: str | None = None,
                   params: dict | None = None, seed: int | None = None, batch_id: str | None = None
                   ) -> list[CaptionEvent]:
        """Many drafts ``(image_id, text)`` in one transaction (captioning jobs write in chunks)."""
        checked = [(image_id, check_text(text, f"Draft caption for image {image_id}")) for image_id, text in items]
        fields = _draft_fields(source, prompt, params, seed, None, None, batch_id)
        with self.write() as con:
            return [self._append(con, image_id, "draft", text=text, **fields) for image_id, text in checked]

    def edit(self, image_id: int, text: str, *, reviewer: str, expected_version: int,
             batch_id: str | None = None) -> CaptionEvent:
        text = check_text(text)
        reviewer = _check_reviewer(reviewer)
        expected_version = _check_version(expected_version)
        with self.write() as con:
            return self._append(con, image_id, "edit", text=text, reviewer=reviewer, batch_id=batch_id,
                                expected_version=expected_version)

    def set_status(self, image_id: int, status: str, *, reviewer: str, expected_version: int,
                   note: str | None = None, batch_id: str | None = None) -> CaptionEvent:
        status = check_status(status)
        reviewer = _check_reviewer(reviewer)
        expected_version = _check_version(expected_version)
        if note is not None:
            note = check_text(note, "Note")
        with self.write() as con:
            return self._append(con, image_id, "status", status=status, reviewer=reviewer, note=note,
                                batch_id=batch_id, expected_version=expected_version)

    def approve(self, image_id: int, *, reviewer: str, expected_version: int,
                batch_id: str | None = None) -> CaptionEvent:
        return self.set_status(image_id, "approved", reviewer=reviewer, expected_version=expected_version,
                               batch_id=batch_id)

    def comment(self, image_id: int, text: str, *, reviewer: str) -> CaptionEvent:
        text = check_text(text, "Comment")
        if not text.strip():
            raise ConfigError("A comment cannot be empty.")
        reviewer = _check_reviewer(reviewer)
        with self.write() as con:
            return self._append(con, image_id, "comment", text=text, reviewer=reviewer)

    def restore(self, image_id: int, event_id: int, *, reviewer: str, expected_version: int,
                batch_id: str | None = None) -> CaptionEvent:
        """Make an earlier caption text (draft, edit or restore ``event_id``) current again, as a new event."""
        reviewer = _check_reviewer(reviewer)
        expected_version = _check_version(expected_version)
        with self.write() as con:
            row = con.execute("SELECT image_id, kind, text FROM events WHERE id = ?", (event_id,)).fetchone()
            if row is None or row[0] != image_id:
                raise NotFoundError(f"Image {image_id} has no event {event_id}; pick one from its history.")
            if row[1] not in CAPTION_KINDS:
                raise ConfigError(f"Event {event_id} is a {row[1]!r} event, not a caption; pick a draft, "
                                  "edit or restore from the history.")
            return self._append(con, image_id, "restore", text=row[2], reviewer=reviewer, batch_id=batch_id,
                                note=f"restores event {event_id}", expected_version=expected_version)

    # --- bulk human writes (the caption studio's batch operations) -------------------------------
    def edit_many(self, items: list[tuple[int, int, str]], *, reviewer: str,
                  batch_id: str | None = None) -> BatchResult:
        """Edits ``(image_id, expected_version, text)`` in ONE transaction under one batch id.
        Images whose version moved are left alone and listed in ``conflicts``; the rest are written."""
        reviewer = _check_reviewer(reviewer)
        checked = [(i, _check_version(v), check_text(t, f"Caption for image {i}")) for i, v, t in items]
        return self._many([(i, v, dict(kind="edit", text=t)) for i, v, t in checked], reviewer, batch_id)

    def set_status_many(self, items: list[tuple[int, int]], status: str, *, reviewer: str,
                        note: str | None = None, batch_id: str | None = None) -> BatchResult:
        """Status changes ``(image_id, expected_version)`` in ONE transaction (e.g. approve a filtered page)."""
        status = check_status(status)
        reviewer = _check_reviewer(reviewer)
        if note is not None:
            note = check_text(note, "Note")
        checked = [(i, _check_version(v)) for i, v in items]
        return self._many([(i, v, dict(kind="status", status=status, note=note)) for i, v in checked],
                          reviewer, batch_id)

    def _many(self, items: list[tuple[int, int, dict]], reviewer: str, batch_id: str | None) -> BatchResult:
        result = BatchResult(batch_id or self.new_batch_id())
        with self.write() as con:
            for image_id, expected, fields in items:
                kind = fields.pop("kind")
                try:
                    ev = self._append(con, image_id, kind, reviewer=reviewer, batch_id=result.batch_id,
                                      expected_version=expected, **fields)
                except ConflictError as e:
                    result.conflicts.append(BatchConflict(image_id, e.expected, e.actual))
                    continue
                result.events.append(ev)
        return result

    # --- reads ----------------------------------------------------------------------------------
    def history(self, image_id: int) -> list[CaptionEvent]:
        """Every event of one image, oldest first."""
        with self.read() as con:
            if con.execute("SELECT 1 FROM images WHERE id = ?", (image_id,)).fetchone() is None:
                raise NotFoundError(f"No image with id {image_id}; reload the dataset list.")
            return [_event(r) for r in con.execute(
                f"SELECT {_EVENT_COLS} FROM events WHERE image_id = ? ORDER BY id", (image_id,))]

    _STATES_SQL = (
        "SELECT i.id, i.label, i.file_name, s.text, s.status, s.version, s.caption_event, s.edited, s.reviewer, "
        "s.updated_at, " + ", ".join("d." + c.strip() for c in _EVENT_COLS.split(",")) +
        " FROM images i JOIN state s ON s.image_id = i.id LEFT JOIN events d ON d.id = s.latest_draft"
    )

    @staticmethod
    def _state_from_row(r: Sequence[Any]) -> CaptionState:
        draft = _event(r[10:]) if r[10] is not None else None
        return CaptionState(image_id=r[0], text=r[3], status=r[4], version=r[5], caption_version=r[6],
                            latest_draft=draft, edited=bool(r[7]), reviewer=r[8], updated_at=r[9],
                            label=r[1], file_name=r[2])

    def current(self, image_id: int) -> CaptionState:
        con = self.conn()
        row = con.execute(self._STATES_SQL + " WHERE i.id = ?", (image_id,)).fetchone()
        if row is None:
            if con.execute("SELECT 1 FROM images WHERE id = ?", (image_id,)).fetchone() is None:
                raise NotFoundError(f"No image with id {image_id}; reload the dataset list.")
            with self.write() as wcon:     # rare: image without a cache row: derive it from the log
                self._load_state(wcon, image_id)
            row = con.execute(self._STATES_SQL + " WHERE i.id = ?", (image_id,)).fetchone()
        return self._state_from_row(row)

    def states(self, dataset: str, *, label: str | None = None, status: str | None = None,
               reviewer: str | None = None, edited: bool | None = None, text_contains: str | None = None,
               text_regex: str | None = None, offset: int = 0, limit: int | None = None) -> list[CaptionState]:
        """Current state of every image of a dataset (ordered by id), filtered; one query."""
        where, args = self._image_where(dataset, label, status)
        if reviewer is not None:
            where += " AND s.reviewer = ?"
            args.append(reviewer)
        if edited is not None:
            where += " AND s.edited = ?"
            args.append(int(bool(edited)))
        # A user's pattern: time-limited (medart_core.userregex), so it cannot hold a request or the GIL.
        pattern = compile_user_regex(text_regex) if text_regex else None
        needle = text_contains.casefold() if text_contains else None
        with self.read() as con:
            self._require_dataset(con, dataset)
            rows = con.execute(self._STATES_SQL + f" WHERE {where} ORDER BY i.id", args).fetchall()
        if needle is not None:
            rows = [r for r in rows if needle in r[3].casefold()]
        if pattern is not None:
            rows = [r for r in rows if pattern.search(r[3])]
        rows = rows[offset:None if limit is None else offset + limit]
        return [self._state_from_row(r) for r in rows]

    # --- maintenance ----------------------------------------------------------------------------
    def rebuild_state(self) -> int:
        """Recompute the derived cache from the event log alone; returns the number of images."""
        with self.write() as con:
            con.execute("DELETE FROM state")
            per_image: dict[int, _Derived] = {i: _Derived() for (i,) in con.execute("SELECT id FROM images")}
            for ev_id, image_id, kind, text, status, reviewer, created_at in con.execute(
                    "SELECT id, image_id, kind, text, status, reviewer, created_at FROM events ORDER BY id"):
                per_image[image_id] = _fold(per_image[image_id], ev_id, kind, text, status, reviewer, created_at)
            for image_id, d in per_image.items():
                self._write_state(con, image_id, d, insert=True)
        return len(per_image)

    # --- batches --------------------------------------------------------------------------------
    new_batch_id = staticmethod(new_batch_id)

    def undo_batch(self, batch_id: str, *, reviewer: str) -> UndoReport:
        """Put every image touched by ``batch_id`` back to its text and status from before the batch.

        Images with any event after the batch's first event on them that is not part of the batch
        (someone kept working) are skipped and reported, never overwritten. The compensating events
        form a batch of their own (``report.undo_batch_id``), so an undo can itself be undone.
        """
        reviewer = _check_reviewer(reviewer)
        report = UndoReport(batch_id, undo_batch_id=new_batch_id("undo"))
        with self.write() as con:
            spans = con.execute("SELECT image_id, MIN(id), MAX(id) FROM events WHERE batch_id = ? "
                                "GROUP BY image_id ORDER BY image_id", (batch_id,)).fetchall()
            if not spans:
                raise NotFoundError(f"No events belong to batch {batch_id!r}; nothing to undo.")
            note = f"undo of batch {batch_id}"
            for image_id, first, _last in spans:
                foreign = con.execute(
                    "SELECT id, kind FROM events WHERE image_id = ? AND id > ? AND batch_id IS NOT ? "
                    "ORDER BY id LIMIT 1", (image_id, first, batch_id)).fetchone()
                if foreign is not None:
                    report.skipped.append((image_id, f"{foreign[1]} event {foreign[0]} came after the batch"))
                    continue
                before = self._replay(con, image_id, before=first)
                now = self._load_state(con, image_id)
                if before.text == now.text and before.status == now.status:
                    report.unchanged.append(image_id)
                    continue
                if before.text != now.text:
                    if not before.edited and not now.edited and now.status != "approved":
                        # Only drafts changed it: answer with a draft so later drafts still apply.
                        self._append(con, image_id, "draft", text=before.text, source="undo", note=note,
                                     batch_id=report.undo_batch_id)
                    else:
                        restores = (f"; restores event {before.caption_event}" if before.caption_event
                                    else "; the image had no caption before")
                        self._append(con, image_id, "restore", text=before.text, reviewer=reviewer,
                                     note=note + restores, batch_id=report.undo_batch_id)
                if before.status != now.status:
                    self._append(con, image_id, "status", status=before.status, reviewer=reviewer, note=note,
                                 batch_id=report.undo_batch_id)
                report.reverted.append(image_id)
        return report

    # --- kept for callers not yet moved ---------------------------------------------------------


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _draft_fields(source, prompt, params, seed, note, reviewer, batch_id) -> dict[str, Any]:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"Draft seed must be an integer, got {seed!r}.")
    if params is not None:
        _json(params, "Draft parameters")
    return dict(source=check_source(source), prompt=prompt, params=params, seed=seed, note=note,
                reviewer=reviewer, batch_id=batch_id)
