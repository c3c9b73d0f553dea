"""The Captions tab's view: the review session's answers (``medart_core.review`` view data) rendered as
Gradio updates, by output name.

Every handler of the tab returns ``{output name: value}``; :data:`VIEW` names the outputs of a full view
refresh in the order the wiring hands them to Gradio. What a handler returns when the library refuses an
action (the page kept, the message in the inline notice) lives here too, beside :func:`resolve_reviewer`
(who is at the keyboard).

Caption text is data, never markup: HTML pieces are escaped (``studio.render``).
"""
# No ``from __future__ import annotations``: Gradio inspects the real ``gr.Request`` annotations.
from typing import Any

import gradio as gr

from medart_core.constants import MAX_REVIEWER_CHARS
from medart_core.review import BatchView, ImageView, LiveView, Notice, ReviewSession, ReviewView

from .errors import user_errors, warn
from .render import badges_html, esc, notice_html, progress_html, token_counter_html, word_diff_segments_html

ANY = "(any)"

# Per-browser-session state: the library's review session (plain values, so gr.State can copy it).
CaptionSession = ReviewSession

# Names of the outputs of a full view refresh, in the order the wiring passes them to Gradio.
VIEW = ["state", "notice", "position", "image", "editor", "key", "draft", "diff", "tokens", "badges",
        "history", "restore", "progress", "conflict", "theirs", "mine"]
LIVE = ["diff", "tokens", "badges"]


# ------------------------------------------------------------------------------------------------
# Who is reviewing
# ------------------------------------------------------------------------------------------------
def resolve_reviewer(ctx, request: gr.Request | None, typed: str | None) -> str | None:
    """The logged-in user when the studio runs with auth, else the name typed into the reviewer box."""
    typed = (typed or "").strip()[:MAX_REVIEWER_CHARS] or None
    fn = getattr(ctx, "reviewer_for", None)
    if callable(fn):
        return fn(request, typed) or None
    auth = getattr(ctx, "auth_user", None)
    if callable(auth) and request is not None:
        user = auth(request)
        if user:
            return user
    return typed


# ------------------------------------------------------------------------------------------------
# Rendering the review session's view data as Gradio updates
# ------------------------------------------------------------------------------------------------
def _notice(n: Notice) -> str:
    """The notice line; a warning also pops up as a toast (inside an event)."""
    if n.warn:
        warn(n.text)
    return notice_html(n.text, "warn" if n.warn else "ok")


def _keep(state: CaptionSession, notice: str) -> dict:
    """Leave the page as it is (only the notice changes)."""
    out: dict = {k: gr.skip() for k in VIEW}
    out["state"], out["notice"] = state, notice
    return out


def _live_updates(live: LiveView) -> dict:
    if live.diff is None:
        diff = '<div class="cap-diff"><i>No machine draft for this image.</i></div>'
    else:
        diff = f'<div class="cap-diff">{word_diff_segments_html(live.diff)}</div>'
    return {"diff": diff, "tokens": token_counter_html(live.tokens), "badges": badges_html(live.badges)}


def _history_rows(history: list) -> list[list[Any]]:
    rows = []
    for ev in reversed(history):   # newest first: what changed last is what a reviewer looks for
        rows.append([ev.id, (ev.created_at or "")[:19].replace("T", " "), ev.kind, ev.reviewer or "",
                     ev.status or "", ev.text or "", ev.source or "", ev.note or "", ev.batch_id or ""])
    return rows


def _restore_choices(history: list, current_event: int) -> list[tuple[str, int]]:
    out = []
    for ev in reversed(history):
        if ev.kind in ("draft", "edit", "restore") and ev.id != current_event:
            snippet = (ev.text or "").replace("\n", " ")
            snippet = snippet[:70] + ("…" if len(snippet) > 70 else "")
            out.append((f"#{ev.id} {ev.kind} {ev.reviewer or ev.source or ''} — {snippet}", ev.id))
    return out


def _position_html(img: ImageView) -> str:
    cur = img.caption
    who = f" · last by {esc(cur.reviewer)}" if cur.reviewer else ""
    return (f'<div class="cap-pos"><b>{img.position}</b> / {img.total} in filter · image #{cur.image_id} · '
            f'class <b>{esc(cur.label)}</b> · <span class="cap-status cap-st-{esc(cur.status)}">'
            f'{esc(cur.status)}</span>{who} · version {cur.version}'
            f'{" · edited" if cur.edited else ""} · <span title="file">{esc(cur.file_name)}</span></div>')


def _updates(state: CaptionSession, view: ReviewView) -> dict:
    """The outputs (by name) that show ``view``; names not set are left as they are."""
    notice = _notice(view.notice)
    if not view.redraw:
        out = _keep(state, notice)
        if view.conflict is not None:
            out.update({"conflict": gr.Group(visible=True), "theirs": view.conflict.theirs,
                        "mine": view.conflict.mine})
        if view.history is not None:
            out["history"] = _history_rows(view.history)
        if view.key is not None:
            out["key"] = view.key
        if view.clear_comment:
            out["comment"] = ""
    elif view.image is None:
        out = {"state": state, "notice": notice,
               "position": '<div class="cap-pos">No image matches the filters.</div>',
               "image": None, "editor": gr.Textbox(value="", interactive=False), "key": "", "draft": "",
               "diff": "", "tokens": "", "badges": "", "history": [], "restore": gr.Dropdown(choices=[], value=None),
               "progress": progress_html(view.progress), "conflict": gr.Group(visible=False), "theirs": "",
               "mine": ""}
    else:
        img, cur = view.image, view.image.caption
        draft = cur.latest_draft
        draft_label = f"Latest draft ({draft.source or 'draft'}, event #{draft.id})" if draft else "Latest draft"
        out = {
            "state": state, "notice": notice, "position": _position_html(img), "image": img.image_path,
            "editor": gr.Textbox(value=cur.text, interactive=True), "key": img.key,
            "draft": gr.Textbox(value=draft.text if draft else "", label=draft_label),
            "history": _history_rows(img.history),
            "restore": gr.Dropdown(choices=_restore_choices(img.history, cur.caption_version), value=None),
            "progress": progress_html(view.progress),
            "conflict": gr.Group(visible=False), "theirs": "", "mine": "",
        }
        out.update(_live_updates(img.live))
    if view.labels is not None:
        out["label_filter"] = gr.Dropdown(choices=[ANY] + view.labels, value=ANY)
    return out


def _batch_updates(state: CaptionSession, view: BatchView) -> dict:
    out = _updates(state, view.review) if view.review is not None else {"state": state}
    out["batch_notice"] = _notice(view.notice)
    if view.rows is not None:
        out["batch_table"] = view.rows
    if view.batch_id is not None:
        out["batch_id"] = view.batch_id
    return out


# What a handler returns when the library refuses an action (the decorator has shown the toast).
def _page_kept(message: str, ctx, state: CaptionSession, *args, **kwargs) -> dict:
    return _keep(state, notice_html(message, "warn"))


def _batch_kept(message: str, ctx, state: CaptionSession, *args, **kwargs) -> dict:
    out = _page_kept(message, ctx, state)
    out.update({"batch_notice": out["notice"], "batch_table": gr.skip(), "batch_id": gr.skip()})
    return out


def _preview_kept(message: str, ctx, state: CaptionSession, *args, **kwargs) -> dict:
    return {"batch_table": [], "batch_notice": notice_html(message, "warn"), "state": state}


def _notice_kept(message: str, *args, **kwargs) -> str:
    return notice_html(message, "warn")


keep_page = user_errors(keep=_page_kept)

