"""caption_ops on a real CaptionStore: filters, search, word diff, token preview, badges, batches, conflicts
(and studio.render, which turns the diff, token preview and badges into escaped HTML)."""
from __future__ import annotations

import html
import re

import pytest

from bench.caption_latency import build_review_dataset
from medart_core import caption_ops as ops
from medart_core.backbone import count_tokens
from medart_core.errors import ConfigError, ConflictError, NotFoundError
from studio import render


@pytest.fixture
def ds(ws, store):
    """12 images in 3 classes with template-style drafts; a few edited/approved by two reviewers."""
    ids = build_review_dataset(ws, store, "mini", 12, labels=("polyps", "esophagitis", "normal-cecum"), size=8)
    cur = store.current(ids[0])
    store.edit(ids[0], "An endoscopic image of polyps with a REDDISH quux surface.", reviewer="ana",
               expected_version=cur.version)
    store.approve(ids[0], reviewer="ana", expected_version=store.current(ids[0]).version)
    store.edit(ids[1], "An endoscopic image of esophagitis, erosions 3 mm.", reviewer="ben",
               expected_version=store.current(ids[1]).version)
    store.set_status(ids[2], "rejected", reviewer="ben", expected_version=store.current(ids[2]).version)
    return ids


def _ids(states):
    return [s.image_id for s in states]


def test_filters_by_status_class_reviewer_edited(store, ds):
    assert _ids(ops.filter_states(store, "mini")) == ds
    assert _ids(ops.filter_states(store, "mini", ops.CaptionFilter(status="approved"))) == [ds[0]]
    assert _ids(ops.filter_states(store, "mini", ops.CaptionFilter(status="rejected"))) == [ds[2]]
    polyps = ops.filter_states(store, "mini", ops.CaptionFilter(label="polyps"))
    assert _ids(polyps) == ds[0::3] and {s.label for s in polyps} == {"polyps"}
    assert _ids(ops.filter_states(store, "mini", ops.CaptionFilter(reviewer="BEN"))) == [ds[1], ds[2]]
    assert _ids(ops.filter_states(store, "mini", ops.CaptionFilter(edited=True))) == [ds[0], ds[1]]
    unedited = ops.filter_states(store, "mini", ops.CaptionFilter(edited=False))
    assert _ids(unedited) == ds[2:]
    both = ops.CaptionFilter(label="esophagitis", edited=True, status="pending")
    assert _ids(ops.filter_states(store, "mini", both)) == [ds[1]]


def test_text_search_substring_and_regex(store, ds):
    hits = ops.filter_states(store, "mini", ops.CaptionFilter(search="reddish QUUX"))
    assert _ids(hits) == [ds[0]]                     # case-insensitive by default
    assert ops.filter_states(store, "mini", ops.CaptionFilter(search="reddish QUUX", case_sensitive=True)) == []
    rx = ops.filter_states(store, "mini", ops.CaptionFilter(search=r"\d+\s*mm", regex=True))
    assert _ids(rx) == [ds[1]]
    # a regex metacharacter in plain mode is literal text
    assert ops.filter_states(store, "mini", ops.CaptionFilter(search="3 mm.")) != []
    assert ops.filter_states(store, "mini", ops.CaptionFilter(search="3 mm.*", regex=False)) == []
    with pytest.raises(ConfigError, match="Invalid regular expression"):
        ops.filter_states(store, "mini", ops.CaptionFilter(search="(unclosed", regex=True))


def test_over_limit_filter_uses_t5_counts(store, ds, tiny_tok):
    long = "An endoscopic image of normal cecum " + "with folds and vessels " * 40
    store.edit(ds[5], long, reviewer="ana", expected_version=store.current(ds[5]).version)
    counter = ops.TokenCounter(tiny_tok)
    over = ops.filter_states(store, "mini", ops.CaptionFilter(over_limit=True), counter=counter)
    assert _ids(over) == [ds[5]]
    assert counter.count(long) == count_tokens(tiny_tok, long) > ops.MAX_TOKENS
    assert counter.count_many(["a", long, "a"]) == [count_tokens(tiny_tok, "a"), count_tokens(tiny_tok, long),
                                                    count_tokens(tiny_tok, "a")]
    with pytest.raises(ConfigError):
        ops.filter_states(store, "mini", ops.CaptionFilter(over_limit=True))


def test_word_diff_segments_and_escaped_html():
    before = "An image of polyps, red flat."
    after = "An image of polyps with red  raised <b>margin</b>."
    segs = ops.word_diff(before, after)
    assert "".join(t for t, tag in segs if tag != "-") == after
    assert [t.strip() for t, tag in segs if tag == "-"] == ["polyps,", "flat."]
    assert ("".join(t for t, tag in segs if tag != "+")).split() == before.split()
    out = render.word_diff_html(before, after)
    assert "<b>" not in out and "&lt;b&gt;margin&lt;/b&gt;" in out
    assert '<del class="cap-del">flat.</del>' in out and "<ins" in out
    assert ops.word_diff("same text", "same text") == [("same text", None)]
    assert ops.word_diff("", "new") == [("new", "+")]
    xss = render.word_diff_html("", "<script>alert(1)</script>")
    assert "<script>" not in xss and html.unescape(re.sub(r"<[^>]+>", "", xss)) == "<script>alert(1)</script>"


def test_token_preview_shows_the_truncated_tail(tiny_tok):
    short = "An endoscopic image of polyps."
    p = ops.token_preview(tiny_tok, short)
    assert (p.n_tokens, p.over, p.kept, p.cut) == (count_tokens(tiny_tok, short), False, short, "")
    long = "An endoscopic image of polyps " + " ".join(f"word{i}" for i in range(200))
    p = ops.token_preview(tiny_tok, long)
    assert p.over and p.n_tokens == count_tokens(tiny_tok, long)
    assert p.kept + p.cut == long and p.cut
    # what is kept is exactly what PixArt's truncation keeps: limit-1 content tokens plus </s>
    kept_ids = tiny_tok(p.kept, add_special_tokens=True)["input_ids"]
    trunc_ids = tiny_tok(long, add_special_tokens=True, truncation=True, max_length=ops.MAX_TOKENS)["input_ids"]
    assert kept_ids == trunc_ids
    html_out = render.token_counter_html(ops.token_preview(tiny_tok, long + " <img src=x onerror=alert(1)>"))
    assert "<img" not in html_out and "&lt;img" in html_out and "over" in html_out


def test_rule_badges_seed_length_parroting(ws, store, ds):
    rules = ops.review_rules(ws, store, "mini", "polyps")
    assert rules.seed == "An endoscopic image of polyps" and rules.features
    good = ops.rule_badges("An endoscopic image of polyps, reddish and oval.", seed=rules.seed, n_tokens=20,
                           features=rules.features, prompt=rules.prompt)
    assert [(b.name, b.ok) for b in good] == [("seed", True), ("length", True), ("parroting", True)]
    parrot = "An endoscopic image of polyps: specific colour, shape, surrounding mucosa, surface texture."
    bad = {b.name: b for b in ops.rule_badges(parrot, seed=rules.seed, n_tokens=130, features=rules.features,
                                              prompt=rules.prompt)}
    assert not bad["parroting"].ok and "feature list" in bad["parroting"].detail
    assert not bad["length"].ok and bad["length"].detail == "130/120 tokens"
    no_seed = ops.rule_badges("Polyps.", seed=rules.seed, n_tokens=3)
    assert not no_seed[0].ok
    out = render.badges_html([ops.Badge("seed", False, "does not start with '<x>'")])
    assert "<x>" not in out and "&lt;x&gt;" in out


def test_progress_by_class(store, ds):
    prog = {label: (a, t) for label, a, t in ops.progress_by_class(store, "mini")}
    assert prog == {"esophagitis": (0, 4), "normal-cecum": (0, 4), "polyps": (1, 4)}


def test_find_replace_preview_apply_undo(store, ds):
    states = ops.filter_states(store, "mini", ops.CaptionFilter(label="polyps"))
    before = {s.image_id: s.text for s in store.states("mini")}
    changes = ops.preview_find_replace(states, r"image of (\w+)", r"image of \1 (colon)", regex=True)
    assert {c.image_id for c in changes} == set(ds[0::3])
    assert all(c.after == re.sub(r"image of (\w+)", r"image of \1 (colon)", c.before) for c in changes)
    assert all(c.label == "polyps" and c.file_name.startswith("images/") for c in changes)
    # preview writes nothing
    assert {s.image_id: s.text for s in store.states("mini")} == before

    result = ops.apply_batch(store, changes, reviewer="ana")
    assert sorted(result.applied) == sorted(ds[0::3]) and not result.conflicts
    for c in changes:
        ev = store.history(c.image_id)[-1]
        assert (ev.kind, ev.batch_id, ev.reviewer, ev.text) == ("edit", result.batch_id, "ana", c.after)
    # untouched classes untouched
    assert all(store.current(i).text == before[i] for i in ds if i not in ds[0::3])

    report = ops.undo_batch(store, result.batch_id, reviewer="ana")
    assert sorted(report.reverted) == sorted(ds[0::3])
    assert {s.image_id: s.text for s in store.states("mini")} == before
    assert store.current(ds[0]).status == "approved"
    with pytest.raises(ConfigError):
        ops.undo_batch(store, "", reviewer="ana")
    with pytest.raises(NotFoundError):
        ops.undo_batch(store, "batch:nope", reviewer="ana")


def test_find_replace_literal_mode_and_bad_patterns(store, ds):
    states = ops.filter_states(store, "mini")
    changes = ops.preview_find_replace(states, "3 mm.", r"3\1 mm", regex=False)
    assert [c.after for c in changes] == [r"An endoscopic image of esophagitis, erosions 3\1 mm"]
    with pytest.raises(ConfigError, match="Invalid regular expression"):
        ops.preview_find_replace(states, "(", "x")
    with pytest.raises(ConfigError, match="Invalid replacement"):
        ops.preview_find_replace(states, "image", r"\2")
    with pytest.raises(ConfigError):
        ops.preview_find_replace(states, "", "x")


def test_batch_skips_images_changed_after_preview(store, ds):
    states = ops.filter_states(store, "mini", ops.CaptionFilter(label="esophagitis"))
    changes = ops.preview_affix(states, prefix="", suffix=" No bleeding.")
    assert len(changes) == 4 and all(c.after == c.before + " No bleeding." for c in changes)
    # a colleague edits one image between preview and apply
    theirs = "An endoscopic image of esophagitis, colleague's words."
    store.edit(ds[1], theirs, reviewer="ben", expected_version=store.current(ds[1]).version)
    result = ops.apply_batch(store, changes, reviewer="ana")
    assert [c.image_id for c in result.conflicts] == [ds[1]]
    assert store.current(ds[1]).text == theirs, "the colleague's edit must not be overwritten"
    assert len(result.applied) == 3 and "skipped" in result.summary()
    with pytest.raises(ConfigError):
        ops.apply_batch(store, changes, reviewer="")
    with pytest.raises(ConfigError):
        ops.preview_affix(states)


def test_redraft_with_template_replaces_edits_and_keeps_provenance(store, ds):
    states = ops.filter_states(store, "mini", ops.CaptionFilter(edited=True))
    changes = ops.preview_redraft(store, "mini", states, "template")
    assert {c.image_id: c.after for c in changes} == {ds[0]: "An endoscopic image of polyps",
                                                      ds[1]: "An endoscopic image of esophagitis"}
    result = ops.apply_batch(store, changes, reviewer="ana")
    assert sorted(result.applied) == sorted([ds[0], ds[1]])
    for i in (ds[0], ds[1]):
        hist = store.history(i)
        assert [e.kind for e in hist[-2:]] == ["draft", "edit"]
        assert hist[-2].source == "template" and {e.batch_id for e in hist[-2:]} == {result.batch_id}
    ops.undo_batch(store, result.batch_id, reviewer="ana")
    assert store.current(ds[0]).text.startswith("An endoscopic image of polyps with a REDDISH")
    with pytest.raises(ConfigError, match="cannot run"):
        ops.preview_redraft(store, "mini", states, "vlm")


def test_stale_edit_is_a_conflict_with_both_texts(store, ds):
    loaded = store.current(ds[3])
    store.edit(ds[3], "theirs", reviewer="ben", expected_version=loaded.version)
    with pytest.raises(ConflictError) as e:
        store.edit(ds[3], "mine", reviewer="ana", expected_version=loaded.version)
    assert e.value.current_text == "theirs" and e.value.expected == loaded.version
    assert store.current(ds[3]).text == "theirs"
