"""The review rules without any UI: medart_core.review.ReviewSession on a real CaptionStore."""
from __future__ import annotations

import pytest

from bench.caption_latency import build_review_dataset
from medart_core.caption_ops import CaptionFilter
from medart_core.errors import ConfigError, MedArtError
from medart_core.review import ReviewContext, ReviewError, ReviewSession


@pytest.fixture
def env(ws, store):
    ids = build_review_dataset(ws, store, "mini", 6, labels=("polyps", "esophagitis"), size=8)
    rc = ReviewContext(ws, store, "tiny")
    s = ReviewSession()
    view = s.open(rc, "mini")
    return rc, s, view, ids


def test_open_shows_the_first_image_as_plain_data(env):
    rc, s, view, ids = env
    assert view.redraw and view.labels == ["esophagitis", "polyps"]
    img = view.image
    assert (img.caption.image_id, img.position, img.total) == (ids[0], 1, 6)
    assert img.key == s.editor_key == f"{ids[0]}:{rc.store.current(ids[0]).version}"
    assert img.live.diff == [(img.caption.text, None)]          # the draft itself: nothing changed
    assert [b.name for b in img.live.badges] == ["seed", "length", "parroting"]
    assert view.progress == [("esophagitis", 0, 3), ("polyps", 0, 3)]
    assert "image(s) match" in view.notice.text and not view.notice.warn


def test_moving_saves_first_and_a_missing_name_refuses_with_nothing_written(env):
    rc, s, view, ids = env
    with pytest.raises(ReviewError, match="Enter your name"):
        s.move(rc, "typed, then moved", s.editor_key, None, +1)
    assert s.image_id == ids[0] and len(rc.store.history(ids[0])) == 1
    v = s.move(rc, "typed, then moved", s.editor_key, "ana", +1)
    assert s.image_id == ids[1] and v.notice.text.startswith("Saved your edit before moving.")
    assert rc.store.current(ids[0]).text == "typed, then moved"
    v = s.move(rc, s.loaded_text, s.editor_key, None, -5)       # past the start: stay, and say so
    assert s.index == 1 and "first image" in v.notice.text
    v = s.go_to(rc, -5, s.loaded_text, s.editor_key, None)       # a jump clamps to the list instead
    assert s.index == 0 and v.notice.text == "" and len(rc.store.history(ids[1])) == 1


def test_stale_key_redraws_the_current_image_and_writes_nothing(env):
    rc, s, view, ids = env
    old_key = s.editor_key
    s.set_status_and_next(rc, "approved", s.loaded_text, old_key, "ana")
    v = s.set_status_and_next(rc, "approved", "text of the previous image", old_key, "ana")
    assert v.redraw and v.notice.warn and "out of date" in v.notice.text
    assert rc.store.current(ids[1]).status == "pending" and len(rc.store.history(ids[1])) == 1


def test_conflict_then_keep_mine_and_comment_rebasing(env):
    rc, s, view, ids = env
    other = ReviewSession()
    other.open(rc, "mini")
    other.save(rc, "theirs", other.editor_key, "ben")
    v = s.save(rc, "mine", s.editor_key, "ana")
    assert not v.redraw and v.conflict.theirs == "theirs" and v.conflict.mine == "mine" and v.notice.warn
    assert rc.store.current(ids[0]).text == "theirs"
    v = s.keep_mine(rc, "mine", "ana")
    assert v.redraw and v.conflict is None and rc.store.current(ids[0]).text == "mine"
    # my own comment re-bases the editor; someone else's edit in between does not
    v = s.add_comment(rc, "check margin", "ana")
    assert v.clear_comment and v.key == s.editor_key and v.history[-1].kind == "comment"
    assert "Saved" in s.save(rc, "mine, v2", s.editor_key, "ana").notice.text
    other.show(rc)
    other.save(rc, "ben again", other.editor_key, "ben")
    s.add_comment(rc, "and again", "ana")
    assert s.save(rc, "mine, v3", s.editor_key, "ana").conflict is not None


def test_next_pending_and_refusals(env):
    rc, s, view, ids = env
    for _ in range(2):
        s.set_status_and_next(rc, "rejected", s.loaded_text, s.editor_key, "ana")
    s.index = len(ids) - 1
    s.show(rc)
    v = s.next_pending(rc, s.loaded_text, s.editor_key, None)
    assert s.image_id == ids[2] and "Wrapped" in v.notice.text
    with pytest.raises(ReviewError, match="Type a comment"):
        s.add_comment(rc, "  ", "ana")
    with pytest.raises(ReviewError, match="Pick a version"):
        s.restore(rc, None, "ana")
    with pytest.raises(ConfigError, match="Invalid regular expression"):
        s.apply_filters(rc, "mini", CaptionFilter(search="([", regex=True))
    assert s.image_id == ids[2] and len(s.ids) == 6, "a refused filter leaves the session as it was"


def test_batch_preview_error_drops_the_remembered_batch(env):
    rc, s, view, ids = env
    prev = s.batch_preview(rc, "prepend / append", "", "", False, "", " Sessile.", "template")
    assert len(prev.rows) == 6 and len(s.pending_batch) == 6
    with pytest.raises(MedArtError):
        s.batch_preview(rc, "find / replace", "(", "x", True, "", "", "template")
    assert s.pending_batch == []
    with pytest.raises(ReviewError, match="Preview a batch first"):
        s.batch_apply(rc, "ana")
    s.batch_preview(rc, "prepend / append", "", "", False, "", " Sessile.", "template")
    done = s.batch_apply(rc, "ana")
    assert done.batch_id == s.last_batch and done.rows == [] and done.review.image.caption.text.endswith(" Sessile.")
    undone = s.batch_undo(rc, "", "ana")
    assert "Undid batch" in undone.notice.text and not rc.store.current(ids[0]).text.endswith(" Sessile.")


def test_review_context_caches_per_context(ws, store):
    build_review_dataset(ws, store, "mini", 2, labels=("polyps",), size=8)
    a, b = ReviewContext(ws, store, "tiny"), ReviewContext(ws, store, None)
    assert a.tokenizer() is a.tokenizer() and a.counter() is a.counter()
    assert b.backbone_spec == "tiny" and b.tokenizer() is not a.tokenizer()
    rules = a.rules("mini", "polyps")
    assert rules.seed == "An endoscopic image of polyps" and a.rules("mini", "polyps") is rules
