"""The Captions tab: where clinicians review, edit and sign off captions, one image at a time.

What happens on each action (save before move, conflicts, next pending, batches) is decided by
:class:`medart_core.review.ReviewSession`; the tab renders its answers. The tab is four modules:

- this one: the keyboard shortcuts and styles, and :func:`build_caption_tab` (layout, then wiring);
- ``studio.caption_view``: the review session's view data as Gradio updates, by output name;
- ``studio.caption_review``: the review panel (filters, image, editor, conflict, history);
- ``studio.caption_batch``: the batch and export panels.

Each panel has actions (plain module functions ``(ctx, state, ...) -> dict``, so the bench
(bench/caption_latency.py) times exactly what Gradio runs), events ``on_*(ctx, ...)`` (forms as named
dicts), a ``render_*`` that only lays out and a ``listen_*`` that only wires. Every name tests and the
bench use is importable from here.

- keyboard first: Alt+→/← next/previous, Alt+A approve & next, Alt+R reject & next, Alt+N second read
  & next, Alt+P next pending, Alt+E focus editor, Ctrl+S/Alt+S save (see ``KEYBOARD_JS``);
- a stale write opens a conflict panel (theirs vs yours); nothing is ever silently overwritten;
- 10,000 images: the browser only ever gets the current image;
- library errors go through ``studio.errors.user_errors``: a toast plus the inline notice, the page (and
  the text in the editor) left as it is;
- caption text is data, never markup: textboxes show it as text, HTML pieces are escaped (studio.render);
- roles: the tab needs annotator (``studio.app.TABS``); the caption exports need admin (``@requires``).
"""
from typing import Any

import gradio as gr

from .caption_batch import (PREVIEW_HEADERS, batch_apply, batch_preview, batch_undo, export, listen_batch,
                            render_batch, render_export)
from .caption_review import (HISTORY_HEADERS, add_comment, apply_filters, approve_next, dataset_names,
                             filters_from_ui, go_next, go_next_pending, go_prev, go_to, keep_mine, listen_review,
                             live_edit, open_dataset, reject_next, render, render_review, restore_event, save,
                             second_read_next, set_status_and_next, take_theirs)
from .caption_view import ANY, LIVE, VIEW, CaptionSession, keep_page, resolve_reviewer
from .render import esc

__all__ = ["ANY", "CAPTION_CSS", "HEAD_JS", "HISTORY_HEADERS", "KEYBOARD_JS", "LIVE", "PREVIEW_HEADERS",
           "SHORTCUTS", "VIEW", "CaptionSession", "add_comment", "apply_filters", "approve_next", "batch_apply",
           "batch_preview", "batch_undo", "build_caption_tab", "dataset_names", "export", "filters_from_ui",
           "go_next", "go_next_pending", "go_prev", "go_to", "keep_mine", "keep_page", "layout", "live_edit",
           "open_dataset", "reject_next", "render", "resolve_reviewer", "restore_event", "save",
           "second_read_next", "set_status_and_next", "take_theirs"]

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



# ------------------------------------------------------------------------------------------------
# The tab
# ------------------------------------------------------------------------------------------------
def _shortcuts_html() -> str:
    keys = " ".join(f"<span><kbd>{esc(k)}</kbd> {esc(a)}</span>" for k, a, _ in SHORTCUTS)
    return f"<style>{CAPTION_CSS}</style><div class='cap-keys' id='cap-keys'>{keys}</div>"


def layout() -> dict[str, Any]:
    """Lay out the whole tab in the current Blocks context (no events); its components by name."""
    c: dict[str, Any] = {"state": gr.State(CaptionSession()),
                         "saved_name": gr.BrowserState("", storage_key="medart_reviewer")}
    gr.HTML(_shortcuts_html(), js_on_load=KEYBOARD_JS, elem_id="cap-shortcuts")
    c.update(render_review())
    c.update(render_batch())
    c.update(render_export())
    return c


def build_caption_tab(ctx) -> None:
    """Build the Captions tab inside the caller's ``gr.Tab`` (or any Blocks context)."""
    # The only thing the browser fetches from the workspace is the image being reviewed; serving the
    # datasets folder as static files avoids copying every viewed image into Gradio's cache.
    gr.set_static_paths([str(ctx.ws.datasets_dir)])
    # The tokenizer is not loaded here: building the page must not wait for it. ``app.py`` warms it up once
    # the server is serving (StudioContext.warm_up); otherwise the first token count loads it.
    c = layout()
    listen_review(ctx, c)
    listen_batch(ctx, c)
