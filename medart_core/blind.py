"""Blind review for clinicians: pairs of images (two checkpoints, or real vs synthetic) shown in a random
order with their sources hidden; the reviewer picks the more realistic one and/or flags artefacts with a
short tag. Votes are appended (never updated or deleted) with the reviewer's identity, and the results
are win rates with 95 % Wilson intervals; for real-vs-synthetic also how often the synthetic image was
taken for the real one.

The left/right order is drawn per (study seed, pair, reviewer): the same every time one reviewer sees a
pair, and independent between reviewers, so a reviewer who has finished (and seen the results, which name
the sources) cannot tell the others which side is which. A vote is resolved to its source when it is
stored (``picked_source``, next to the ``shown_choice``), so results never depend on the order rule.

Storage: ``W/reviews.sqlite``, a :class:`~medart_core.store.SqliteStore` (WAL, a connection per thread,
schema version 1; files written before the store kept a version open as version 0): ``studies``, ``pairs``
and an append-only ``votes`` table guarded by triggers. ``pairs.swapped`` is the one study-wide order of
databases made before the per-reviewer order; it is still written (the column is NOT NULL) and no longer
read; their votes kept their resolved sources.
"""
from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from . import durable
from .clock import utc_now
from .constants import MAX_REVIEWER_CHARS
from .errors import ConfigError, NotFoundError
from .metrics import proportion_ci
from .seeds import derive_seed
from .store import SqliteStore
from .workspace import Workspace

MAX_TAG_CHARS = 40
KINDS = ("checkpoints", "real-vs-synthetic")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, kind TEXT NOT NULL, source_a TEXT NOT NULL,
    source_b TEXT NOT NULL, seed INTEGER NOT NULL, created_by TEXT, created_at TEXT NOT NULL, meta TEXT);
CREATE TABLE IF NOT EXISTS pairs (
    id INTEGER PRIMARY KEY, study_id INTEGER NOT NULL REFERENCES studies(id), position INTEGER NOT NULL,
    path_a TEXT NOT NULL, path_b TEXT NOT NULL, swapped INTEGER NOT NULL, prompt TEXT,
    UNIQUE(study_id, position));
CREATE TABLE IF NOT EXISTS votes (
    id INTEGER PRIMARY KEY, pair_id INTEGER NOT NULL REFERENCES pairs(id), reviewer TEXT NOT NULL,
    shown_choice TEXT, picked_source TEXT, tag TEXT, created_at TEXT NOT NULL);
CREATE TRIGGER IF NOT EXISTS votes_no_update BEFORE UPDATE ON votes BEGIN
    SELECT RAISE(ABORT, 'votes are append-only'); END;
CREATE TRIGGER IF NOT EXISTS votes_no_delete BEFORE DELETE ON votes BEGIN
    SELECT RAISE(ABORT, 'votes are append-only'); END;
CREATE INDEX IF NOT EXISTS votes_by_pair ON votes(pair_id, reviewer);
"""


@dataclass(frozen=True)
class ShownPair:
    """What a reviewer sees: two images, left and right, with no hint of where they came from."""

    study: str
    pair_id: int
    position: int          # 0-based position in the study
    total: int
    left: str
    right: str
    prompt: str | None
    reviewer: str = ""     # the name the order was drawn for: pass it back as ``vote(..., shown_to=)``


def _shown_swapped(seed: int, position: int, reviewer: str) -> bool:
    """Whether ``reviewer`` sees B on the left of the pair at ``position``: one draw per reviewer and pair."""
    return bool(derive_seed(seed, "blind-order", position, reviewer) % 2)


class ReviewStore(SqliteStore):
    """Studies, pairs and votes of ``W/reviews.sqlite``; safe to share between threads."""

    SCHEMA_VERSION = 1
    SCHEMA = _SCHEMA
    MIGRATIONS = {0: _SCHEMA}      # files written before the version was kept: the same tables (IF NOT EXISTS)
    DURABLE_SPEC = durable.REVIEWS
    BUSY_MESSAGE = ("The blind-review database {path} is busy (another process held it for over {seconds} s); "
                    "try again in a moment.")

    @classmethod
    def for_workspace(cls, ws: Workspace) -> "ReviewStore":
        return cls(ws.root / "reviews.sqlite")

    # ---- studies ----------------------------------------------------------------------------------------
    def create_study(self, name: str, kind: str, source_a: str, source_b: str, images_a: Sequence[str],
                     images_b: Sequence[str], *, prompts: Sequence[str] | None = None, seed: int = 0,
                     created_by: str | None = None, meta: dict[str, Any] | None = None) -> int:
        """A study of ``len(images_a)`` pairs (image i of A against image i of B, e.g. the same prompt and
        seed from two checkpoints). Left/right order is drawn per pair and reviewer from ``seed``."""
        if kind not in KINDS:
            raise ConfigError(f"study kind must be one of {KINDS}, got {kind!r}.")
        name = (name or "").strip()
        if not name or len(name) > 80:
            raise ConfigError("A study needs a name of 1-80 characters.")
        if len(images_a) != len(images_b) or not images_a:
            raise ConfigError(f"A study pairs image i of A with image i of B: got {len(images_a)} and "
                              f"{len(images_b)} images.")
        for p in list(images_a) + list(images_b):
            if not Path(p).is_file():
                raise NotFoundError(f"Image {p} does not exist.")
        # The pairs' images go to the durable folder (if any) before the study exists, so a restored study
        # never lacks them; paths outside the workspace are not copied.
        durable.save_files((p, rel) for p in list(images_a) + list(images_b)
                           if (rel := durable.workspace_rel(self.path.parent, p)) is not None)
        with self.write() as con:
            try:
                cur = con.execute("INSERT INTO studies(name, kind, source_a, source_b, seed, created_by, created_at,"
                                  " meta) VALUES (?,?,?,?,?,?,?,?)",
                                  (name, kind, source_a, source_b, int(seed), created_by, utc_now(),
                                   json.dumps(meta or {})))
            except sqlite3.IntegrityError:
                raise ConfigError(f"A study named {name!r} exists already; choose another name.") from None
            sid = int(cur.lastrowid)
            for i, (a, b) in enumerate(zip(images_a, images_b)):
                swapped = derive_seed(seed, "blind-order", i) % 2
                con.execute("INSERT INTO pairs(study_id, position, path_a, path_b, swapped, prompt) VALUES "
                            "(?,?,?,?,?,?)", (sid, i, str(a), str(b), swapped,
                                              None if prompts is None else str(prompts[i])))
        return sid

    def studies(self) -> list[dict[str, Any]]:
        with self.read() as con:
            rows = con.execute("SELECT s.id, s.name, s.kind, s.source_a, s.source_b, s.created_at, "
                               "(SELECT COUNT(*) FROM pairs p WHERE p.study_id = s.id) FROM studies s ORDER BY s.id"
                               ).fetchall()
        return [dict(zip(("id", "name", "kind", "source_a", "source_b", "created_at", "pairs"), r)) for r in rows]

    def _study(self, con: sqlite3.Connection, name: str) -> tuple[int, str, str, str, int]:
        """``(id, kind, source_a, source_b, seed)`` of the study named ``name``."""
        row = con.execute("SELECT id, kind, source_a, source_b, seed FROM studies WHERE name = ?",
                          (name,)).fetchone()
        if row is None:
            raise NotFoundError(f"No blind-review study named {name!r}.")
        return row

    # ---- reviewing ----------------------------------------------------------------------------------------
    def next_pair(self, study: str, reviewer: str) -> ShownPair | None:
        """The first pair this reviewer has not voted on (None when done)."""
        reviewer = _check_reviewer(reviewer)
        with self.read() as con:
            sid, _, _, _, seed = self._study(con, study)
            total = con.execute("SELECT COUNT(*) FROM pairs WHERE study_id = ?", (sid,)).fetchone()[0]
            row = con.execute("SELECT id, position, path_a, path_b, prompt FROM pairs WHERE study_id = ? "
                              "AND id NOT IN (SELECT pair_id FROM votes WHERE reviewer = ?) ORDER BY position LIMIT 1",
                              (sid, reviewer)).fetchone()
        if row is None:
            return None
        pid, pos, a, b, prompt = row
        left, right = (b, a) if _shown_swapped(seed, pos, reviewer) else (a, b)
        return ShownPair(study=study, pair_id=pid, position=pos, total=total, left=left, right=right, prompt=prompt,
                         reviewer=reviewer)

    def vote(self, study: str, pair_id: int, reviewer: str, choice: str | None, tag: str | None = None, *,
             shown_to: str | None = None) -> None:
        """``choice``: "left" | "right" (the more realistic) or None (only an artefact tag). One vote per
        reviewer and pair; the reviewer's hidden order is resolved to the source here, never shown.

        ``shown_to`` (``ShownPair.reviewer``) is the name the pair was drawn for: "left" means left of *that*
        order, so a vote under another name (the name field edited since the pair was shown) is refused."""
        reviewer = _check_reviewer(reviewer)
        if shown_to is not None and _check_reviewer(shown_to) != reviewer:
            raise ConfigError("The reviewer name changed since this pair was shown; nothing was saved. Press "
                              "Start to see the pairs of the name you entered.")
        tag = (tag or "").strip() or None
        if tag is not None and len(tag) > MAX_TAG_CHARS:
            raise ConfigError(f"An artefact tag is at most {MAX_TAG_CHARS} characters.")
        if choice not in ("left", "right", None):
            raise ConfigError(f"choice must be 'left', 'right' or none, got {choice!r}.")
        if choice is None and tag is None:
            raise ConfigError("Pick the more realistic image or flag an artefact with a tag.")
        with self.write() as con:
            sid, _, _, _, seed = self._study(con, study)
            row = con.execute("SELECT position FROM pairs WHERE id = ? AND study_id = ?", (int(pair_id), sid)
                              ).fetchone()
            if row is None:
                raise NotFoundError(f"Pair {pair_id} is not part of study {study!r}.")
            if con.execute("SELECT 1 FROM votes WHERE pair_id = ? AND reviewer = ?", (int(pair_id), reviewer)
                           ).fetchone():
                raise ConfigError(f"{reviewer} has already voted on this pair; votes are final.")
            picked = None
            if choice is not None:
                left_is_a = not _shown_swapped(seed, int(row[0]), reviewer)
                picked = "a" if (choice == "left") == left_is_a else "b"
            con.execute("INSERT INTO votes(pair_id, reviewer, shown_choice, picked_source, tag, created_at) "
                        "VALUES (?,?,?,?,?,?)", (int(pair_id), reviewer, choice, picked, tag, utc_now()))

    # ---- results --------------------------------------------------------------------------------------------
    def results(self, study: str) -> dict[str, Any]:
        """Win rates of A and B with Wilson intervals, artefact tags per source, per-reviewer counts."""
        with self.read() as con:
            sid, kind, src_a, src_b, _ = self._study(con, study)
            votes = con.execute("SELECT v.reviewer, v.picked_source, v.tag FROM votes v "
                                "JOIN pairs p ON p.id = v.pair_id WHERE p.study_id = ?", (sid,)).fetchall()
            total = con.execute("SELECT COUNT(*) FROM pairs WHERE study_id = ?", (sid,)).fetchone()[0]
        picks = [v[1] for v in votes if v[1] is not None]
        n = len(picks)
        wins_a = sum(1 for p in picks if p == "a")
        tags: dict[str, dict[str, int]] = {src_a: {}, src_b: {}}
        for reviewer, picked, tag in votes:
            if tag:
                # A tag flags the image the reviewer did not prefer, or both when no preference was given.
                target = {"a": src_b, "b": src_a}.get(picked or "", "both")
                for src in ([src_a, src_b] if target == "both" else [target]):
                    tags[src][tag] = tags[src].get(tag, 0) + 1
        out: dict[str, Any] = {
            "study": study, "kind": kind, "pairs": total, "votes": len(votes), "preferences": n,
            "reviewers": sorted({v[0] for v in votes}),
            "rows": [
                {"source": src_a, "wins": wins_a, "win_rate": wins_a / n if n else None,
                 "ci": list(proportion_ci(wins_a, n))},
                {"source": src_b, "wins": n - wins_a, "win_rate": (n - wins_a) / n if n else None,
                 "ci": list(proportion_ci(n - wins_a, n))},
            ],
            "artefact_tags": tags,
        }
        if kind == "real-vs-synthetic":
            # Source A is the real image: a pick of B means the synthetic image was taken for the real one.
            fooled = n - wins_a
            out["synthetic_taken_for_real"] = {"count": fooled, "rate": fooled / n if n else None,
                                               "ci": list(proportion_ci(fooled, n))}
        return out


def _check_reviewer(reviewer: Any) -> str:
    r = str(reviewer or "").strip()
    if not r:
        raise ConfigError("Enter your name (or log in) before voting: every vote is stored with its reviewer.")
    if len(r) > MAX_REVIEWER_CHARS:
        raise ConfigError(f"Reviewer name is longer than {MAX_REVIEWER_CHARS} characters.")
    return r


def neutral_pair_images(left: str | os.PathLike, right: str | os.PathLike, *, size: int | None = None
                        ) -> tuple[Any, Any]:
    """The two images of a shown pair as fresh RGB PIL images of one size, so only the pixels reach the
    reviewer: not the file names or folders (an evaluation image's folder is its checkpoint's, a real image
    lives under the dataset), not PNG text chunks, not a size difference between real and generated images.
    Both get the evaluation's own resize (shorter side to ``size``, centre crop; default: the smaller of the
    two images' shorter sides)."""
    from PIL import Image

    from .extractors import prepare_image

    ims = []
    for p in (left, right):
        with Image.open(p) as im:
            ims.append(im.convert("RGB"))
    s = int(size or min(min(im.size) for im in ims))
    fresh = [Image.frombytes("RGB", (s, s), prepare_image(im, s).tobytes()) for im in ims]
    return fresh[0], fresh[1]
