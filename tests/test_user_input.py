"""User input cannot stall or subvert the server: time-limited user regexes (filter, store search, find/replace),
CSV cells that are no spreadsheet formulas, a blind-review order of each reviewer's own, a private workspace,
and zip imports that cannot write outside their staging folder or expand without bound."""
from __future__ import annotations

import csv
import io
import json
import os
import stat
import threading
import time
import warnings
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from bench.caption_latency import build_review_dataset
from medart_core import caption_ops as ops
from medart_core import data, userregex
from medart_core.blind import ReviewStore
from medart_core.errors import ConfigError
from medart_core.interchange import (csv_cell_text, csv_safe_cell, export_imagefolder, export_medart_csv,
                                     read_caption_file, read_metadata)
from medart_core.review import ReviewContext, ReviewError, ReviewSession
from medart_core.workspace import Workspace

# ---------------------------------------------------------------------------------------------------------
# 1. User regexes
# ---------------------------------------------------------------------------------------------------------
# Ten characters that backtrack exponentially on any caption without a digit: Python's re needs ~2 s (GIL
# held) for each 34-character caption below and doubles with every 1-2 more characters.
CATASTROPHIC = r"(.|..)+\d"
CAPTIONS = ["A reddish polyp with a smooth rim.", "Pale mucosa, erosions and exudate.",
            "Oval raised lesion, granular top.", "Edematous folds with whitish spots."]
TOO_LONG = "took too long"


@pytest.fixture
def caps(ws, store):
    """Four images whose captions are short, realistic and digit-free."""
    ids = build_review_dataset(ws, store, "mini", len(CAPTIONS), labels=("polyps", "esophagitis"), size=8)
    for i, text in zip(ids, CAPTIONS):
        store.edit(i, text, reviewer="ana", expected_version=store.current(i).version)
    return ids


def _history(store, ids):
    return [[(e.id, e.kind, e.text) for e in store.history(i)] for i in ids]


def test_catastrophic_filter_regex_is_cut_off_with_a_message(store, ws, caps):
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=TOO_LONG) as err:
        ops.filter_states(store, "mini", ops.CaptionFilter(search=CATASTROPHIC, regex=True))
    assert time.monotonic() - t0 < 20 * userregex.TIME_BUDGET_S     # cut off, not run to the end
    assert "(a+)+" in str(err.value) and "nothing was changed" in str(err.value)
    # the review session says so too, and keeps its list
    rc, s = ReviewContext(ws, store, "tiny"), ReviewSession()
    s.open(rc, "mini")
    with pytest.raises(ConfigError, match=TOO_LONG):
        s.apply_filters(rc, "mini", ops.CaptionFilter(search=CATASTROPHIC, regex=True))
    assert s.ids == caps


def test_catastrophic_store_search_is_cut_off(store, caps):
    with pytest.raises(ConfigError, match=TOO_LONG):
        store.states("mini", text_regex=CATASTROPHIC)
    assert [s.image_id for s in store.states("mini", text_regex=r"^(Pale|Oval) \w+")] == caps[1:3]


def test_catastrophic_find_replace_is_cut_off_and_nothing_can_be_applied(store, ws, caps):
    before = _history(store, caps)
    with pytest.raises(ConfigError, match=TOO_LONG):
        ops.preview_find_replace(store.states("mini"), CATASTROPHIC, "x")
    rc, s = ReviewContext(ws, store, "tiny"), ReviewSession()
    s.open(rc, "mini")
    assert s.batch_preview(rc, "find / replace", "smooth", "even", True, "", "", "template").rows  # a good one
    with pytest.raises(ConfigError, match=TOO_LONG):
        s.batch_preview(rc, "find / replace", CATASTROPHIC, "x", True, "", "", "template")
    with pytest.raises(ReviewError, match="Preview a batch first"):   # the older, good preview is gone too
        s.batch_apply(rc, "ana")
    assert _history(store, caps) == before


def test_the_budget_is_one_per_request_not_one_per_caption(monkeypatch):
    clock = iter(range(1000))       # each reading of the clock: one more second

    class FakeTime:
        @staticmethod
        def monotonic() -> float:
            return float(next(clock))

    monkeypatch.setattr(userregex, "time", FakeTime)
    rx = userregex.compile_user_regex("polyp", budget_s=2.5)
    assert rx.search("a polyp") and not rx.search("mucosa") and rx.search("polyps")   # t = 0 (start), 1, 2
    with pytest.raises(ConfigError, match=TOO_LONG):
        rx.search("a polyp")                       # t = 3: each match was quick, but 2.5 s of the request are spent


def test_pattern_length_and_compile_time_repeats_are_capped():
    with pytest.raises(ConfigError, match="at most 500"):
        ops.compile_search("a" * 501, regex=True)
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="counted repeats"):   # compiling it would take seconds and gigabytes
        ops.compile_search("((a{9999}){9999}){9999}", regex=True)
    assert time.monotonic() - t0 < 1.0
    # literal find of any realistic length is fine; ordinary counted repeats too
    assert ops.compile_search("x" * 600, regex=False)("x" * 600)
    assert ops.compile_search(r"\w{2,3}\s\d{1,2} ?mm", regex=True)("erosions 3 mm")


def test_ordinary_regexes_and_group_replacements_keep_working(store, caps):
    states = store.states("mini")
    changes = ops.preview_find_replace(states, r"(\w+) (polyp|lesion)", r"\2 (\1)", regex=True)
    assert [c.after for c in changes] == ["A polyp (reddish) with a smooth rim.", "Oval lesion (raised), granular top."]
    named = ops.preview_find_replace(states, r"(?P<w>whitish)", r"\g<w>-grey", regex=True)
    assert [c.after for c in named] == ["Edematous folds with whitish-grey spots."]
    assert ops.compile_search("PALE", regex=True)(CAPTIONS[1])                 # case-insensitive by default
    with pytest.raises(ConfigError, match="Invalid replacement"):
        ops.preview_find_replace(states, r"(polyp)", r"\2")


def test_a_catastrophic_regex_does_not_freeze_other_threads(store, caps):
    """While one request runs a catastrophic filter, another thread's small store reads go on: ``regex``
    releases the GIL while matching (``re`` held it, and the reads waited for the whole search)."""
    events: list[str] = []
    started = threading.Event()
    outcome: list[BaseException | None] = []

    def hostile() -> None:
        started.set()
        try:
            ops.filter_states(store, "mini", ops.CaptionFilter(search=CATASTROPHIC, regex=True))
            outcome.append(None)
        except BaseException as e:   # noqa: BLE001 - handed to the main thread
            outcome.append(e)
        events.append("regex returned")

    t = threading.Thread(target=hostile, daemon=True)
    t.start()
    started.wait()
    time.sleep(0.05)                 # the hostile thread is inside the search by now
    for _ in range(20):
        assert store.current(caps[0]).text == CAPTIONS[0]
    events.append("20 reads done")
    t.join(timeout=120)
    assert events == ["20 reads done", "regex returned"]
    assert isinstance(outcome[0], ConfigError) and TOO_LONG in str(outcome[0])


# ---------------------------------------------------------------------------------------------------------
# 2. CSV formula injection
# ---------------------------------------------------------------------------------------------------------
FORMULAS = ['=HYPERLINK("http://x","y")', "+1+2", "-2+3", "@SUM(A1)", "\tleading tab", "\r=1+1",
            "'=already quoted", "'plain quote", "a = b, no formula", "Plain caption."]


@pytest.fixture
def formula_ds(ws, store):
    ids = build_review_dataset(ws, store, "fx", len(FORMULAS), labels=("polyps",), size=8)
    for i, text in zip(ids, FORMULAS):
        store.edit(i, text, reviewer="ana", expected_version=store.current(i).version)
        store.approve(i, reviewer="ana", expected_version=store.current(i).version)
    return ids


def test_csv_cells_are_no_formulas_and_the_store_and_jsonl_keep_the_text(ws, store, formula_ds, tmp_path):
    export_medart_csv(store, ws, "fx", tmp_path / "csv")
    rows = list(csv.reader(io.StringIO((tmp_path / "csv" / "metadata.csv").read_text(encoding="utf-8"),
                                       newline="")))
    cells = [c for row in rows for c in row]
    assert not [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")]
    texts = [r[1] for r in rows[1:]]
    assert texts[0] == '\'=HYPERLINK("http://x","y")' and texts[4] == "'\tleading tab"
    assert texts[6] == "''=already quoted" and texts[7] == "'plain quote" and texts[8] == "a = b, no formula"
    assert [store.current(i).text for i in formula_ds] == FORMULAS
    export_imagefolder(store, ws, "fx", tmp_path / "hf", val_fraction=0.0)
    lines = (tmp_path / "hf" / "train" / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    assert sorted(json.loads(line)["text"] for line in lines) == sorted(FORMULAS)


def test_med_art_csv_round_trip_gives_back_the_exact_captions(ws, store, formula_ds, tmp_path):
    export_medart_csv(store, ws, "fx", tmp_path / "csv")
    assert [r.text for _, r in read_caption_file(tmp_path / "csv" / "metadata.csv")] == FORMULAS
    assert [r.text for r in read_metadata(tmp_path / "csv")] == FORMULAS
    # the image import of the exported folder (file_name,text) takes the captions as drafts
    report = data.import_images(ws, store, tmp_path / "csv" / "metadata.csv", "fx2")
    drafts = {store.current(i).text for _, i, _ in report.imported}
    assert {t.strip() for t in FORMULAS} == drafts       # that importer strips surrounding whitespace
    for text in FORMULAS + ["'", "''", "", "'''+x"]:
        assert csv_cell_text(csv_safe_cell(text)) == text


# ---------------------------------------------------------------------------------------------------------
# 3. Blind review: each reviewer's own left/right order
# ---------------------------------------------------------------------------------------------------------
def _pngs(folder: Path, tag: str, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = folder / f"{tag}{i}.png"
        Image.new("RGB", (8, 8), (i * 10, 0, 0) if tag == "a" else (0, i * 10, 0)).save(p)
        out.append(str(p))
    return out


def _orders(rs: ReviewStore, study: str, reviewer: str, a: list[str]) -> list[bool]:
    """For each pair, whether this reviewer is shown A on the left (voting tags only, to move on)."""
    out = []
    while (p := rs.next_pair(study, reviewer)) is not None:
        assert rs.next_pair(study, reviewer) == p                  # the same order every time it is shown
        out.append(p.left == a[p.position])
        rs.vote(study, p.pair_id, reviewer, None, tag="seen", shown_to=p.reviewer)
    return out


def test_each_reviewer_sees_an_order_of_their_own(ws, tmp_path):
    a, b = _pngs(tmp_path / "A", "a", 16), _pngs(tmp_path / "B", "b", 16)
    rs = ReviewStore.for_workspace(ws)
    rs.create_study("s1", "checkpoints", "A", "B", a, b, seed=7)
    rs.create_study("s2", "checkpoints", "A", "B", a, b, seed=7)
    ana, ben = _orders(rs, "s1", "dr ana", a), _orders(rs, "s1", "dr ben", a)
    assert ana != ben, "a reviewer's mapping must not tell another reviewer theirs"
    assert 0 < sum(ana) < 16 and 0 < sum(ben) < 16
    assert _orders(rs, "s2", " dr ana ", a) == ana             # deterministic per seed, pair and (trimmed) name


def test_votes_resolve_each_reviewers_order_to_the_source(ws, tmp_path):
    a, b = _pngs(tmp_path / "A", "a", 12), _pngs(tmp_path / "B", "b", 12)
    rs = ReviewStore.for_workspace(ws)
    rs.create_study("s", "checkpoints", "ckpt-A", "ckpt-B", a, b, seed=3)
    plan = {"dr ana": "a", "dr ben": "b", "dr cy": "a"}       # whom each reviewer always prefers
    for reviewer, want in plan.items():
        while (p := rs.next_pair("s", reviewer)) is not None:
            left_is_a = p.left == a[p.position]
            choice = "left" if left_is_a == (want == "a") else "right"
            rs.vote("s", p.pair_id, reviewer, choice, shown_to=p.reviewer)
    res = rs.results("s")
    assert res["preferences"] == 36 and res["reviewers"] == sorted(plan)
    assert (res["rows"][0]["wins"], res["rows"][1]["wins"]) == (24, 12)
    assert res["rows"][0]["win_rate"] == pytest.approx(2 / 3)


def test_a_vote_under_another_name_than_the_pair_was_shown_to_is_refused(ws, tmp_path):
    a, b = _pngs(tmp_path / "A", "a", 2), _pngs(tmp_path / "B", "b", 2)
    rs = ReviewStore.for_workspace(ws)
    rs.create_study("s", "checkpoints", "A", "B", a, b)
    p = rs.next_pair("s", "dr ana")
    with pytest.raises(ConfigError, match="name changed"):
        rs.vote("s", p.pair_id, "dr ben", "left", shown_to=p.reviewer)
    assert rs.results("s")["votes"] == 0


def test_votes_stored_before_the_change_keep_their_source(ws, tmp_path):
    """A vote row stores the resolved source (``picked_source``): results never re-derive it from an order."""
    import sqlite3

    a, b = _pngs(tmp_path / "A", "a", 2), _pngs(tmp_path / "B", "b", 2)
    rs = ReviewStore.for_workspace(ws)
    rs.create_study("s", "checkpoints", "A", "B", a, b)
    con = sqlite3.connect(ws.root / "reviews.sqlite")
    pid = con.execute("SELECT id FROM pairs ORDER BY position LIMIT 1").fetchone()[0]
    with con:
        con.execute("INSERT INTO votes(pair_id, reviewer, shown_choice, picked_source, tag, created_at) VALUES "
                    "(?, 'old reviewer', 'left', 'b', NULL, '2025-01-01T00:00:00Z')", (pid,))
    con.close()
    res = rs.results("s")
    assert (res["rows"][0]["wins"], res["rows"][1]["wins"]) == (0, 1)
    assert rs.next_pair("s", "old reviewer").position == 1


# ---------------------------------------------------------------------------------------------------------
# 4. The workspace is private
# ---------------------------------------------------------------------------------------------------------
def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)            # the usual default, under which files are created world-readable
    yield
    os.umask(old)


def test_workspace_root_and_databases_are_private(tmp_path, umask_022):
    from medart_core.accounts import UserStore
    from medart_core.captions import CaptionStore
    from medart_core.jobs import JobLedger

    ws = Workspace.open(tmp_path / "w")
    assert _mode(ws.root) & 0o077 == 0
    store = CaptionStore.for_workspace(ws)
    store.create_dataset("d")
    ledger = JobLedger.for_workspace(ws)
    ledger.list()
    ReviewStore.for_workspace(ws).studies()
    users = UserStore.for_workspace(ws)
    users.add("admin1", "admin", "a-long-password-1")
    users.close()
    for name in ("captions.sqlite", "jobs.sqlite", "reviews.sqlite"):
        files = sorted(ws.root.glob(name + "*"))
        assert files and all(_mode(f) & 0o077 == 0 for f in files), [(f.name, oct(_mode(f))) for f in files]
    store.close()
    ledger.close()
    Workspace.open(ws.root)          # every start: users.sqlite (and a database made before the rule) too
    assert all(_mode(f) & 0o077 == 0 for f in ws.root.glob("*.sqlite*"))


def test_a_world_readable_workspace_from_before_is_made_private(tmp_path, umask_022):
    root = tmp_path / "old"
    root.mkdir(mode=0o755)
    (root / "users.sqlite").write_bytes(b"")
    os.chmod(root, 0o755)
    os.chmod(root / "users.sqlite", 0o644)
    Workspace.open(root)
    assert _mode(root) == 0o700 and _mode(root / "users.sqlite") == 0o600


# ---------------------------------------------------------------------------------------------------------
# 5. Zip import
# ---------------------------------------------------------------------------------------------------------
def _png_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (seed * 40 % 256, seed * 17 % 256, 90)).save(buf, format="PNG")
    return buf.getvalue()


def _zip(path: Path, members: list[tuple[str | zipfile.ZipInfo, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)     # "Duplicate name": one of the hostile cases
        for name, payload in members:
            zf.writestr(name, payload)
    return path


def _untouched(ws: Workspace, store, tmp_path: Path, before: set[Path]) -> None:
    """Nothing stored, no staging folder left, no file written anywhere but the (gone) staging folder."""
    assert not store.has_dataset("z")
    assert list(ws.tmp_dir.iterdir()) == []
    assert {p for p in tmp_path.rglob("*") if not p.is_relative_to(ws.root)} == before


def test_a_zipped_folder_per_class_tree_imports_with_its_labels(ws, store, tmp_path):
    flat = _zip(tmp_path / "flat.zip", [("ulcer/a.png", _png_bytes(1)), ("ulcer/b.png", _png_bytes(2)),
                                        ("polyp/c.png", _png_bytes(3)), ("__MACOSX/polyp/._c.png", b"junk"),
                                        (".DS_Store", b"junk")])
    report = data.import_images(ws, store, flat, "z")
    assert report.label_counts() == {"polyp": 1, "ulcer": 2} and not report.skipped
    # "zip -r data.zip data/" (one top folder), uploaded with a loose image beside it
    nested = _zip(tmp_path / "nested.zip", [("data/", b""), ("data/normal/d.png", _png_bytes(4)),
                                            ("data/polyp/e.png", _png_bytes(5))])
    loose = tmp_path / "f.png"
    loose.write_bytes(_png_bytes(6))
    report = data.import_files(ws, store, [str(nested), str(loose)], "z2", label="extra")
    assert report.label_counts() == {"extra": 1, "normal": 1, "polyp": 1}
    assert list(ws.tmp_dir.iterdir()) == []


def _symlink(name: str, target: bytes = b"/etc/passwd") -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target


def _device(name: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFCHR | 0o644) << 16
    return info, b""


@pytest.mark.parametrize("case, members, message", [
    ("dotdot", [("ulcer/a.png", _png_bytes(1)), ("../evil.png", _png_bytes(2))], "outside the archive"),
    ("dotdot-backslash", [("ulcer\\..\\..\\evil.png", _png_bytes(2))], "outside the archive"),
    ("absolute", [("ulcer/a.png", _png_bytes(1)), ("{abs}", _png_bytes(2))], "absolute path"),
    ("symlink", [_symlink("ulcer/link.png"), ("ulcer/a.png", _png_bytes(1))], "symbolic link"),
    ("device", [_device("ulcer/dev"), ("ulcer/a.png", _png_bytes(1))], "device"),
    ("bomb", [("ulcer/a.png", _png_bytes(1)), ("ulcer/zeros.bmp", bytes(8 * 1024 ** 2))], "zip bomb"),
    ("duplicate", [("ulcer/a.png", _png_bytes(1)), ("ulcer/a.png", _png_bytes(2))], "twice"),
])
def test_hostile_zips_are_refused_whole(ws, store, tmp_path, case, members, message):
    abs_target = tmp_path / "abs_evil.png"
    members = [(n.replace("{abs}", str(abs_target)) if isinstance(n, str) else n, b) for n, b in members]
    archive = _zip(tmp_path / f"{case}.zip", members)
    before = {p for p in tmp_path.rglob("*") if not p.is_relative_to(ws.root)}
    with pytest.raises(ConfigError, match=message):
        data.import_images(ws, store, archive, "z")
    with pytest.raises(ConfigError, match=message):
        data.import_files(ws, store, [str(archive)], "z")
    _untouched(ws, store, tmp_path, before)
    assert not abs_target.exists() and not (tmp_path / "evil.png").exists() and not (ws.root / "evil.png").exists()


def test_zips_with_too_many_members_or_bytes_are_refused(ws, store, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_ZIP_MEMBERS", 3)
    many = _zip(tmp_path / "many.zip", [(f"ulcer/{i}.png", _png_bytes(i)) for i in range(4)])
    before = {p for p in tmp_path.rglob("*") if not p.is_relative_to(ws.root)}
    with pytest.raises(ConfigError, match="at most 3"):
        data.import_images(ws, store, many, "z")
    monkeypatch.setattr(data, "MAX_ZIP_MEMBERS", 20_000)
    monkeypatch.setattr(data, "MAX_ZIP_BYTES", 2 * len(_png_bytes(0)) + 10)
    with pytest.raises(ConfigError, match="expands to"):
        data.import_images(ws, store, many, "z")
    one = _zip(tmp_path / "one.zip", [("ulcer/0.png", _png_bytes(0)), ("ulcer/1.png", _png_bytes(1))])
    with pytest.raises(ConfigError, match="expands to"):          # the bytes budget covers every archive of a call
        data.import_files(ws, store, [str(one), str(one)], "z")
    _untouched(ws, store, tmp_path, before | {one})
