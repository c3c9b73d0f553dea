"""The Captions tab: its handlers called directly (as the bench does), then through gradio_client against a
live server (two clients = two clinicians), including the conflict panel and XSS-safe rendering."""
from __future__ import annotations

import html
import socket
from pathlib import Path

import pytest

from bench.caption_latency import build_review_dataset

XSS = "<script>alert(1)</script> An endoscopic image of <b>polyps</b> ${value} & <img src=x onerror=alert(2)>"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ctx(ws, store):
    from studio.context import StudioContext

    return StudioContext(ws=ws, store=store, backbone_spec="tiny")


@pytest.fixture
def tab_env(ws, store):
    from studio import caption_tab as tab

    ids = build_review_dataset(ws, store, "mini", 8, labels=("polyps", "esophagitis"), size=8)
    ctx = _ctx(ws, store)
    state = tab.CaptionSession()
    view = tab.open_dataset(ctx, state, "mini")
    return tab, ctx, state, view, ids


def _editor(view) -> str:
    return view["editor"].value


# ------------------------------------------------------------------------------------------------
# handlers, called directly
# ------------------------------------------------------------------------------------------------
def test_open_and_navigate(tab_env, ws):
    tab, ctx, state, view, ids = tab_env
    assert state.ids == ids and state.image_id == ids[0]
    assert "<b>1</b> / 8 in filter" in view["position"]
    assert Path(view["image"]) == ws.image_path("mini", ctx.store.get_image(ids[0]).file_name)
    assert view["key"] == f"{ids[0]}:{ctx.store.current(ids[0]).version}"
    assert "Approved 0/8" in view["progress"]
    text = _editor(view)
    view = tab.go_next(ctx, state, text, view["key"], None)       # unchanged text: no reviewer needed
    assert state.image_id == ids[1]
    view = tab.go_prev(ctx, state, _editor(view), view["key"], None)
    view = tab.go_prev(ctx, state, _editor(view), view["key"], None)
    assert state.index == 0 and "first image" in view["notice"]
    view = tab.go_to(ctx, state, 5, _editor(view), view["key"], None)
    assert state.image_id == ids[4]
    assert len(ctx.store.history(ids[0])) == 1, "navigation alone writes nothing"


def test_save_needs_a_reviewer_and_writes_nothing_without(tab_env):
    tab, ctx, state, view, ids = tab_env
    out = tab.save(ctx, state, "An endoscopic image of polyps, edited.", view["key"], None)
    assert "Enter your name" in out["notice"] and "cap-notice-warn" in out["notice"]
    assert len(ctx.store.history(ids[0])) == 1
    out = tab.go_next(ctx, state, "An endoscopic image of polyps, edited.", view["key"], "")
    assert "Enter your name" in out["notice"] and state.image_id == ids[0], "unsaved text blocks moving on"
    out = tab.approve_next(ctx, state, _editor(view), view["key"], None)
    assert "Enter your name" in out["notice"] and ctx.store.current(ids[0]).status == "pending"
    out = tab.save(ctx, state, "An endoscopic image of polyps, edited.", view["key"], "dr ana")
    assert "Saved" in out["notice"]
    ev = ctx.store.history(ids[0])[-1]
    assert (ev.kind, ev.reviewer, ev.text) == ("edit", "dr ana", "An endoscopic image of polyps, edited.")
    assert out["key"] == f"{ids[0]}:{ev.id}"


def test_moving_on_saves_unsaved_edits_and_approve_saves_then_approves(tab_env):
    tab, ctx, state, view, ids = tab_env
    out = tab.go_next(ctx, state, "An endoscopic image of polyps, typed then moved.", view["key"], "ana")
    assert "Saved your edit" in out["notice"] and state.image_id == ids[1]
    assert ctx.store.current(ids[0]).text == "An endoscopic image of polyps, typed then moved."
    out = tab.approve_next(ctx, state, "An endoscopic image of esophagitis, approved text.", out["key"], "ana")
    cur = ctx.store.current(ids[1])
    assert (cur.text, cur.status, cur.reviewer) == ("An endoscopic image of esophagitis, approved text.",
                                                    "approved", "ana")
    assert [e.kind for e in ctx.store.history(ids[1])] == ["draft", "edit", "status"]
    assert state.image_id == ids[2] and "Approved 1/8" in out["progress"]
    out = tab.reject_next(ctx, state, _editor(out), out["key"], "ana")
    out = tab.second_read_next(ctx, state, _editor(out), out["key"], "ana")
    assert [ctx.store.current(i).status for i in ids[:4]] == ["pending", "approved", "rejected",
                                                              "needs-second-read"]
    # next pending skips the decided ones, wrapping round
    out = tab.go_next_pending(ctx, state, _editor(out), out["key"], "ana")
    assert state.image_id == ids[5]
    state.index = len(ids) - 1
    out = tab.render(ctx, state)
    out = tab.go_next_pending(ctx, state, _editor(out), out["key"], "ana")
    assert state.image_id == ids[0] and "Wrapped" in out["notice"]


def test_stale_editor_key_never_writes_onto_another_image(tab_env):
    tab, ctx, state, view, ids = tab_env
    old_key = view["key"]
    out = tab.approve_next(ctx, state, _editor(view), old_key, "ana")
    assert state.image_id == ids[1]
    # a second, queued Alt+A still carries image 1's text and key
    out = tab.approve_next(ctx, state, "text typed on image 1", old_key, "ana")
    assert "out of date" in out["notice"]
    assert ctx.store.current(ids[1]).status == "pending" and len(ctx.store.history(ids[1])) == 1


def test_conflict_panel_keep_mine_and_take_theirs(tab_env):
    tab, ctx, state, view, ids = tab_env
    other = tab.CaptionSession()                      # a second clinician on the same image
    other_view = tab.open_dataset(ctx, other, "mini")
    tab.save(ctx, other, "An endoscopic image of polyps, THEIR words.", other_view["key"], "ben")

    out = tab.save(ctx, state, "An endoscopic image of polyps, MY words.", view["key"], "ana")
    assert out["conflict"].visible is True
    assert out["theirs"] == "An endoscopic image of polyps, THEIR words."
    assert out["mine"] == "An endoscopic image of polyps, MY words."
    assert ctx.store.current(ids[0]).text == "An endoscopic image of polyps, THEIR words.", "nothing overwritten"
    # moving on with the unsaved text also stops at the conflict
    out2 = tab.go_next(ctx, state, "An endoscopic image of polyps, MY words.", view["key"], "ana")
    assert out2["conflict"].visible is True and state.image_id == ids[0]

    out = tab.keep_mine(ctx, state, "An endoscopic image of polyps, MY words.", "ana")
    assert out["conflict"].visible is False and "Kept your text" in out["notice"]
    hist = ctx.store.history(ids[0])
    assert [(e.kind, e.reviewer, e.text) for e in hist[-2:]] == [
        ("edit", "ben", "An endoscopic image of polyps, THEIR words."),
        ("edit", "ana", "An endoscopic image of polyps, MY words.")]

    # the other way round: ben is now stale and takes ana's text
    out = tab.save(ctx, other, "ben again", other.editor_key, "ben")
    assert out["conflict"].visible is True
    out = tab.take_theirs(ctx, other)
    assert _editor(out) == "An endoscopic image of polyps, MY words." and out["conflict"].visible is False
    assert ctx.store.current(ids[0]).text == "An endoscopic image of polyps, MY words."


def test_comment_restore_and_history(tab_env):
    tab, ctx, state, view, ids = tab_env
    draft = _editor(view)
    out = tab.save(ctx, state, "An endoscopic image of polyps, v2.", view["key"], "ana")
    # a comment by me does not make my next save a conflict
    out = tab.add_comment(ctx, state, "check the <margin>", "ana")
    assert out["comment"] == "" and "Comment added" in out["notice"]
    assert [r[2] for r in out["history"]][:2] == ["comment", "edit"]      # newest first
    out = tab.save(ctx, state, "An endoscopic image of polyps, v3.", state.editor_key, "ana")
    assert "Saved" in out["notice"]
    draft_ev = ctx.store.history(ids[0])[0]
    assert draft_ev.id in [v for _, v in out["restore"].choices]
    out = tab.restore_event(ctx, state, draft_ev.id, "ana")
    assert _editor(out) == draft and ctx.store.history(ids[0])[-1].kind == "restore"
    out = tab.restore_event(ctx, state, None, "ana")
    assert "Pick a version" in out["notice"]


def test_filters_invalid_regex_warns_and_keeps_position(tab_env):
    tab, ctx, state, view, ids = tab_env
    tab.go_next(ctx, state, _editor(view), view["key"], None)
    out = tab.apply_filters(ctx, state, "mini", tab.filters_from_ui(None, None, None, "any", False, "([", True))
    assert "Invalid regular expression" in out["notice"] and state.image_id == ids[1] and len(state.ids) == 8
    flt = tab.filters_from_ui("esophagitis", "(any)", "", "any", False, "", False)
    out = tab.apply_filters(ctx, state, "mini", flt)
    assert state.ids == ids[1::2]
    out = tab.apply_filters(ctx, state, "mini", tab.filters_from_ui(None, "approved", "", "any", False, "", False))
    assert state.ids == [] and out["image"] is None and "No image matches" in out["position"]
    out = tab.save(ctx, state, "x", "", "ana")
    assert "nothing to save" in out["notice"]


def test_batch_preview_apply_undo_via_handlers(tab_env):
    tab, ctx, state, view, ids = tab_env
    tab.apply_filters(ctx, state, "mini", tab.filters_from_ui("polyps", None, "", "any", False, "", False))
    out = tab.batch_apply(ctx, state, "ana")
    assert "Preview a batch first" in out["batch_notice"]
    prev = tab.batch_preview(ctx, state, "prepend / append", "", "", False, "", " Sessile.", "template")
    assert "4 of 4" in prev["batch_notice"] and len(prev["batch_table"]) == 4
    row = prev["batch_table"][0]
    assert row[0] == ids[0] and row[4] == row[3] + " Sessile."
    out = tab.batch_apply(ctx, state, None)
    assert "Enter your name" in out["batch_notice"] and not ctx.store.current(ids[0]).text.endswith("Sessile.")
    out = tab.batch_apply(ctx, state, "ana")
    bid = out["batch_id"]
    assert all(ctx.store.current(i).text.endswith(" Sessile.") for i in ids[0::2])
    assert _editor(out).endswith(" Sessile.")                           # the editor shows the new text
    assert {ctx.store.history(i)[-1].batch_id for i in ids[0::2]} == {bid}
    out = tab.batch_undo(ctx, state, "", "ana")                          # empty box: the last batch
    assert "Undid batch" in out["batch_notice"]
    assert not any(ctx.store.current(i).text.endswith(" Sessile.") for i in ids)
    bad = tab.batch_preview(ctx, state, "find / replace", "(", "x", True, "", "", "template")
    assert "Invalid regular expression" in bad["batch_notice"] and bad["batch_table"] == []


def test_events_take_forms_as_named_dicts_and_bind_keeps_what_gradio_injects(tab_env):
    import inspect

    import gradio as gr
    from gradio import utils

    from studio import caption_batch, caption_review
    from studio.caption_view import VIEW
    from studio.forms import bind

    tab, ctx, state, view, ids = tab_env
    filters = {"label": "esophagitis", "status": "(any)", "reviewer": "", "edited": "any", "over_limit": False,
               "search": "", "regex": False}
    out = dict(zip(VIEW, caption_review.on_filters(ctx, state, "mini", filters)))
    assert "4 image(s) match" in out["notice"] and state.ids == ids[1::2]
    # what Gradio sees: no ctx, one positional input per form field, the request still annotated for injection
    handler = bind(ctx, caption_review.on_filters, filters=list(filters))
    assert list(inspect.signature(handler).parameters) == ["st", "ds", *filters]
    out = dict(zip(VIEW, handler(state, "mini", "polyps", "(any)", "", "any", False, "", False)))
    assert "4 image(s) match" in out["notice"] and state.ids == ids[0::2]
    save = bind(ctx, caption_review.on_save)
    assert list(inspect.signature(save).parameters) == ["st", "text", "editor_key", "reviewer_name", "request"]
    assert utils.get_type_hints(save)["request"] is gr.Request
    out = dict(zip(VIEW, save(state, "An endoscopic image of polyps, bound.", out["key"], "", gr.Request(
        username="alice"))))
    assert "Saved" in out["notice"] and ctx.store.history(ids[0])[-1].reviewer == "alice"
    batch = {"op": "prepend / append", "find": "", "replace": "", "regex": False, "prefix": "", "suffix": " Flat.",
             "drafter": "template"}
    _state, table, note = caption_batch.on_preview(ctx, state, batch)
    assert "4 of 4" in note and len(table) == 4
    with pytest.raises(ValueError):
        bind(ctx, caption_review.on_filters, filters=["st"])            # a field may not shadow a parameter
    assert bind(ctx, caption_batch.on_export_csv).__medart_role__ == "admin"   # @requires survives bind


def test_export_both_formats_counts_and_path(tab_env, ws):
    tab, ctx, state, view, ids = tab_env
    msg = tab.export(ctx, state, "imagefolder")
    assert "no images with status" in msg                                 # nothing approved yet
    out = tab.approve_next(ctx, state, _editor(view), view["key"], "ana")
    tab.approve_next(ctx, state, _editor(out), out["key"], "ana")
    for fmt in ("imagefolder", "medart-csv"):
        msg = tab.export(ctx, state, fmt)
        assert "2 image(s) exported" in msg, msg
        folder = [p for p in ws.exports_dir.iterdir() if p.name.startswith(f"mini-{fmt}-")]
        assert len(folder) == 1 and html.escape(str(folder[0])) in msg


def test_rendering_escapes_caption_and_reviewer(tab_env):
    tab, ctx, state, view, ids = tab_env
    out = tab.save(ctx, state, XSS, view["key"], "dr <i>x</i>")
    assert _editor(out) == XSS                                # textbox: the raw text, shown as text
    for k in ("position", "diff", "tokens", "badges", "notice", "progress"):
        assert "<script" not in out[k] and "<img" not in out[k] and "<i>x" not in out[k], k
    assert "&lt;script&gt;" in out["diff"] and "dr &lt;i&gt;x&lt;/i&gt;" in out["position"]
    assert out["history"][0][5] == XSS                        # Dataframe "str" cells render as text
    live = tab.live_edit(ctx, state, XSS + " more")
    assert "<script" not in live["diff"] and "&lt;img" in live["diff"]


# ------------------------------------------------------------------------------------------------
# through gradio_client against a live server
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live(tmp_path_factory):
    import gradio as gr

    from medart_core.captions import CaptionStore
    from medart_core.workspace import Workspace
    from studio.caption_tab import build_caption_tab

    ws = Workspace.open(tmp_path_factory.mktemp("live") / "ws")
    store = CaptionStore.for_workspace(ws)
    ids = build_review_dataset(ws, store, "live", 6, labels=("polyps", "esophagitis"), size=8)
    store.edit(ids[2], XSS, reviewer="seed", expected_version=store.current(ids[2]).version)
    ctx = _ctx(ws, store)
    with gr.Blocks() as demo:
        with gr.Tab("Captions"):
            build_caption_tab(ctx)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True,
                            quiet=True)
    yield url, store, ids
    demo.close()
    store.close()


def _client(url):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=False)


# Outputs of a full view, as the API returns them (neither the gr.State nor the conflict gr.Group, a
# layout block, is part of the API).
API_VIEW = ["notice", "position", "image", "editor", "key", "draft", "diff", "tokens", "badges", "history",
            "restore", "progress", "theirs", "mine"]


def _view(result) -> dict:
    out = dict(zip(API_VIEW, result))
    ed = out["editor"]
    out["text"] = ed.get("value") if isinstance(ed, dict) else ed
    return out


def test_api_review_flow_and_conflict_between_two_clinicians(live):
    url, store, ids = live
    ana, ben = _client(url), _client(url)
    names = {e for e in ana.view_api(return_format="dict", print_info=False)["named_endpoints"]}
    assert {"/caption_next", "/caption_save", "/caption_approve_next", "/caption_filter", "/caption_keep_mine",
            "/caption_batch_preview", "/caption_batch_apply", "/caption_batch_undo",
            "/caption_export_csv"} <= names

    a = _view(ana.predict("live", api_name="/caption_open_dataset")[:14])
    b = _view(ben.predict("live", api_name="/caption_open_dataset")[:14])
    assert a["key"] == b["key"] == f"{ids[0]}:{store.current(ids[0]).version}"

    # no reviewer: warned, nothing written
    r = _view(ana.predict("edited by nobody", a["key"], "", api_name="/caption_save"))
    assert "Enter your name" in r["notice"] and len(store.history(ids[0])) == 1

    # ben saves first, ana's save on the old version opens the conflict panel
    r = _view(ben.predict("An endoscopic image of polyps, ben.", b["key"], "ben", api_name="/caption_save"))
    assert "Saved" in r["notice"]
    r = _view(ana.predict("An endoscopic image of polyps, ana.", a["key"], "ana", api_name="/caption_save"))
    assert "Someone else changed this caption" in r["notice"]
    assert r["theirs"] == "An endoscopic image of polyps, ben." and r["mine"] == "An endoscopic image of polyps, ana."
    assert store.current(ids[0]).text == "An endoscopic image of polyps, ben."
    r = _view(ana.predict("An endoscopic image of polyps, ana.", "ana", api_name="/caption_keep_mine"))
    assert store.current(ids[0]).text == "An endoscopic image of polyps, ana."
    assert [e.reviewer for e in store.history(ids[0])[-2:]] == ["ben", "ana"]

    # approve & next, then the XSS caption comes back as plain text / escaped HTML
    r = _view(ana.predict(r["text"], r["key"], "ana", api_name="/caption_approve_next"))
    assert store.current(ids[0]).status == "approved" and f"image #{ids[1]}" in r["position"]
    r = _view(ana.predict(r["text"], r["key"], "ana", api_name="/caption_next"))
    assert r["text"] == XSS
    for k in ("position", "diff", "tokens", "badges"):
        assert "<script" not in r[k] and "<img" not in r[k]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in r["diff"]
    assert any(XSS in row for row in r["history"]["data"])

    # live token counter endpoint
    _diff, tokens, _badges = ana.predict("An endoscopic image of polyps " + "word " * 150, api_name="/caption_live")
    assert "cap-tok-over" in tokens and "never sees" in tokens

    # invalid regex filter: a warning, not a crash; the list is unchanged
    r = _view(ana.predict("live", "(any)", "(any)", "", "any", False, "([", True, api_name="/caption_filter"))
    assert "Invalid regular expression" in r["notice"]
    r = _view(ana.predict("live", "esophagitis", "(any)", "", "any", False, "", False, api_name="/caption_filter"))
    assert "3 image(s) match" in r["notice"]

    # batch on the filtered set (esophagitis only), undone as one unit
    table, note = ana.predict("find / replace", "esophagitis", "oesophagitis", False, "", "", "template",
                              api_name="/caption_batch_preview")
    assert "3 of 3" in note and len(table["data"]) == 3
    res = ana.predict("ana", api_name="/caption_batch_apply")
    batch_id = res[-1]
    assert all(store.current(i).text.startswith("An endoscopic image of oesophagitis") for i in ids[1::2])
    assert {store.history(i)[-1].batch_id for i in ids[1::2]} == {batch_id}
    ana.predict(batch_id, "ana", api_name="/caption_batch_undo")
    assert not any("oesophagitis" in store.current(i).text for i in ids)

    msg = ana.predict(api_name="/caption_export_csv")
    assert "1 image(s) exported (medart-csv)" in msg


def test_reviewer_is_the_logged_in_user_when_auth_is_on(tab_env):
    import gradio as gr

    tab, ctx, state, view, ids = tab_env
    alice = gr.Request(username="alice")
    assert tab.resolve_reviewer(ctx, alice, "typed bob") == "alice"
    assert tab.resolve_reviewer(ctx, gr.Request(), "  bob ") == "bob"
    assert tab.resolve_reviewer(ctx, None, "   ") is None
    out = tab.save(ctx, state, "An endoscopic image of polyps, by alice.", view["key"],
                   tab.resolve_reviewer(ctx, alice, "bob"))
    assert "Saved" in out["notice"] and ctx.store.history(ids[0])[-1].reviewer == "alice"


def test_user_errors_is_one_convention_for_every_tab():
    import gradio as gr

    from medart_core.errors import ConfigError
    from studio.errors import user_errors

    @user_errors
    def modal(x):
        raise ConfigError("fix it like this")

    with pytest.raises(gr.Error) as e:
        modal(1)
    assert "fix it like this" in str(e.value)

    @user_errors(keep=lambda message, x: ("page kept", message, x))
    def inline(x):
        raise ConfigError("fix it like this")

    assert inline(2) == ("page kept", "fix it like this", 2)

    @user_errors
    def bug():
        raise ValueError("a bug keeps its traceback")

    with pytest.raises(ValueError):
        bug()


def test_typed_reviewer_name_is_trimmed_to_the_store_limit(tab_env):
    from medart_core.constants import MAX_REVIEWER_CHARS

    tab, ctx, state, view, ids = tab_env
    name = tab.resolve_reviewer(ctx, None, "  " + "r" * 100)
    assert name == "r" * MAX_REVIEWER_CHARS
    out = tab.save(ctx, state, "An endoscopic image of polyps, long name.", view["key"], name)
    assert "Saved" in out["notice"] and ctx.store.history(ids[0])[-1].reviewer == name
