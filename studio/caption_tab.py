"""The Captions tab: where clinicians review, edit and sign off captions, one image at a time.

Design constraints (issue 3 §2):
- keyboard first: Alt+→/← next/previous, Alt+A approve & next, Alt+R reject & next, Alt+N second read
  & next, Alt+P next pending, Alt+E focus editor, Ctrl+S/Alt+S save (see ``KEYBOARD_JS``);
- never lose or silently overwrite a word: every write passes the version the editor loaded; a stale
  write opens a conflict panel (theirs vs yours); moving away from unsaved text saves it first;
- 10,000 images: the browser only ever gets the current image; the session holds the filtered id list
  and an index; every handler is a plain module-level function ``(ctx, state, ...) -> dict`` so the
  bench (bench/caption_latency.py) times exactly what Gradio runs;
- caption text is data, never markup: textboxes show it as text, HTML pieces are ``html.escape``d.

The library logic (filters, diff, token preview, batches) lives in ``medart_core.caption_ops``.
"""
# No ``from __future__ import annotations``: Gradio inspects the real ``gr.Request`` annotation of the
# wrappers below to inject the request.
import html
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import gradio as gr

from medart_core import caption_ops as ops
from medart_core.captions import STATUSES
from medart_core.errors import ConfigError, ConflictError, MedArtError

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
PREVIEW_ROWS_SHOWN = 2000     # the table is for reading; the whole batch is applied (count shown)
MAX_REVIEWER_CHARS = 64
ANY = "(any)"
NEAR_PROBES = 40            # next-pending: images checked one by one before one bulk query


# ------------------------------------------------------------------------------------------------
# Session state
# ------------------------------------------------------------------------------------------------
@dataclass
class CaptionSession:
    """Per-browser-session state: small on purpose (ids of the filtered set + where we are)."""

    dataset: str | None = None
    flt: ops.CaptionFilter = field(default_factory=ops.CaptionFilter)
    ids: list[int] = field(default_factory=list)     # filtered image ids, in store order
    index: int = 0
    image_id: int | None = None
    loaded_version: int = 0        # the version the editor's text was loaded from: every write passes it
    loaded_text: str = ""
    rules: ops.ReviewRules | None = None   # seed/prompt of the shown image's class (for the badges)
    conflict: dict | None = None   # {"actual": version, "theirs": text, "mine": text}
    pending_batch: list[ops.BatchChange] = field(default_factory=list)
    last_batch: str | None = None
    progress_html: str = ""
    listed_at: str = ""

    @property
    def editor_key(self) -> str:
        """What the editor shows, as ``"<image id>:<version>"``; the browser sends it back with the text so a
        queued keypress carrying an older image's text can never be written onto the next image."""
        return f"{self.image_id}:{self.loaded_version}" if self.image_id is not None else ""


# Names of the outputs of a full view refresh, in the order the wiring passes them to Gradio.
VIEW = ["state", "notice", "position", "image", "editor", "key", "draft", "diff", "tokens", "badges",
        "history", "restore", "progress", "conflict", "theirs", "mine"]
LIVE = ["diff", "tokens", "badges"]


# ------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------
_TOKENIZERS: dict[str, Any] = {}
_COUNTERS: dict[str, ops.TokenCounter] = {}


def tokenizer_for(ctx) -> Any:
    """The T5 tokenizer of the studio's backbone; falls back to the bundled tiny one when the backbone's
    tokenizer is not available offline (the counts then come from the tiny vocabulary)."""
    spec = getattr(ctx, "backbone_spec", None) or "tiny"
    tok = _TOKENIZERS.get(spec)
    if tok is None:
        from medart_core.backbone import load_tokenizer
        try:
            tok = load_tokenizer(spec)
        except MedArtError:
            tok = load_tokenizer("tiny")
        _TOKENIZERS[spec] = tok
    return tok


def counter_for(ctx) -> ops.TokenCounter:
    spec = getattr(ctx, "backbone_spec", None) or "tiny"
    c = _COUNTERS.get(spec)
    if c is None:
        c = _COUNTERS[spec] = ops.TokenCounter(tokenizer_for(ctx))
    return c


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


def _esc(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def _notice(msg: str, kind: str = "ok") -> str:
    return f'<div class="cap-notice cap-notice-{kind}">{_esc(msg)}</div>' if msg else '<div class="cap-notice"></div>'


def _warn(msg: str) -> str:
    """Toast (when inside a request) plus the same words in the notice line, which tests can read."""
    from gradio.context import LocalContext

    if LocalContext.blocks.get(None) is not None:   # only inside an event: the bench calls handlers directly
        gr.Warning(msg)
    return _notice(msg, "warn")


def _now_hm() -> str:
    return datetime.now(timezone.utc).strftime("%H:%M:%S")


_RULES: dict[tuple, tuple[float, ops.ReviewRules | None]] = {}


def rules_for(ctx, dataset: str, label: str) -> ops.ReviewRules | None:
    """Seed/prompt of a class, cached until the dataset's prompts file changes (edited in another tab)."""
    try:
        mtime = ctx.ws.prompts_path(dataset).stat().st_mtime
    except OSError:
        mtime = 0.0
    key = (str(ctx.ws.root), dataset, label)
    hit = _RULES.get(key)
    if hit is None or hit[0] != mtime:
        try:
            rules = ops.review_rules(ctx.ws, ctx.store, dataset, label)
        except MedArtError:
            rules = None   # no badges beat a broken tab
        hit = _RULES[key] = (mtime, rules)
    return hit[1]


def _progress_html(ctx, dataset: str | None) -> str:
    if not dataset:
        return ""
    rows = ops.progress_by_class(ctx.store, dataset)
    total_a = sum(a for _, a, _ in rows)
    total = sum(t for _, _, t in rows)
    parts = " · ".join(f"{_esc(label)} {a}/{t}" for label, a, t in rows)
    return (f'<div class="cap-progress"><b>Approved {total_a}/{total}</b>'
            + (f" &nbsp;—&nbsp; {parts}" if parts else "") + "</div>")


def _live_parts(ctx, state: CaptionSession, text: str, draft_text: str | None) -> dict:
    preview = ops.token_preview(tokenizer_for(ctx), text)
    r = state.rules
    badges = ops.rule_badges(text, seed=r.seed if r else None, n_tokens=preview.n_tokens,
                             features=r.features if r else (), prompt=r.prompt if r else None)
    if draft_text is None:
        diff = '<div class="cap-diff"><i>No machine draft for this image.</i></div>'
    else:
        diff = f'<div class="cap-diff">{ops.word_diff_html(draft_text, text)}</div>'
    return {"diff": diff, "tokens": ops.token_counter_html(preview), "badges": ops.badges_html(badges)}


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


def _empty_view(state: CaptionSession, notice: str) -> dict:
    return {"state": state, "notice": notice, "position": '<div class="cap-pos">No image matches the filters.</div>',
            "image": None, "editor": gr.Textbox(value="", interactive=False), "key": "", "draft": "",
            "diff": "", "tokens": "", "badges": "", "history": [], "restore": gr.Dropdown(choices=[], value=None),
            "progress": state.progress_html, "conflict": gr.Group(visible=False), "theirs": "", "mine": ""}


def render(ctx, state: CaptionSession, notice: str = "") -> dict:
    """Load the image at ``state.index`` and everything shown about it (the one read path of the tab)."""
    if not state.ids:
        state.image_id = None
        state.loaded_version, state.loaded_text = 0, ""
        return _empty_view(state, notice)
    state.index = max(0, min(state.index, len(state.ids) - 1))
    image_id = state.ids[state.index]
    store = ctx.store
    cur = store.current(image_id)
    history = store.history(image_id)
    state.image_id, state.loaded_version, state.loaded_text = image_id, cur.version, cur.text
    state.conflict = None
    state.rules = rules_for(ctx, state.dataset, cur.label or "")
    draft = cur.latest_draft
    draft_label = f"Latest draft ({draft.source or 'draft'}, event #{draft.id})" if draft else "Latest draft"
    who = f" · last by {_esc(cur.reviewer)}" if cur.reviewer else ""
    position = (f'<div class="cap-pos"><b>{state.index + 1}</b> / {len(state.ids)} in filter · image #{image_id} · '
                f'class <b>{_esc(cur.label)}</b> · <span class="cap-status cap-st-{_esc(cur.status)}">'
                f'{_esc(cur.status)}</span>{who} · version {cur.version}'
                f'{" · edited" if cur.edited else ""} · <span title="file">{_esc(cur.file_name)}</span></div>')
    view = {
        "state": state, "notice": notice, "position": position,
        "image": str(ctx.ws.image_path(state.dataset, cur.file_name)),
        "editor": gr.Textbox(value=cur.text, interactive=True), "key": state.editor_key,
        "draft": gr.Textbox(value=draft.text if draft else "", label=draft_label),
        "history": _history_rows(history),
        "restore": gr.Dropdown(choices=_restore_choices(history, cur.caption_version), value=None),
        "progress": state.progress_html,
        "conflict": gr.Group(visible=False), "theirs": "", "mine": "",
    }
    view.update(_live_parts(ctx, state, cur.text, draft.text if draft else None))
    return view


def _keep(state: CaptionSession, notice: str) -> dict:
    """Leave the page as it is (only the notice changes)."""
    out: dict = {k: gr.skip() for k in VIEW}
    out["state"], out["notice"] = state, notice
    return out


def _conflict_view(state: CaptionSession, err: ConflictError, mine: str) -> dict:
    state.conflict = {"actual": err.actual, "theirs": err.current_text or "", "mine": mine}
    out = _keep(state, _warn("Someone else changed this caption while you were editing. Nothing was saved: "
                             "choose “keep mine” or “take theirs” below."))
    out.update({"conflict": gr.Group(visible=True), "theirs": err.current_text or "", "mine": mine})
    return out


def _stale_key(state: CaptionSession, key: str | None) -> bool:
    return key is not None and key != "" and key != state.editor_key


def _write_text_if_changed(ctx, state: CaptionSession, text: str, reviewer: str | None) -> str:
    """Save the editor's text when it differs from what was loaded. Returns "saved", "unchanged".

    Raises ConflictError (stale version) or ConfigError (no reviewer / invalid text): nothing written.
    """
    if state.image_id is None or text == state.loaded_text:
        return "unchanged"
    if not reviewer:
        raise ConfigError("Enter your name in “Reviewer” first: every change records who made it. "
                          "Nothing was saved.")
    ev = ctx.store.edit(state.image_id, text, reviewer=reviewer, expected_version=state.loaded_version)
    state.loaded_version, state.loaded_text = ev.id, text
    return "saved"


# ------------------------------------------------------------------------------------------------
# Handlers: plain functions of (ctx, state, ...) returning {output name: value}
# ------------------------------------------------------------------------------------------------
def filters_from_ui(label: str | None, status: str | None, reviewer: str | None, edited: str | None,
                    over_limit: bool, search: str | None, regex: bool) -> ops.CaptionFilter:
    return ops.CaptionFilter(
        label=None if label in (None, "", ANY) else label,
        status=None if status in (None, "", ANY) else status,
        reviewer=(reviewer or "").strip() or None,
        edited={"edited": True, "unedited": False}.get(edited or ""),
        over_limit=bool(over_limit), search=search or "", regex=bool(regex))


def apply_filters(ctx, state: CaptionSession, dataset: str | None, flt: ops.CaptionFilter,
                  keep_position: bool = False) -> dict:
    """(Re)build the filtered id list with one ``store.states`` call, and show its first image."""
    if not dataset:
        state.dataset, state.ids = None, []
        return render(ctx, state, _notice("Pick a dataset (build the sample dataset in the Dataset tab)."))
    try:
        states = ops.filter_states(ctx.store, dataset, flt, counter=counter_for(ctx))
    except ConfigError as e:      # e.g. an invalid regex: warn, keep what is on screen
        return _keep(state, _warn(str(e)))
    previous = state.image_id if (keep_position and state.dataset == dataset) else None
    state.dataset, state.flt = dataset, flt
    state.ids = [s.image_id for s in states]
    state.index = state.ids.index(previous) if previous in state.ids else 0
    state.pending_batch = []
    state.listed_at = _now_hm()
    state.progress_html = _progress_html(ctx, dataset)
    return render(ctx, state, _notice(f"{len(state.ids)} image(s) match (list taken {state.listed_at} UTC)."))


def _flush_editor(ctx, state: CaptionSession, text: str, key: str | None, reviewer: str | None,
                  stale_msg: str = "The editor was out of date; nothing was written.",
                  ) -> tuple[str | None, dict | None]:
    """Write the editor's text (if changed) on the version it was loaded from, before any other action.

    Returns ``(outcome, None)`` to go on, or ``(None, view)`` when the action must stop here: a stale key
    (a repeated keypress), a conflict (both texts shown) or invalid text (a warning)."""
    if _stale_key(state, key):
        return None, render(ctx, state, _warn(stale_msg))
    try:
        return _write_text_if_changed(ctx, state, text, reviewer), None
    except ConflictError as e:
        return None, _conflict_view(state, e, text)
    except ConfigError as e:
        return None, _keep(state, _warn(str(e)))


def _move(ctx, state: CaptionSession, text: str, key: str | None, reviewer: str | None, step: int,
          saved_note: str = "") -> dict:
    saved, stop = _flush_editor(ctx, state, text, key, reviewer,
                                "The editor was out of date (a key was pressed twice quickly); nothing was "
                                "written. Check the text and try again.")
    if stop is not None:
        return stop
    if not state.ids:
        return render(ctx, state, _notice("No image matches the filters."))
    new_index = state.index + step
    note = saved_note or ("Saved your edit before moving. " if saved == "saved" else "")
    if new_index >= len(state.ids):
        return render(ctx, state, _notice(note + "That was the last image of the filtered list."))
    if new_index < 0:
        return render(ctx, state, _notice(note + "This is the first image of the filtered list."))
    state.index = new_index
    return render(ctx, state, _notice(note))


def go_next(ctx, state: CaptionSession, text: str, key: str | None = None, reviewer: str | None = None) -> dict:
    return _move(ctx, state, text, key, reviewer, +1)


def go_prev(ctx, state: CaptionSession, text: str, key: str | None = None, reviewer: str | None = None) -> dict:
    return _move(ctx, state, text, key, reviewer, -1)


def go_next_pending(ctx, state: CaptionSession, text: str, key: str | None = None,
                    reviewer: str | None = None) -> dict:
    """Jump to the next image (in the filtered order, wrapping) whose status is *now* pending."""
    saved, stop = _flush_editor(ctx, state, text, key, reviewer)
    if stop is not None:
        return stop
    if not state.ids:
        return render(ctx, state, _notice("No image matches the filters."))
    n, start = len(state.ids), state.index
    note = "Saved your edit before moving. " if saved == "saved" else ""
    # Reviewing in order, the next pending image is usually a few steps away: probe those one by one
    # (~0.2 ms each) and only fall back to one bulk query for long jumps.
    for k in range(1, min(n, NEAR_PROBES) + 1):
        i = (start + k) % n
        if ctx.store.current(state.ids[i]).status == "pending":
            state.index = i
            return render(ctx, state, _notice(note + ("Wrapped to the start of the list. " if i <= start else "")))
    pending = {s.image_id for s in ctx.store.states(state.dataset, status="pending")}
    for k in range(1, n + 1):
        i = (start + k) % n
        if state.ids[i] in pending:
            state.index = i
            return render(ctx, state, _notice(note + ("Wrapped to the start of the list. " if i <= start else "")))
    return render(ctx, state, _notice(note + "No pending image left in this filtered list."))


def go_to(ctx, state: CaptionSession, position: int | float | None, text: str, key: str | None = None,
          reviewer: str | None = None) -> dict:
    """Jump to the 1-based ``position`` of the filtered list (clamped to it)."""
    if position is None or not state.ids:
        return _keep(state, _notice(""))
    target = max(1, min(len(state.ids), int(position))) - 1
    return _move(ctx, state, text, key, reviewer, target - state.index)


def save(ctx, state: CaptionSession, text: str, key: str | None = None, reviewer: str | None = None) -> dict:
    """Save the editor text as an edit on the version it was loaded from."""
    if state.image_id is None:
        return _keep(state, _warn("No image is shown; nothing to save."))
    saved, stop = _flush_editor(ctx, state, text, key, reviewer)
    if stop is not None:
        return stop
    if saved == "unchanged":
        return _keep(state, _notice("No change to save."))
    return render(ctx, state, _notice(f"Saved (version {state.loaded_version})."))


def set_status_and_next(ctx, state: CaptionSession, status: str, text: str, key: str | None = None,
                        reviewer: str | None = None, advance: bool = True) -> dict:
    """Approve / reject / second read: saves pending edits first (so what is approved is what is seen)."""
    if state.image_id is None:
        return _keep(state, _warn("No image is shown."))
    if _stale_key(state, key):
        return render(ctx, state, _warn("The editor was out of date; nothing was written."))
    if not reviewer:
        return _keep(state, _warn("Enter your name in “Reviewer” first: every decision records who made it. "
                                  "Nothing was saved."))
    try:
        _write_text_if_changed(ctx, state, text, reviewer)
        ev = ctx.store.set_status(state.image_id, status, reviewer=reviewer, expected_version=state.loaded_version)
    except ConflictError as e:
        return _conflict_view(state, e, text)
    except ConfigError as e:
        return _keep(state, _warn(str(e)))
    state.loaded_version = ev.id
    state.progress_html = _progress_html(ctx, state.dataset)
    done = f"Image #{state.image_id} marked {status}."
    if advance and state.index + 1 < len(state.ids):
        state.index += 1
    elif advance:
        done += " That was the last image of the filtered list."
    return render(ctx, state, _notice(done))


def approve_next(ctx, state, text, key=None, reviewer=None) -> dict:
    return set_status_and_next(ctx, state, "approved", text, key, reviewer)


def reject_next(ctx, state, text, key=None, reviewer=None) -> dict:
    return set_status_and_next(ctx, state, "rejected", text, key, reviewer)


def second_read_next(ctx, state, text, key=None, reviewer=None) -> dict:
    return set_status_and_next(ctx, state, "needs-second-read", text, key, reviewer)


def keep_mine(ctx, state: CaptionSession, mine: str, reviewer: str | None = None) -> dict:
    """Conflict resolution: write my text on top of the version that beat me (explicit, not silent)."""
    if not state.conflict or state.image_id is None:
        return _keep(state, _notice("No conflict to resolve."))
    if not reviewer:
        return _keep(state, _warn("Enter your name in “Reviewer” first. Nothing was saved."))
    try:
        ev = ctx.store.edit(state.image_id, mine, reviewer=reviewer, expected_version=int(state.conflict["actual"]))
    except ConflictError as e:   # changed yet again: show the newest "theirs"
        return _conflict_view(state, e, mine)
    except ConfigError as e:
        return _keep(state, _warn(str(e)))
    return render(ctx, state, _notice(f"Kept your text (saved as version {ev.id})."))


def take_theirs(ctx, state: CaptionSession) -> dict:
    """Conflict resolution: drop my unsaved text and load the current one."""
    return render(ctx, state, _notice("Loaded their text; your unsaved text was discarded."))


def add_comment(ctx, state: CaptionSession, comment: str, reviewer: str | None = None) -> dict:
    if state.image_id is None:
        return _keep(state, _warn("No image is shown."))
    if not reviewer:
        return _keep(state, _warn("Enter your name in “Reviewer” first. The comment was not saved."))
    if not (comment or "").strip():
        return _keep(state, _warn("Type a comment first."))
    try:
        ev = ctx.store.comment(state.image_id, comment, reviewer=reviewer)
    except ConfigError as e:
        return _keep(state, _warn(str(e)))
    # A comment moves the version. Re-base the editor on it only if nothing else happened since the
    # editor was loaded, so my own comment never turns my next save into a conflict, while someone
    # else's edit in between still does.
    hist = ctx.store.history(state.image_id)
    if all(e.id <= state.loaded_version or e.id == ev.id for e in hist):
        state.loaded_version = ev.id
    out = _keep(state, _notice(f"Comment added (event #{ev.id})."))
    out.update({"history": _history_rows(hist), "key": state.editor_key, "state": state, "comment": ""})
    return out


def restore_event(ctx, state: CaptionSession, event_id: int | None, reviewer: str | None = None) -> dict:
    if state.image_id is None or event_id in (None, ""):
        return _keep(state, _warn("Pick a version from the history first."))
    if not reviewer:
        return _keep(state, _warn("Enter your name in “Reviewer” first. Nothing was restored."))
    try:
        ev = ctx.store.restore(state.image_id, int(event_id), reviewer=reviewer,
                               expected_version=state.loaded_version)
    except ConflictError as e:
        return _conflict_view(state, e, state.loaded_text)
    except MedArtError as e:
        return _keep(state, _warn(str(e)))
    return render(ctx, state, _notice(f"Restored the text of event #{event_id} (new event #{ev.id})."))


def live_edit(ctx, state: CaptionSession, text: str) -> dict:
    """Per keystroke: token counter, truncation preview, badges and diff against the draft (no I/O)."""
    draft = None
    if state.image_id is not None:
        cur_draft = ctx.store.current(state.image_id).latest_draft
        draft = cur_draft.text if cur_draft else None
    return _live_parts(ctx, state, text or "", draft)


# --- batches -------------------------------------------------------------------------------------
BATCH_OPS = ["find / replace", "prepend / append", "re-draft"]


def batch_preview(ctx, state: CaptionSession, op: str, find: str, replace: str, regex: bool, prefix: str,
                  suffix: str, drafter: str) -> dict:
    """Compute (and remember) every change the batch would make on the current filtered set."""
    if not state.dataset:
        return {"batch_table": [], "batch_notice": _warn("Pick a dataset first."), "state": state}
    try:
        states = ops.filter_states(ctx.store, state.dataset, state.flt, counter=counter_for(ctx))
        if op == "find / replace":
            changes = ops.preview_find_replace(states, find or "", replace or "", regex=bool(regex))
        elif op == "prepend / append":
            changes = ops.preview_affix(states, prefix=prefix or "", suffix=suffix or "")
        elif op == "re-draft":
            changes = ops.preview_redraft(ctx.store, state.dataset, states, drafter or "template")
        else:
            raise ConfigError(f"Unknown batch operation {op!r}.")
    except MedArtError as e:
        state.pending_batch = []
        return {"batch_table": [], "batch_notice": _warn(str(e)), "state": state}
    state.pending_batch = changes
    shown = ops.changes_table(changes[:PREVIEW_ROWS_SHOWN])
    msg = f"{len(changes)} of {len(states)} filtered caption(s) would change."
    if len(changes) > PREVIEW_ROWS_SHOWN:
        msg += f" Showing the first {PREVIEW_ROWS_SHOWN}."
    if changes:
        msg += " Review them, then press “Apply batch”."
    return {"batch_table": shown, "batch_notice": _notice(msg), "state": state}


def batch_apply(ctx, state: CaptionSession, reviewer: str | None = None) -> dict:
    if not state.pending_batch:
        out = _keep(state, _warn("Preview a batch first: only previewed changes are applied."))
        out.update({"batch_notice": out["notice"], "batch_table": gr.skip(), "batch_id": gr.skip()})
        return out
    if not reviewer:
        out = _keep(state, _warn("Enter your name in “Reviewer” first. Nothing was applied."))
        out.update({"batch_notice": out["notice"], "batch_table": gr.skip(), "batch_id": gr.skip()})
        return out
    result = ops.apply_batch(ctx.store, state.pending_batch, reviewer=reviewer)
    state.pending_batch = []
    state.last_batch = result.batch_id
    state.progress_html = _progress_html(ctx, state.dataset)
    out = render(ctx, state, _notice(result.summary()))
    out.update({"batch_notice": _notice(result.summary() + " Undo it with “Undo batch”."), "batch_table": [],
                "batch_id": result.batch_id})
    return out


def batch_undo(ctx, state: CaptionSession, batch_id: str | None, reviewer: str | None = None) -> dict:
    batch_id = (batch_id or "").strip() or state.last_batch
    try:
        report = ops.undo_batch(ctx.store, batch_id or "", reviewer=reviewer or "")
    except MedArtError as e:
        out = _keep(state, _warn(str(e)))
        out.update({"batch_notice": out["notice"], "batch_table": gr.skip(), "batch_id": gr.skip()})
        return out
    state.progress_html = _progress_html(ctx, state.dataset)
    out = render(ctx, state, _notice(report.summary()))
    out.update({"batch_notice": _notice(report.summary()), "batch_table": [], "batch_id": report.undo_batch_id or ""})
    return out


# --- export --------------------------------------------------------------------------------------
EXPORT_FORMATS = {"imagefolder": "export_imagefolder", "medart-csv": "export_medart_csv"}


def export(ctx, state: CaptionSession, fmt: str) -> str:
    """Export the dataset's approved captions into ``exports/<dataset>-<format>-<UTC timestamp>``."""
    if not state.dataset:
        return _warn("Pick a dataset first.")
    if fmt not in EXPORT_FORMATS:
        return _warn(f"Unknown export format {fmt!r}.")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    out_dir = Path(ctx.ws.exports_dir) / f"{state.dataset}-{fmt}-{stamp}"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        report = getattr(ctx.store, EXPORT_FORMATS[fmt])(ctx.ws, state.dataset, out_dir)
    except MedArtError as e:
        return _warn(str(e))
    return _notice(f"{report.exported} image(s) exported ({fmt}) to {report.out_dir}")


# --- load ----------------------------------------------------------------------------------------
def dataset_names(ctx) -> list[str]:
    return [d.name for d in ctx.store.list_datasets()]


def open_dataset(ctx, state: CaptionSession, dataset: str | None) -> dict:
    """Switch dataset: reset filters, refresh the class list."""
    labels = ctx.store.labels(dataset) if dataset else []
    out = apply_filters(ctx, state, dataset, ops.CaptionFilter())
    out["label_filter"] = gr.Dropdown(choices=[ANY] + labels, value=ANY)
    return out


# ------------------------------------------------------------------------------------------------
# UI
# ------------------------------------------------------------------------------------------------
def _shortcuts_html() -> str:
    keys = " ".join(f"<span><kbd>{_esc(k)}</kbd> {_esc(a)}</span>" for k, a, _ in SHORTCUTS)
    return f"<style>{CAPTION_CSS}</style><div class='cap-keys' id='cap-keys'>{keys}</div>"


def build_caption_tab(ctx) -> None:
    """Build the Captions tab inside the caller's ``gr.Tab`` (or any Blocks context)."""
    # The only thing the browser fetches from the workspace is the image being reviewed; serving the
    # datasets folder as static files avoids copying every viewed image into Gradio's cache.
    gr.set_static_paths([str(ctx.ws.datasets_dir)])
    tokenizer_for(ctx)            # load once at build time, not on the first keystroke

    names = dataset_names(ctx)          # refreshed on every page load; known now so API clients can pick one
    first = names[0] if names else None
    state = gr.State(CaptionSession())
    saved_name = gr.BrowserState("", storage_key="medart_reviewer")

    gr.HTML(_shortcuts_html(), js_on_load=KEYBOARD_JS, elem_id="cap-shortcuts")
    with gr.Row():
        dataset = gr.Dropdown(label="Dataset", choices=names, value=first, scale=2, elem_id="cap-dataset")
        reviewer = gr.Textbox(label="Reviewer (your name; remembered in this browser)", scale=2,
                              elem_id="cap-reviewer", max_length=MAX_REVIEWER_CHARS)
        refresh = gr.Button("Refresh list", scale=0, min_width=120, size="sm", elem_id="cap-refresh")
    with gr.Accordion("Filters", open=False):
        with gr.Row():
            status_f = gr.Dropdown(label="Status", choices=[ANY, *STATUSES], value=ANY, elem_id="cap-f-status")
            label_f = gr.Dropdown(label="Class", choices=[ANY] + (ctx.store.labels(first) if first else []),
                                  value=ANY, elem_id="cap-f-class")
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

    reviewer.change(lambda name: (name or "").strip()[:MAX_REVIEWER_CHARS], reviewer, saved_name,
                    api_name=False, show_progress="hidden", queue=False)

    def on_dataset(st, ds):
        return as_tuple(VIEW + ["label_filter"], open_dataset(ctx, st, ds))

    dataset.input(on_dataset, [state, dataset], view_out + [label_f], api_name="caption_open_dataset", **fast)

    def on_filters(st, ds, label, status, last_reviewer, edited, over_limit, search, regex):
        flt = filters_from_ui(label, status, last_reviewer, edited, over_limit, search, regex)
        return as_tuple(VIEW, apply_filters(ctx, st, ds, flt))

    apply_f.click(on_filters, [state, dataset] + filter_inputs, view_out, api_name="caption_filter", **fast)
    search_f.submit(on_filters, [state, dataset] + filter_inputs, view_out, api_name=False, **fast)

    def on_refresh(st, ds, label, status, last_reviewer, edited, over_limit, search, regex):
        names = dataset_names(ctx)
        flt = filters_from_ui(label, status, last_reviewer, edited, over_limit, search, regex)
        out = apply_filters(ctx, st, ds, flt, keep_position=True)
        return (gr.Dropdown(choices=names, value=ds),) + as_tuple(VIEW, out)

    refresh.click(on_refresh, [state, dataset] + filter_inputs, [dataset] + view_out, api_name="caption_refresh",
                  **fast)

    def nav(fn):
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

    def on_goto(st, pos, text, k, reviewer_name, request: gr.Request):
        return as_tuple(VIEW, go_to(ctx, st, pos, text, k, who(request, reviewer_name)))

    goto.submit(on_goto, [state, goto, editor, key, reviewer], view_out, api_name="caption_goto", **fast)

    def on_keep(st, mine_text, reviewer_name, request: gr.Request):
        return as_tuple(VIEW, keep_mine(ctx, st, mine_text, who(request, reviewer_name)))

    keep_b.click(on_keep, [state, mine, reviewer], view_out, api_name="caption_keep_mine", **fast)
    take_b.click(lambda st: as_tuple(VIEW, take_theirs(ctx, st)), [state], view_out, api_name="caption_take_theirs",
                 **fast)

    def on_comment(st, text, reviewer_name, request: gr.Request):
        return as_tuple(VIEW + ["comment"], add_comment(ctx, st, text, who(request, reviewer_name)))

    comment_b.click(on_comment, [state, comment, reviewer], view_out + [comment], api_name="caption_comment", **fast)

    def on_restore(st, ev_id, reviewer_name, request: gr.Request):
        return as_tuple(VIEW, restore_event(ctx, st, ev_id, who(request, reviewer_name)))

    restore_b.click(on_restore, [state, restore_dd, reviewer], view_out, api_name="caption_restore", **fast)

    editor.input(lambda st, text: as_tuple(LIVE, live_edit(ctx, st, text)), [state, editor],
                 [diff, tokens, badges], api_name="caption_live", show_progress="hidden", trigger_mode="always_last")

    batch_names = ["state", "batch_table", "batch_notice"]

    def on_preview(st, operation, find_text, replace_text, regex, prefix_text, suffix_text, drafter_name):
        return as_tuple(batch_names, batch_preview(ctx, st, operation, find_text, replace_text, regex, prefix_text,
                                                   suffix_text, drafter_name))

    preview_b.click(on_preview, [state, batch_op, find, repl, b_regex, prefix, suffix, drafter],
                    [comps[n] for n in batch_names], api_name="caption_batch_preview", **fast)
    batch_out_names = VIEW + ["batch_table", "batch_notice", "batch_id"]

    def on_apply(st, reviewer_name, request: gr.Request):
        return as_tuple(batch_out_names, batch_apply(ctx, st, who(request, reviewer_name)))

    apply_b.click(on_apply, [state, reviewer], [comps[n] for n in batch_out_names], api_name="caption_batch_apply",
                  **fast)

    def on_undo(st, bid, reviewer_name, request: gr.Request):
        return as_tuple(batch_out_names, batch_undo(ctx, st, bid, who(request, reviewer_name)))

    undo_b.click(on_undo, [state, batch_id, reviewer], [comps[n] for n in batch_out_names],
                 api_name="caption_batch_undo", **fast)

    exp_if.click(lambda st: export(ctx, st, "imagefolder"), [state], export_notice,
                 api_name="caption_export_imagefolder", **fast)
    exp_csv.click(lambda st: export(ctx, st, "medart-csv"), [state], export_notice,
                  api_name="caption_export_csv", **fast)
