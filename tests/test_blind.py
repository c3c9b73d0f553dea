"""Blind review: hidden order fixed per study, one final vote per reviewer and pair, append-only votes,
win rates with intervals, and how often synthetic images were taken for real."""
from __future__ import annotations

import sqlite3

import pytest
from PIL import Image

from medart_core.blind import ReviewStore
from medart_core.errors import ConfigError, NotFoundError


def _imgs(tmp_path, tag, n):
    out = []
    for i in range(n):
        p = tmp_path / f"{tag}{i}.png"
        Image.new("RGB", (8, 8), (i * 20, 0, 0) if tag == "real" else (0, i * 20, 0)).save(p)
        out.append(str(p))
    return out


def test_votes_resolve_hidden_order_and_give_win_rates(ws, tmp_path):
    rs = ReviewStore.for_workspace(ws)
    real, synth = _imgs(tmp_path, "real", 10), _imgs(tmp_path, "syn", 10)
    rs.create_study("rvs", "real-vs-synthetic", "real", "run@30", real, synth, seed=1)
    seen_left_real = picked_synth = 0
    for _ in range(10):
        p = rs.next_pair("rvs", "dr a")
        assert p is not None and {p.left, p.right} == {real[p.position], synth[p.position]}
        seen_left_real += p.left in real
        # The first 3 pairs: pick the synthetic image; the rest: pick the real one.
        want_synth = p.position < 3
        choice = ("left" if p.left in synth else "right") if want_synth else ("left" if p.left in real else "right")
        picked_synth += want_synth
        rs.vote("rvs", p.pair_id, "dr a", choice, tag="blurry" if p.position == 0 else None)
    assert 0 < seen_left_real < 10, "the hidden order is mixed"
    assert rs.next_pair("rvs", "dr a") is None and rs.next_pair("rvs", "dr b").position == 0
    res = rs.results("rvs")
    assert res["preferences"] == 10 and res["reviewers"] == ["dr a"]
    fooled = res["synthetic_taken_for_real"]
    assert fooled["count"] == picked_synth == 3 and fooled["ci"][0] <= fooled["rate"] == 0.3 <= fooled["ci"][1]
    assert (res["rows"][0]["wins"], res["rows"][1]["wins"]) == (7, 3)
    assert res["artefact_tags"]["real"] == {"blurry": 1}, "the tag flags the image that was not preferred"
    with pytest.raises(ConfigError, match="already voted"):
        rs.vote("rvs", p.pair_id, "dr a", "left")
    con = sqlite3.connect(ws.root / "reviews.sqlite")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        con.execute("DELETE FROM votes")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        con.execute("UPDATE votes SET picked_source = 'a'")


def test_bad_input_is_refused_without_writing(ws, tmp_path):
    rs = ReviewStore.for_workspace(ws)
    a, b = _imgs(tmp_path, "real", 2), _imgs(tmp_path, "syn", 2)
    with pytest.raises(ConfigError, match="pairs image i"):
        rs.create_study("s", "checkpoints", "x", "y", a, b[:1])
    with pytest.raises(NotFoundError):
        rs.create_study("s", "checkpoints", "x", "y", a, [b[0], str(tmp_path / "missing.png")])
    rs.create_study("s", "checkpoints", "x", "y", a, b)
    with pytest.raises(ConfigError, match="exists already"):
        rs.create_study("s", "checkpoints", "x", "y", a, b)
    p = rs.next_pair("s", "r")
    with pytest.raises(ConfigError, match="Enter your name"):
        rs.vote("s", p.pair_id, " ", "left")
    with pytest.raises(ConfigError, match="at most 40"):
        rs.vote("s", p.pair_id, "r", None, tag="x" * 41)
    with pytest.raises(ConfigError, match="Pick the more realistic"):
        rs.vote("s", p.pair_id, "r", None)
    assert rs.results("s")["votes"] == 0
    rs.vote("s", p.pair_id, "r", None, tag="<script>x</script>")
    assert rs.results("s")["artefact_tags"]["x"] == {"<script>x</script>": 1}
