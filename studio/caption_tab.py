"""The Captions tab: where clinicians review, edit and sign off captions, one image at a time.

This module owns the layout, the keyboard shortcuts and the wiring, and renders view data to Gradio
updates; what happens on each action (save before move, conflicts, next pending, batches) is decided by
:class:`medart_core.review.ReviewSession`.

- keyboard first: Alt+→/← next/previous, Alt+A approve & next, Alt+R reject & next, Alt+N second read
  & next, Alt+P next pending, Alt+E focus editor, Ctrl+S/Alt+S save (see ``KEYBOARD_JS``);
- a stale write opens a conflict panel (theirs vs yours); nothing is ever silently overwritten;
- 10,000 images: the browser only ever gets the current image; every handler is a plain module-level
  function ``(ctx, state, ...) -> dict`` so the bench (bench/caption_latency.py) times exactly what Gradio
  runs;
- library errors go through ``studio.errors.user_errors``: a toast plus the inline notice, the page (and
  the text in the editor) left as it is;
- caption text is data, never markup: textboxes show it as text, HTML pieces are escaped (studio.render);
- roles: the tab needs annotator (``studio.app.TABS``); the caption exports need admin (``@requires``).
"""
# No ``from __future__ import annotations``: Gradio inspects the real ``gr.Request`` annotation of the
# wrappers below to inject the request.
from typing import Any

import gradio as gr

from medart_core import caption_ops as ops
from medart_core.accounts import ADMIN
from medart_core.captions import STATUSES
from medart_core.constants import MAX_REVIEWER_CHARS
from medart_core.review import BATCH_OPS, BatchView, ImageView, LiveView, Notice, ReviewSession, ReviewView

from .auth import requires
from .errors import user_errors, warn
from .render import (badges_html, esc, notice_html, progress_html, token_counter_html,
                     word_diff_segments_html)

# ------------------------------------------------------------------------------------------------
# Browser side: shortcuts and styles
# ------------------------------------------------------------------------------------------------
SHORTCUTS: list[tuple[str, str, str]] = [
    # (keys shown, action, elem_id of the button it clicks or "focus:<id>")
    ("Alt+→", "next", "cap-next"),
    ("Alt+←", "previous", "cap-prev"),
    ("Alt+A", "approve & next", "cap-approve"),
    ("Alt+R", "reject & next", "cap-reject"),
    ("Alt+N", "second read & next", "cap-second"),
    ("Alt+P", "next pending", "cap-next-pending"),
    ("Alt+E", "focus editor", "focus:cap-editor"),
    ("Ctrl+S / Alt+S", "save", "cap-save"),
]

# Alt/Ctrl combos only (never bare letters), so typing in the editor is never hijacked. ``e.code``
# rather than ``e.key`` because on macOS Alt+A types "å". The handler checks the Captions tab is the
# visible one (offsetParent) so shortcuts do nothing while another tab is open.
KEYBOARD_JS = r"""
(() => {
  if (window.__medartCaptionKeys) return;
  window.__medartCaptionKeys = true;
  const altMap = {ArrowRight: 'cap-next', ArrowLeft: 'cap-prev', KeyA: 'cap-approve', KeyR: 'cap-reject',
                  KeyN: 'cap-second', KeyP: 'cap-next-pending', KeyS: 'cap-save', KeyE: 'focus:cap-editor'};
  const visible = (el) => el && el.offsetParent !== null;
  const press = (id) => {
    if (id.startsWith('focus:')) {
      const box = document.querySelector('#' + id.slice(6) + ' textarea');
      if (!visible(box)) return false;
      box.focus();
      return true;
    }
    const root = document.getElementById(id);
    const btn = root && (root.tagName === 'BUTTON' ? root : root.querySelector('button'));
    if (!visible(btn) || btn.disabled) return false;
    btn.click();
    return true;
  };
  document.addEventListener('keydown', (e) => {
    let id = null;
    if (e.altKey && !e.ctrlKey && !e.metaKey) id = altMap[e.code];
    else if ((e.ctrlKey || e.metaKey) && !e.altKey && e.code === 'KeyS') id = 'cap-save';
    if (!id) return;
    if (e.repeat && id !== 'cap-next' && id !== 'cap-prev') { e.preventDefault(); return; }
    if (press(id)) { e.preventDefault(); e.stopPropagation(); }
  }, true);
})();
"""

# What this tab adds to the page <head> at launch (studio.app collects it from every tab module); the
# shortcuts' own gr.HTML also installs the handler, so the tab works in any Blocks (the script is idempotent).
HEAD_JS = KEYBOARD_JS

CAPTION_CSS = """
#cap-editor textarea { font-size: 1.05rem; line-height: 1.45; }
.cap-keys { display: flex; flex-wrap: wrap; gap: .35rem .9rem; font-size: .85rem; opacity: .85; }
.cap-keys kbd { border: 1px solid #9994; border-bottom-width: 2px; border-radius: 4px; padding: 0 .3rem;
  font-family: ui-monospace, monospace; font-size: .8rem; }
.cap-pos { font-size: .95rem; }
.cap-pos .cap-status { font-weight: 600; padding: 0 .35rem; border-radius: 4px; }
.cap-st-approved { background: #16a34a33; } .cap-st-rejected { background: #dc262633; }
.cap-st-pending { background: #a3a3a333; } .cap-st-needs-second-read { background: #f59e0b33; }
.cap-tok-ok b { color: #15803d; } .cap-tok-near b { color: #b45309; } .cap-tok-over b { color: #dc2626; }
.cap-cut { background: #dc262622; text-decoration: line-through; white-space: pre-wrap; }
.cap-badges { display: flex; flex-wrap: wrap; gap: .3rem; }
.cap-badge { font-size: .8rem; padding: .05rem .45rem; border-radius: 999px; }
.cap-badge-ok { background: #16a34a22; } .cap-badge-bad { background: #dc262633; }
.cap-diff { white-space: pre-wrap; line-height: 1.5; padding: .4rem .6rem; border: 1px solid #9993;
  border-radius: 6px; min-height: 2.5rem; }
.cap-diff del, .cap-del { background: #dc262630; text-decoration: line-through; }
.cap-diff ins, .cap-ins { background: #16a34a30; text-decoration: none; }
.cap-notice { min-height: 1.4rem; font-size: .9rem; }
.cap-notice-warn { background: #f59e0b2e; border-left: 4px solid #d97706; padding: .25rem .5rem; font-weight: 600; }
.cap-notice-ok { opacity: .85; }
/* small images (e.g. 64 px thumbnails of the sample set) are scaled up to the viewer for reading */
#cap-image img { width: 100%; height: 100%; object-fit: contain; }
.cap-progress { font-size: .85rem; opacity: .9; }
#cap-conflict { border: 2px solid #dc2626; border-radius: 8px; }
"""

HISTORY_HEADERS = ["event", "when (UTC)", "kind", "reviewer", "status", "text", "source", "note", "batch"]
PREVIEW_HEADERS = ["image", "file", "class", "before", "after"]
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


# ------------------------------------------------------------------------------------------------
# Handlers: plain functions of (ctx, state, ...) returning {output name: value}; each calls the review
# session and renders its answer, so the bench (bench/caption_latency.py) times exactly what Gradio runs.
# ------------------------------------------------------------------------------------------------
def filters_from_ui(label: str | None, status: str | None, reviewer: str | None, edited: str | None,
                    over_limit: bool, search: str | None, regex: bool) -> ops.CaptionFilter:
    return ops.CaptionFilter(
        label=None if label in (None, "", ANY) else label,
        status=None if status in (None, "", ANY) else status,
        reviewer=(reviewer or "").strip() or None,
        edited={"edited": True, "unedited": False}.get(edited or ""),
        over_limit=bool(over_limit), search=search or "", regex=bool(regex))


@keep_page
def render(ctx, state: CaptionSession, notice: str = "") -> dict:
    """Show the image at ``state.index`` (the one read path of the tab), with ``notice`` (HTML) as the notice."""
    out = _updates(state, state.show(ctx.review))
    out["notice"] = notice
    return out


@keep_page
def apply_filters(ctx, state: CaptionSession, dataset: str | None, flt: ops.CaptionFilter,
                  keep_position: bool = False) -> dict:
    """(Re)build the filtered id list and show its first image; an invalid regex warns and keeps the page."""
    return _updates(state, state.apply_filters(ctx.review, dataset, flt, keep_position))


@keep_page
def open_dataset(ctx, state: CaptionSession, dataset: str | None) -> dict:
    """Switch dataset: reset filters, refresh the class list."""
    return _updates(state, state.open(ctx.review, dataset))


@keep_page
def go_next(ctx, state: CaptionSession, text: str, key: str | None = None, reviewer: str | None = None) -> dict:
    return _updates(state, state.move(ctx.review, text, key, reviewer, +1))


@keep_page
def go_prev(ctx, state: CaptionSession, text: str, key: str | None = None, reviewer: str | None = None) -> dict:
    return _updates(state, state.move(ctx.review, text, key, reviewer, -1))


@keep_page
def go_next_pending(ctx, state: CaptionSession, text: str, key: str | None = None,
                    reviewer: str | None = None) -> dict:
    """Jump to the next image (in the filtered order, wrapping) whose status is *now* pending."""
    return _updates(state, state.next_pending(ctx.review, text, key, reviewer))


@keep_page
def go_to(ctx, state: CaptionSession, position: int | float | None, text: str, key: str | None = None,
          reviewer: str | None = None) -> dict:
    """Jump to the 1-based ``position`` of the filtered list (clamped to it)."""
    return _updates(state, state.go_to(ctx.review, position, text, key, reviewer))


@keep_page
def save(ctx, state: CaptionSession, text: str, key: str | None = None, reviewer: str | None = None) -> dict:
    """Save the editor text as an edit on the version it was loaded from."""
    return _updates(state, state.save(ctx.review, text, key, reviewer))


@keep_page
def set_status_and_next(ctx, state: CaptionSession, status: str, text: str, key: str | None = None,
                        reviewer: str | None = None, advance: bool = True) -> dict:
    """Approve / reject / second read: saves pending edits first (so what is approved is what is seen)."""
    return _updates(state, state.set_status_and_next(ctx.review, status, text, key, reviewer, advance))


def approve_next(ctx, state, text, key=None, reviewer=None) -> dict:
    return set_status_and_next(ctx, state, "approved", text, key, reviewer)


def reject_next(ctx, state, text, key=None, reviewer=None) -> dict:
    return set_status_and_next(ctx, state, "rejected", text, key, reviewer)


def second_read_next(ctx, state, text, key=None, reviewer=None) -> dict:
    return set_status_and_next(ctx, state, "needs-second-read", text, key, reviewer)


@keep_page
def keep_mine(ctx, state: CaptionSession, mine: str, reviewer: str | None = None) -> dict:
    """Conflict resolution: write my text on top of the version that beat me (explicit, not silent)."""
    return _updates(state, state.keep_mine(ctx.review, mine, reviewer))


@keep_page
def take_theirs(ctx, state: CaptionSession) -> dict:
    """Conflict resolution: drop my unsaved text and load the current one."""
    return _updates(state, state.take_theirs(ctx.review))


@keep_page
def add_comment(ctx, state: CaptionSession, comment: str, reviewer: str | None = None) -> dict:
    return _updates(state, state.add_comment(ctx.review, comment, reviewer))


@keep_page
def restore_event(ctx, state: CaptionSession, event_id: int | None, reviewer: str | None = None) -> dict:
    return _updates(state, state.restore(ctx.review, event_id, reviewer))


@keep_page
def live_edit(ctx, state: CaptionSession, text: str) -> dict:
    """Per keystroke: token counter, truncation preview, badges and diff against the draft (no I/O)."""
    return _live_updates(state.live(ctx.review, text))


# --- batches -------------------------------------------------------------------------------------
@user_errors(keep=_preview_kept)
def batch_preview(ctx, state: CaptionSession, op: str, find: str, replace: str, regex: bool, prefix: str,
                  suffix: str, drafter: str) -> dict:
    """Compute (and remember) every change the batch would make on the current filtered set."""
    return _batch_updates(state, state.batch_preview(ctx.review, op, find, replace, regex, prefix, suffix,
                                                     drafter))


@user_errors(keep=_batch_kept)
def batch_apply(ctx, state: CaptionSession, reviewer: str | None = None) -> dict:
    return _batch_updates(state, state.batch_apply(ctx.review, reviewer))


@user_errors(keep=_batch_kept)
def batch_undo(ctx, state: CaptionSession, batch_id: str | None, reviewer: str | None = None) -> dict:
    return _batch_updates(state, state.batch_undo(ctx.review, batch_id, reviewer))


# --- export --------------------------------------------------------------------------------------
@user_errors(keep=_notice_kept)
def export(ctx, state: CaptionSession, fmt: str) -> str:
    """Export the dataset's approved captions into ``exports/<dataset>-<format>-<UTC timestamp>``."""
    return _notice(state.export(ctx.review, fmt))


# --- load ----------------------------------------------------------------------------------------
def dataset_names(ctx) -> list[str]:
    return [d.name for d in ctx.store.list_datasets()]


# ------------------------------------------------------------------------------------------------
# UI
# ------------------------------------------------------------------------------------------------
def _shortcuts_html() -> str:
    keys = " ".join(f"<span><kbd>{esc(k)}</kbd> {esc(a)}</span>" for k, a, _ in SHORTCUTS)
    return f"<style>{CAPTION_CSS}</style><div class='cap-keys' id='cap-keys'>{keys}</div>"


def build_caption_tab(ctx) -> None:
    """Build the Captions tab inside the caller's ``gr.Tab`` (or any Blocks context)."""
    # The only thing the browser fetches from the workspace is the image being reviewed; serving the
    # datasets folder as static files avoids copying every viewed image into Gradio's cache.
    gr.set_static_paths([str(ctx.ws.datasets_dir)])
    # The tokenizer is not loaded here: building the page must not wait for it. ``app.py`` warms it up once
    # the server is serving (StudioContext.warm_up); otherwise the first token count loads it.

    # No workspace data in build-time values: /config and the page are the same for everyone, signed in or
    # not. The dataset list and classes come with the guarded page load; API clients may name any dataset
    # (allow_custom_value), and the library refuses one that does not exist.
    state = gr.State(CaptionSession())
    saved_name = gr.BrowserState("", storage_key="medart_reviewer")

    gr.HTML(_shortcuts_html(), js_on_load=KEYBOARD_JS, elem_id="cap-shortcuts")
    with gr.Row():
        dataset = gr.Dropdown(label="Dataset", choices=[], value=None, scale=2, elem_id="cap-dataset",
                              allow_custom_value=True)
        reviewer = gr.Textbox(label="Reviewer (your name; remembered in this browser)", scale=2,
                              elem_id="cap-reviewer", max_length=MAX_REVIEWER_CHARS)
        refresh = gr.Button("Refresh list", scale=0, min_width=120, size="sm", elem_id="cap-refresh")
    with gr.Accordion("Filters", open=False):
        with gr.Row():
            status_f = gr.Dropdown(label="Status", choices=[ANY, *STATUSES], value=ANY, elem_id="cap-f-status")
            label_f = gr.Dropdown(label="Class", choices=[ANY], value=ANY, elem_id="cap-f-class",
                                  allow_custom_value=True)
            reviewer_f = gr.Textbox(label="Last reviewer", elem_id="cap-f-reviewer")
            edited_f = gr.Radio(["any", "edited", "unedited"], value="any", label="Edited by a human")
        with gr.Row():
            search_f = gr.Textbox(label="Text search", scale=3, elem_id="cap-f-search")
            regex_f = gr.Checkbox(label="regex", value=False)
            over_f = gr.Checkbox(label=f"over {ops.MAX_TOKENS} tokens", value=False)
            apply_f = gr.Button("Apply filters", variant="primary", elem_id="cap-apply-filters")
    progress = gr.HTML(elem_id="cap-progress", js_on_load=None)
    position = gr.HTML(elem_id="cap-position", js_on_load=None)
    with gr.Row():
        with gr.Column(scale=5):
            image = gr.Image(type="filepath", interactive=False, height=520, label="Image", elem_id="cap-image",
                             buttons=["fullscreen"])
            with gr.Row():
                goto = gr.Number(label="Go to #", value=None, precision=0, scale=1, elem_id="cap-goto")
                prev_b = gr.Button("◀ Previous (Alt+←)", elem_id="cap-prev", scale=2)
                next_b = gr.Button("Next ▶ (Alt+→)", elem_id="cap-next", scale=2)
                pend_b = gr.Button("Next pending (Alt+P)", elem_id="cap-next-pending", scale=2)
        with gr.Column(scale=6):
            editor = gr.Textbox(label="Caption (Alt+E to focus)", lines=6, max_lines=16, interactive=True,
                                elem_id="cap-editor", max_length=4000)
            key = gr.Textbox(visible=False, elem_id="cap-key")
            tokens = gr.HTML(elem_id="cap-tokens", js_on_load=None)
            badges = gr.HTML(elem_id="cap-badges", js_on_load=None)
            with gr.Row():
                save_b = gr.Button("Save (Ctrl+S)", elem_id="cap-save", variant="secondary")
                approve_b = gr.Button("Approve & next (Alt+A)", elem_id="cap-approve", variant="primary")
                reject_b = gr.Button("Reject & next (Alt+R)", elem_id="cap-reject", variant="stop")
                second_b = gr.Button("2nd read & next (Alt+N)", elem_id="cap-second")
            notice = gr.HTML(elem_id="cap-notice", js_on_load=None)
            with gr.Group(visible=False, elem_id="cap-conflict") as conflict:
                gr.Markdown("**Conflict:** this caption was changed by someone else after you opened it.")
                with gr.Row():
                    theirs = gr.Textbox(label="Theirs (saved now)", interactive=False, lines=4, elem_id="cap-theirs")
                    mine = gr.Textbox(label="Yours (not saved)", interactive=True, lines=4, elem_id="cap-mine")
                with gr.Row():
                    keep_b = gr.Button("Keep mine", variant="primary", elem_id="cap-keep-mine")
                    take_b = gr.Button("Take theirs", elem_id="cap-take-theirs")
            draft = gr.Textbox(label="Latest draft", interactive=False, lines=3, elem_id="cap-draft")
            gr.Markdown("Your caption against the draft (struck out: removed, highlighted: added)")
            diff = gr.HTML(elem_id="cap-diff", js_on_load=None)
            with gr.Row():
                comment = gr.Textbox(label="Comment", scale=4, elem_id="cap-comment")
                comment_b = gr.Button("Add comment", scale=1, elem_id="cap-comment-btn")
    with gr.Accordion("History of this image", open=False):
        history = gr.Dataframe(headers=HISTORY_HEADERS, datatype="str", interactive=False, wrap=True,
                               elem_id="cap-history", max_height=360,
                               column_widths=["70px", "150px", "70px", "110px", "130px", "40%", "100px", "140px",
                                              "140px"])
        with gr.Row():
            restore_dd = gr.Dropdown(label="Version to restore", choices=[], scale=4, elem_id="cap-restore-pick")
            restore_b = gr.Button("Restore this version", scale=1, elem_id="cap-restore")
    with gr.Accordion("Batch operations on the filtered set", open=False):
        with gr.Row():
            batch_op = gr.Radio(BATCH_OPS, value=BATCH_OPS[0], label="Operation")
            drafter = gr.Dropdown(ops.available_drafters(), value="template", label="Drafter (re-draft)")
        with gr.Row():
            find = gr.Textbox(label="Find", elem_id="cap-b-find")
            repl = gr.Textbox(label="Replace with", elem_id="cap-b-replace")
            b_regex = gr.Checkbox(label="regex", value=True)
        with gr.Row():
            prefix = gr.Textbox(label="Prepend (include a trailing space)", elem_id="cap-b-prefix")
            suffix = gr.Textbox(label="Append (include a leading space)", elem_id="cap-b-suffix")
        with gr.Row():
            preview_b = gr.Button("Preview changes", elem_id="cap-b-preview")
            apply_b = gr.Button("Apply batch", variant="primary", elem_id="cap-b-apply")
            batch_id = gr.Textbox(label="Batch id (for undo)", elem_id="cap-b-id")
            undo_b = gr.Button("Undo batch", variant="stop", elem_id="cap-b-undo")
        batch_notice = gr.HTML(js_on_load=None, elem_id="cap-b-notice")
        batch_table = gr.Dataframe(headers=PREVIEW_HEADERS, datatype="str", interactive=False, wrap=True,
                                   max_height=420, elem_id="cap-b-table",
                                   column_widths=["70px", "200px", "120px", "35%", "35%"])
    with gr.Accordion("Export approved captions", open=False):
        with gr.Row():
            exp_if = gr.Button("Export imagefolder (Hugging Face datasets)", elem_id="cap-export-if")
            exp_csv = gr.Button("Export Med-Art CSV", elem_id="cap-export-csv")
        export_notice = gr.HTML(js_on_load=None, elem_id="cap-export-notice")

    comps = {"state": state, "notice": notice, "position": position, "image": image, "editor": editor, "key": key,
             "draft": draft, "diff": diff, "tokens": tokens, "badges": badges, "history": history,
             "restore": restore_dd, "progress": progress, "conflict": conflict, "theirs": theirs, "mine": mine,
             "label_filter": label_f, "batch_table": batch_table, "batch_notice": batch_notice,
             "batch_id": batch_id}
    view_out = [comps[k] for k in VIEW]

    def as_tuple(names: list[str], result: dict) -> tuple:
        return tuple(result.get(n, gr.skip()) for n in names)

    def who(request: gr.Request | None, reviewer_name: str | None) -> str | None:
        return resolve_reviewer(ctx, request, reviewer_name)

    filter_inputs = [label_f, status_f, reviewer_f, edited_f, over_f, search_f, regex_f]
    nav_inputs = [state, editor, key, reviewer]
    fast = dict(show_progress="hidden", trigger_mode="once")

    # -- load: reviewer name, dataset list, first image --------------------------------------------
    @user_errors
    def on_load(st: CaptionSession, remembered: str, request: gr.Request):
        auth_name = resolve_reviewer(ctx, request, None)
        names = dataset_names(ctx)
        ds = names[0] if names else None
        out = open_dataset(ctx, st, ds)
        rev = gr.Textbox(value=auth_name, interactive=False) if auth_name else gr.Textbox(value=remembered or "")
        return (rev, gr.Dropdown(choices=names, value=ds)) + as_tuple(VIEW + ["label_filter"], out)

    root = gr.context.Context.root_block
    if root is not None:
        root.load(on_load, [state, saved_name], [reviewer, dataset] + view_out + [label_f], api_name="caption_load",
                  show_progress="hidden")

    @user_errors
    def on_reviewer(name):
        return (name or "").strip()[:MAX_REVIEWER_CHARS]

    reviewer.change(on_reviewer, reviewer, saved_name, api_name=False, show_progress="hidden", queue=False)

    @user_errors
    def on_dataset(st, ds):
        return as_tuple(VIEW + ["label_filter"], open_dataset(ctx, st, ds))

    dataset.input(on_dataset, [state, dataset], view_out + [label_f], api_name="caption_open_dataset", **fast)

    @user_errors
    def on_filters(st, ds, label, status, last_reviewer, edited, over_limit, search, regex):
        flt = filters_from_ui(label, status, last_reviewer, edited, over_limit, search, regex)
        return as_tuple(VIEW, apply_filters(ctx, st, ds, flt))

    apply_f.click(on_filters, [state, dataset] + filter_inputs, view_out, api_name="caption_filter", **fast)
    search_f.submit(on_filters, [state, dataset] + filter_inputs, view_out, api_name=False, **fast)

    @user_errors
    def on_refresh(st, ds, label, status, last_reviewer, edited, over_limit, search, regex):
        names = dataset_names(ctx)
        flt = filters_from_ui(label, status, last_reviewer, edited, over_limit, search, regex)
        out = apply_filters(ctx, st, ds, flt, keep_position=True)
        return (gr.Dropdown(choices=names, value=ds),) + as_tuple(VIEW, out)

    refresh.click(on_refresh, [state, dataset] + filter_inputs, [dataset] + view_out, api_name="caption_refresh",
                  **fast)

    def nav(fn):
        @user_errors
        def handler(st, text, editor_key, reviewer_name, request: gr.Request):
            return as_tuple(VIEW, fn(ctx, st, text, editor_key, who(request, reviewer_name)))
        return handler

    next_b.click(nav(go_next), nav_inputs, view_out, api_name="caption_next", **fast)
    prev_b.click(nav(go_prev), nav_inputs, view_out, api_name="caption_prev", **fast)
    pend_b.click(nav(go_next_pending), nav_inputs, view_out, api_name="caption_next_pending", **fast)
    save_b.click(nav(save), nav_inputs, view_out, api_name="caption_save", **fast)
    approve_b.click(nav(approve_next), nav_inputs, view_out, api_name="caption_approve_next", **fast)
    reject_b.click(nav(reject_next), nav_inputs, view_out, api_name="caption_reject_next", **fast)
    second_b.click(nav(second_read_next), nav_inputs, view_out, api_name="caption_second_read_next", **fast)

    @user_errors
    def on_goto(st, pos, text, k, reviewer_name, request: gr.Request):
        return as_tuple(VIEW, go_to(ctx, st, pos, text, k, who(request, reviewer_name)))

    goto.submit(on_goto, [state, goto, editor, key, reviewer], view_out, api_name="caption_goto", **fast)

    @user_errors
    def on_keep(st, mine_text, reviewer_name, request: gr.Request):
        return as_tuple(VIEW, keep_mine(ctx, st, mine_text, who(request, reviewer_name)))

    keep_b.click(on_keep, [state, mine, reviewer], view_out, api_name="caption_keep_mine", **fast)

    @user_errors
    def on_take(st):
        return as_tuple(VIEW, take_theirs(ctx, st))

    take_b.click(on_take, [state], view_out, api_name="caption_take_theirs", **fast)

    @user_errors
    def on_comment(st, text, reviewer_name, request: gr.Request):
        return as_tuple(VIEW + ["comment"], add_comment(ctx, st, text, who(request, reviewer_name)))

    comment_b.click(on_comment, [state, comment, reviewer], view_out + [comment], api_name="caption_comment", **fast)

    @user_errors
    def on_restore(st, ev_id, reviewer_name, request: gr.Request):
        return as_tuple(VIEW, restore_event(ctx, st, ev_id, who(request, reviewer_name)))

    restore_b.click(on_restore, [state, restore_dd, reviewer], view_out, api_name="caption_restore", **fast)

    @user_errors
    def on_live(st, text):
        return as_tuple(LIVE, live_edit(ctx, st, text))

    editor.input(on_live, [state, editor], [diff, tokens, badges], api_name="caption_live", show_progress="hidden",
                 trigger_mode="always_last")

    batch_names = ["state", "batch_table", "batch_notice"]

    @user_errors
    def on_preview(st, operation, find_text, replace_text, regex, prefix_text, suffix_text, drafter_name):
        return as_tuple(batch_names, batch_preview(ctx, st, operation, find_text, replace_text, regex, prefix_text,
                                                   suffix_text, drafter_name))

    preview_b.click(on_preview, [state, batch_op, find, repl, b_regex, prefix, suffix, drafter],
                    [comps[n] for n in batch_names], api_name="caption_batch_preview", **fast)
    batch_out_names = VIEW + ["batch_table", "batch_notice", "batch_id"]

    @user_errors
    def on_apply(st, reviewer_name, request: gr.Request):
        return as_tuple(batch_out_names, batch_apply(ctx, st, who(request, reviewer_name)))

    apply_b.click(on_apply, [state, reviewer], [comps[n] for n in batch_out_names], api_name="caption_batch_apply",
                  **fast)

    @user_errors
    def on_undo(st, bid, reviewer_name, request: gr.Request):
        return as_tuple(batch_out_names, batch_undo(ctx, st, bid, who(request, reviewer_name)))

    undo_b.click(on_undo, [state, batch_id, reviewer], [comps[n] for n in batch_out_names],
                 api_name="caption_batch_undo", **fast)

    @requires(ADMIN)
    @user_errors
    def on_export_imagefolder(st):
        return export(ctx, st, "imagefolder")

    @requires(ADMIN)
    @user_errors
    def on_export_csv(st):
        return export(ctx, st, "medart-csv")

    exp_if.click(on_export_imagefolder, [state], export_notice, api_name="caption_export_imagefolder", **fast)
    exp_csv.click(on_export_csv, [state], export_notice, api_name="caption_export_csv", **fast)
