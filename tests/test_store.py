"""The SQLite store base (medart_core/store.py) and the stores built on it.

Every existing database still opens: the fixtures under tests/data/stores/ were written by the stores as they
were before the base (see its README); each is copied into a fresh workspace, opened with today's code, read
back and written to. Then the base itself: schema creation and migration by version, the durable write-through
once per committed transaction, a locked database's message, connections per thread and per process."""
from __future__ import annotations

import multiprocessing
import pickle
import re
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest

from medart_core import durable
from medart_core.accounts import UserStore
from medart_core.blind import ReviewStore
from medart_core.captions import CaptionStore
from medart_core.clock import new_batch_id, utc_now, utc_now_ms
from medart_core.errors import ConfigError, MedArtError
from medart_core.store import SqliteStore, StoreBusyError, run_script

FIXTURES = Path(__file__).resolve().parent / "data" / "stores"


def _copy(name: str, ws) -> Path:
    dst = ws.root / name
    shutil.copyfile(FIXTURES / name, dst)
    return dst


def _pragma(db: Path, name: str):
    con = sqlite3.connect(db)
    try:
        return con.execute(f"PRAGMA {name}").fetchone()[0]
    finally:
        con.close()


# ------------------------------------------------------------------------------------------------
# every existing database still opens
# ------------------------------------------------------------------------------------------------
def test_fixtures_are_single_small_files():
    for name in ("captions.sqlite", "users.sqlite", "reviews.sqlite", "jobs.sqlite"):
        assert (FIXTURES / name).stat().st_size < 100_000
        assert not (FIXTURES / f"{name}-wal").exists() and not (FIXTURES / f"{name}-shm").exists()


def test_old_caption_database_opens_reads_and_writes(ws):
    _copy("captions.sqlite", ws)
    with CaptionStore.for_workspace(ws) as store:
        (info,) = store.list_datasets()
        assert (info.name, info.modality, info.n_images, info.meta) == ("kvasir", "endoscopy", 2, {"licence": "CC-BY"})
        assert info.status_counts == {"approved": 1, "pending": 1}
        first, second = store.states("kvasir")
        assert (first.text, first.status, first.reviewer, first.label) == (
            "A sessile polyp in the colon", "approved", "bob", "polyp")
        assert (second.text, second.status, second.edited) == ("An endoscopic image of ulcer", "pending", False)
        assert [e.kind for e in store.history(first.image_id)] == ["draft", "edit", "status"]
        assert store.get_image(first.image_id).source == {"original_name": "orig_1.jpg"}
        # old timestamps parse as they were written (ISO 8601 with milliseconds and an offset)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", first.updated_at)
        ev = store.edit(second.image_id, "An ulcer", reviewer="amy", expected_version=second.version)
        store.approve(second.image_id, reviewer="amy", expected_version=ev.id)
    with CaptionStore.for_workspace(ws) as again:
        assert again.dataset_info("kvasir").status_counts == {"approved": 2}
        assert again.rebuild_state() == 2
        assert again.current(second.image_id).text == "An ulcer"


def test_old_users_table_opens_reads_and_writes(ws):
    db = _copy("users.sqlite", ws)
    assert _pragma(db, "user_version") == 0
    users = UserStore.for_workspace(ws)
    try:
        assert [(u.name, u.role, u.has_password, u.created_by) for u in users.list()] == [
            ("alice", "admin", True, "cli"), ("bob", "annotator", False, "alice")]
        assert users.verify("alice", "correct horse battery") and not users.verify("alice", "wrong password")
        lock = users.lockout("BOB")
        assert (lock.name, lock.failures) == ("bob", 6) and lock.locked(now=1_800_000_001.0)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", users.get("alice").created_at)
        users.add("carol", "trainer", None, by="alice")
        users.set_role("bob", "trainer")
        assert users.clear_failures("bob")
        assert [(u.name, u.role) for u in users.list()] == [("alice", "admin"), ("bob", "trainer"),
                                                            ("carol", "trainer")]
    finally:
        users.close()
    assert _pragma(db, "user_version") == UserStore.SCHEMA_VERSION
    assert _pragma(db, "journal_mode") == "wal"


def test_old_review_database_opens_reads_and_writes(ws):
    db = _copy("reviews.sqlite", ws)
    with ReviewStore.for_workspace(ws) as reviews:
        (study,) = reviews.studies()
        assert (study["name"], study["kind"], study["source_a"], study["pairs"]) == ("study1", "checkpoints",
                                                                                   "ckpt-a", 1)
        res = reviews.results("study1")
        assert (res["votes"], res["reviewers"], res["preferences"]) == (1, ["carol"], 1)
        assert reviews.next_pair("study1", "carol") is None
        shown = reviews.next_pair("study1", "dave")
        assert shown.prompt == "a polyp"
        reviews.vote("study1", shown.pair_id, "dave", "right", shown_to=shown.reviewer)
        assert reviews.results("study1")["votes"] == 2
    assert _pragma(db, "user_version") == ReviewStore.SCHEMA_VERSION


def test_old_job_ledger_opens_reads_and_writes(ws):
    from medart_core.jobs import JobLedger

    _copy("jobs.sqlite", ws)
    ledger = JobLedger(ws)
    try:
        (job,) = ledger.list()
        assert (job.kind, job.owner, job.config["seconds"], job.state) == ("sleep", "alice", 0.0, "queued")
        assert [e.event for e in ledger.events(job.id)] == ["submitted"]
        # schema 2 (issue 17) added where a job runs: every row of the old ledger ran here
        assert (job.executor, job.remote_id, job.remote_folder, job.remote_reason) == ("local", None, None, None)
        assert ledger.conn().execute("PRAGMA user_version").fetchone()[0] == 2
        new = ledger.submit("sleep", {"seconds": 0})
        assert {j.id for j in ledger.list()} == {job.id, new.id}
    finally:
        ledger.close()


# ------------------------------------------------------------------------------------------------
# the base
# ------------------------------------------------------------------------------------------------
class Notes(SqliteStore):
    SCHEMA = """
    CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT NOT NULL);
    CREATE TRIGGER notes_no_delete BEFORE DELETE ON notes BEGIN
        SELECT RAISE(ABORT, 'notes are append-only'); END;
    """
    DURABLE_SPEC = durable.Spec("notes", "notes.sqlite", append_only=(("notes", "id"),))

    def add(self, text: str, *, replicate: bool = True) -> int:
        with self.write(replicate=replicate) as con:
            return int(con.execute("INSERT INTO notes (text) VALUES (?)", (text,)).lastrowid)

    def texts(self) -> list[str]:
        with self.read() as con:
            return [r["text"] for r in con.execute("SELECT text FROM notes ORDER BY id")]


class NotesV2(Notes):
    SCHEMA_VERSION = 2
    SCHEMA = Notes.SCHEMA.replace("text TEXT NOT NULL", "text TEXT NOT NULL, author TEXT")
    MIGRATIONS = {1: "ALTER TABLE notes ADD COLUMN author TEXT;\nUPDATE notes SET author = 'legacy';"}


def test_fresh_database_gets_its_schema_version_wal_and_owner_only_mode(tmp_path):
    db = tmp_path / "sub" / "notes.sqlite"
    store = Notes(db)
    store.add("hello")
    assert store.texts() == ["hello"]
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        store.conn().execute("DELETE FROM notes")       # the trigger's ';' inside BEGIN ... END survived the split
    store.close()
    assert _pragma(db, "user_version") == 1 and _pragma(db, "journal_mode") == "wal"
    assert db.stat().st_mode & 0o777 == 0o600


def test_migration_from_the_previous_version(tmp_path):
    db = tmp_path / "notes.sqlite"
    with Notes(db) as old:
        old.add("written by version 1")
    with NotesV2(db) as new:
        rows = [tuple(r) for r in new.conn().execute("SELECT text, author FROM notes")]
        assert rows == [("written by version 1", "legacy")]
    assert _pragma(db, "user_version") == 2
    with NotesV2(tmp_path / "fresh.sqlite") as fresh:     # a fresh file is created at version 2, not migrated
        assert "author" in {r[1] for r in fresh.conn().execute("PRAGMA table_info(notes)")}


def test_failed_migration_changes_nothing_and_newer_or_unknown_versions_are_refused(tmp_path):
    db = tmp_path / "notes.sqlite"
    with Notes(db) as old:
        old.add("kept")

    class Broken(NotesV2):
        MIGRATIONS = {1: "ALTER TABLE notes ADD COLUMN author TEXT;\nSELECT * FROM no_such_table;"}

    with pytest.raises(sqlite3.OperationalError, match="no_such_table"):
        Broken(db)
    assert _pragma(db, "user_version") == 1
    con = sqlite3.connect(db)
    assert "author" not in {r[1] for r in con.execute("PRAGMA table_info(notes)")}   # rolled back whole
    con.close()

    class V3(Notes):
        SCHEMA_VERSION = 3

    with pytest.raises(ConfigError, match="cannot upgrade"):
        V3(db)
    with NotesV2(db):
        pass
    with pytest.raises(ConfigError, match="newer"):
        Notes(db)


def test_write_through_once_per_committed_transaction(tmp_path, monkeypatch):
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    monkeypatch.setenv(durable.ENV_VAR, str(bucket))
    db = tmp_path / "notes.sqlite"
    store = Notes(db)
    recorded: list = []
    real_record = durable.record

    def spy(entry):
        if entry is not None:
            # record runs after COMMIT: another connection already sees the rows it logs
            other = sqlite3.connect(db)
            ids = {r[0] for r in other.execute("SELECT id FROM notes")}
            other.close()
            assert {r["id"] for r in entry.line["rows"]["notes"]} <= ids
        recorded.append(entry)
        real_record(entry)

    monkeypatch.setattr(durable, "record", spy)
    store.add("one")
    with store.write() as con:                   # two rows, one transaction: one log line
        con.execute("INSERT INTO notes (text) VALUES ('two')")
        con.execute("INSERT INTO notes (text) VALUES ('three')")
    store.add("not replicated", replicate=False)
    with pytest.raises(ValueError):
        with store.write() as con:
            con.execute("INSERT INTO notes (text) VALUES ('rolled back')")
            raise ValueError("boom")
    store.close()
    # one call per committed transaction (None for the one kept out of the log), none for the rolled-back one
    assert len(recorded) == 3 and recorded[2] is None
    lines = [ln for f in sorted((bucket / "notes").glob("*.jsonl")) for ln in f.read_text().splitlines()]
    assert len(lines) == 2
    assert [[r["text"] for r in e.line["rows"]["notes"]] for e in recorded[:2]] == [["one"], ["two", "three"]]
    with Notes(db) as again:
        assert again.texts() == ["one", "two", "three", "not replicated"]


def test_a_locked_database_gives_a_clear_message(tmp_path, monkeypatch):
    class Quick(Notes):
        BUSY_TIMEOUT_MS = 200
        BUSY_MESSAGE = "The notes {path} are busy (held for over {seconds} s); try again in a moment."

    db = tmp_path / "notes.sqlite"
    store = Quick(db)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreBusyError, match=r"The notes .*notes\.sqlite are busy \(held for over 0 s\)") as e:
            store.add("waits")
        assert isinstance(e.value, MedArtError)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    store.add("now it goes")
    assert store.texts() == ["now it goes"]
    store.close()

    monkeypatch.setattr(CaptionStore, "BUSY_TIMEOUT_MS", 200)
    captions = CaptionStore(tmp_path / "captions.sqlite")
    holder = sqlite3.connect(captions.db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreBusyError, match="caption database is busy"):
            captions.create_dataset("kvasir")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        captions.close()


def test_connections_are_per_thread_and_close_closes_them_all(tmp_path):
    store = Notes(tmp_path / "notes.sqlite")
    mine = store.conn()
    assert store.conn() is mine
    got: dict[str, sqlite3.Connection] = {}
    ready, release = threading.Event(), threading.Event()

    def worker():
        got["con"] = store.conn()
        store.add("from a thread")
        ready.set()
        release.wait(30)

    t = threading.Thread(target=worker)
    t.start()
    assert ready.wait(30)
    assert got["con"] is not mine
    store.close()
    release.set()
    t.join(30)
    for con in (mine, got["con"]):
        with pytest.raises(sqlite3.ProgrammingError):
            con.execute("SELECT 1")
    with pytest.raises(RuntimeError, match="closed"):
        store.conn()


def test_read_is_one_snapshot(tmp_path):
    store = Notes(tmp_path / "notes.sqlite")
    store.add("before")
    other = Notes(tmp_path / "notes.sqlite")
    with store.read() as con:
        assert con.execute("SELECT COUNT(*) FROM notes").fetchone()[0] == 1
        other.add("meanwhile")
        assert con.execute("SELECT COUNT(*) FROM notes").fetchone()[0] == 1
        with store.read() as inner:                    # a nested read joins the snapshot
            assert inner.execute("SELECT COUNT(*) FROM notes").fetchone()[0] == 1
    assert store.texts() == ["before", "meanwhile"]
    store.close()
    other.close()


def _child_writes(store: Notes, queue) -> None:
    store.add("from the child")
    queue.put(store.texts())


def test_a_forked_child_and_a_pickled_copy_open_their_own_connections(tmp_path):
    store = Notes(tmp_path / "notes.sqlite")
    store.add("parent")
    parent_con = store.conn()
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    p = ctx.Process(target=_child_writes, args=(store, queue))
    p.start()
    assert queue.get(timeout=60) == ["parent", "from the child"]
    p.join(60)
    assert p.exitcode == 0
    assert store.conn() is parent_con and store.texts() == ["parent", "from the child"]
    copy = pickle.loads(pickle.dumps(store))
    assert copy.conn() is not parent_con and copy.texts() == ["parent", "from the child"]
    copy.close()
    store.close()


def test_every_store_sets_the_same_pragmas(ws):
    users = UserStore.for_workspace(ws)
    assert not users.exists()                        # lazy: constructing it made no file
    stores = [CaptionStore.for_workspace(ws), ReviewStore.for_workspace(ws), users]
    try:
        for s in stores:
            con = s.conn()
            assert con is s.conn()                   # one connection per thread, also for ReviewStore
            assert con.row_factory is sqlite3.Row
            assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal", s
            assert con.execute("PRAGMA foreign_keys").fetchone()[0] == 1, s
            assert con.execute("PRAGMA synchronous").fetchone()[0] == 2, s      # FULL
            assert con.execute("PRAGMA busy_timeout").fetchone()[0] == s.BUSY_TIMEOUT_MS >= 10_000, s
            assert s.db_path.stat().st_mode & 0o777 == 0o600
    finally:
        for s in stores:
            s.close()


def test_run_script_splits_on_whole_statements():
    con = sqlite3.connect(":memory:", isolation_level=None)
    con.execute("BEGIN")
    run_script(con, "CREATE TABLE a (x);\nCREATE TRIGGER t BEFORE INSERT ON a BEGIN\n  SELECT 1;\n  SELECT 2;\nEND;\n"
                    "INSERT INTO a VALUES (1)")
    assert con.in_transaction                        # executescript would have committed
    con.execute("COMMIT")
    assert con.execute("SELECT x FROM a").fetchall() == [(1,)]


def test_one_clock_and_one_batch_id():
    from medart_core import caption_ops

    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", utc_now())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", utc_now_ms())
    assert re.fullmatch(r"import:[0-9a-f]{12}", new_batch_id("import"))
    assert re.fullmatch(r"batch:[0-9a-f]{12}", caption_ops.new_batch_id())
    assert re.fullmatch(r"batch:[0-9a-f]{12}", CaptionStore.new_batch_id())
