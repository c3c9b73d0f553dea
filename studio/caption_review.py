"""The Captions tab's review panel: dataset and reviewer, filters, the image with its editor, the conflict
panel, comments and the history of the image.

Three layers, each plain module functions:

- actions ``(ctx, state, ...) -> {output name: value}`` (:func:`go_next`, :func:`save`, ...): each calls
  the review session (``medart_core.review.ReviewSession``) and renders its answer, so the bench
  (bench/caption_latency.py) and the tests time and call exactly what Gradio runs;
- events ``on_*(ctx, ...)``: what Gradio calls (``studio.forms.bind`` drops ``ctx``): resolve the reviewer
  from the request, call an action, order its outputs; forms arrive as ``{field: value}`` dicts;
- :func:`render_review` builds the components (layout only) and returns them by name;
  :func:`listen_review` wires them to the events.
"""
# No ``from __future__ import annotations``: Gradio inspects the real ``gr.Request`` annotations.
from typing import Any, Callable

import gradio as gr

from medart_core import caption_ops as ops
from medart_core.captions import STATUSES
from medart_core.constants import MAX_REVIEWER_CHARS

from .caption_view import (ANY, LIVE, VIEW, CaptionSession, _live_updates, _updates, keep_page,
                           resolve_reviewer)
from .errors import user_errors
from .forms import as_tuple, bind, inputs_of

HISTORY_HEADERS = ["event", "when (UTC)", "kind", "reviewer", "status", "text", "source", "note", "batch"]


# ------------------------------------------------------------------------------------------------
# Actions: plain functions of (ctx, state, ...) returning {output name: value}
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


# --- load ----------------------------------------------------------------------------------------
def dataset_names(ctx) -> list[str]:
    return [d.name for d in ctx.store.list_datasets()]



# ------------------------------------------------------------------------------------------------
# Events: what Gradio calls, as functions of (ctx, ...) returning the outputs in wiring order
# ------------------------------------------------------------------------------------------------
@user_errors
def on_load(ctx, st: CaptionSession, remembered: str, request: gr.Request) -> tuple:
    """Page load: the reviewer (the signed-in user, else the name this browser remembers), datasets, first image."""
    auth_name = resolve_reviewer(ctx, request, None)
    names = dataset_names(ctx)
    ds = names[0] if names else None
    out = open_dataset(ctx, st, ds)
    rev = gr.Textbox(value=auth_name, interactive=False) if auth_name else gr.Textbox(value=remembered or "")
    return (rev, gr.Dropdown(choices=names, value=ds)) + as_tuple(VIEW + ["label_filter"], out)


@user_errors
def on_reviewer(name: str | None) -> str:
    """What the browser remembers of the typed reviewer name."""
    return (name or "").strip()[:MAX_REVIEWER_CHARS]


@user_errors
def on_dataset(ctx, st: CaptionSession, ds: str | None) -> tuple:
    return as_tuple(VIEW + ["label_filter"], open_dataset(ctx, st, ds))


@user_errors
def on_filters(ctx, st: CaptionSession, ds: str | None, filters: dict) -> tuple:
    return as_tuple(VIEW, apply_filters(ctx, st, ds, filters_from_ui(**filters)))


@user_errors
def on_refresh(ctx, st: CaptionSession, ds: str | None, filters: dict) -> tuple:
    """Reload the dataset list and the filtered ids, staying on the image shown where it still matches."""
    names = dataset_names(ctx)
    out = apply_filters(ctx, st, ds, filters_from_ui(**filters), keep_position=True)
    return (gr.Dropdown(choices=names, value=ds),) + as_tuple(VIEW, out)


def _nav_event(action: Callable[..., dict]) -> Callable[..., tuple]:
    """The event of an editor button: ``action(ctx, state, text, key, reviewer)`` for the request's reviewer."""
    @user_errors
    def on_nav(ctx, st: CaptionSession, text: str, editor_key: str, reviewer_name: str,
               request: gr.Request) -> tuple:
        return as_tuple(VIEW, action(ctx, st, text, editor_key, resolve_reviewer(ctx, request, reviewer_name)))

    on_nav.__name__ = on_nav.__qualname__ = f"on_{action.__name__}"
    return on_nav


on_next, on_prev, on_next_pending = _nav_event(go_next), _nav_event(go_prev), _nav_event(go_next_pending)
on_save, on_approve, on_reject = _nav_event(save), _nav_event(approve_next), _nav_event(reject_next)
on_second_read = _nav_event(second_read_next)

# (button name, event, api_name) of the editor's buttons, in the order they are wired.
NAV_BUTTONS: list[tuple[str, Callable[..., tuple], str]] = [
    ("next", on_next, "caption_next"), ("prev", on_prev, "caption_prev"),
    ("next_pending", on_next_pending, "caption_next_pending"), ("save", on_save, "caption_save"),
    ("approve", on_approve, "caption_approve_next"), ("reject", on_reject, "caption_reject_next"),
    ("second", on_second_read, "caption_second_read_next"),
]


@user_errors
def on_goto(ctx, st: CaptionSession, pos: int | float | None, text: str, k: str, reviewer_name: str,
            request: gr.Request) -> tuple:
    return as_tuple(VIEW, go_to(ctx, st, pos, text, k, resolve_reviewer(ctx, request, reviewer_name)))


@user_errors
def on_keep(ctx, st: CaptionSession, mine_text: str, reviewer_name: str, request: gr.Request) -> tuple:
    return as_tuple(VIEW, keep_mine(ctx, st, mine_text, resolve_reviewer(ctx, request, reviewer_name)))


@user_errors
def on_take(ctx, st: CaptionSession) -> tuple:
    return as_tuple(VIEW, take_theirs(ctx, st))


@user_errors
def on_comment(ctx, st: CaptionSession, text: str, reviewer_name: str, request: gr.Request) -> tuple:
    return as_tuple(VIEW + ["comment"], add_comment(ctx, st, text, resolve_reviewer(ctx, request, reviewer_name)))


@user_errors
def on_restore(ctx, st: CaptionSession, ev_id: int | None, reviewer_name: str, request: gr.Request) -> tuple:
    return as_tuple(VIEW, restore_event(ctx, st, ev_id, resolve_reviewer(ctx, request, reviewer_name)))


@user_errors
def on_live(ctx, st: CaptionSession, text: str) -> tuple:
    return as_tuple(LIVE, live_edit(ctx, st, text))


# ------------------------------------------------------------------------------------------------
# Layout: components only, returned by name (the wiring is listen_review)
# ------------------------------------------------------------------------------------------------
def _toolbar() -> dict[str, Any]:
    # No workspace data in build-time values: /config and the page are the same for everyone, signed in or
    # not. The dataset list and classes come with the guarded page load; API clients may name any dataset
    # (allow_custom_value), and the library refuses one that does not exist.
    with gr.Row():
        dataset = gr.Dropdown(label="Dataset", choices=[], value=None, scale=2, elem_id="cap-dataset",
                              allow_custom_value=True)
        reviewer = gr.Textbox(label="Reviewer (your name; remembered in this browser)", scale=2,
                              elem_id="cap-reviewer", max_length=MAX_REVIEWER_CHARS)
        refresh = gr.Button("Refresh list", scale=0, min_width=120, size="sm", elem_id="cap-refresh")
    return {"dataset": dataset, "reviewer": reviewer, "refresh": refresh}


def _filters() -> dict[str, Any]:
    """The filter accordion; ``filters`` is its form, named as filters_from_ui's parameters, in their order
    (the API's inputs of caption_filter/caption_refresh)."""
    with gr.Accordion("Filters", open=False):
        with gr.Row():
            status = gr.Dropdown(label="Status", choices=[ANY, *STATUSES], value=ANY, elem_id="cap-f-status")
            label = gr.Dropdown(label="Class", choices=[ANY], value=ANY, elem_id="cap-f-class",
                                allow_custom_value=True)
            reviewer = gr.Textbox(label="Last reviewer", elem_id="cap-f-reviewer")
            edited = gr.Radio(["any", "edited", "unedited"], value="any", label="Edited by a human")
        with gr.Row():
            search = gr.Textbox(label="Text search", scale=3, elem_id="cap-f-search")
            regex = gr.Checkbox(label="regex", value=False)
            over_limit = gr.Checkbox(label=f"over {ops.MAX_TOKENS} tokens", value=False)
            apply = gr.Button("Apply filters", variant="primary", elem_id="cap-apply-filters")
    form = {"label": label, "status": status, "reviewer": reviewer, "edited": edited, "over_limit": over_limit,
            "search": search, "regex": regex}
    return {"filters": form, "label_filter": label, "apply_filters": apply}


def _viewer() -> dict[str, Any]:
    image = gr.Image(type="filepath", interactive=False, height=520, label="Image", elem_id="cap-image",
                     buttons=["fullscreen"])
    with gr.Row():
        goto = gr.Number(label="Go to #", value=None, precision=0, scale=1, elem_id="cap-goto")
        prev_b = gr.Button("◀ Previous (Alt+←)", elem_id="cap-prev", scale=2)
        next_b = gr.Button("Next ▶ (Alt+→)", elem_id="cap-next", scale=2)
        pend_b = gr.Button("Next pending (Alt+P)", elem_id="cap-next-pending", scale=2)
    return {"image": image, "goto": goto, "prev": prev_b, "next": next_b, "next_pending": pend_b}


def _conflict() -> dict[str, Any]:
    with gr.Group(visible=False, elem_id="cap-conflict") as conflict:
        gr.Markdown("**Conflict:** this caption was changed by someone else after you opened it.")
        with gr.Row():
            theirs = gr.Textbox(label="Theirs (saved now)", interactive=False, lines=4, elem_id="cap-theirs")
            mine = gr.Textbox(label="Yours (not saved)", interactive=True, lines=4, elem_id="cap-mine")
        with gr.Row():
            keep_b = gr.Button("Keep mine", variant="primary", elem_id="cap-keep-mine")
            take_b = gr.Button("Take theirs", elem_id="cap-take-theirs")
    return {"conflict": conflict, "theirs": theirs, "mine": mine, "keep_mine": keep_b, "take_theirs": take_b}


def _editor() -> dict[str, Any]:
    c: dict[str, Any] = {
        "editor": gr.Textbox(label="Caption (Alt+E to focus)", lines=6, max_lines=16, interactive=True,
                             elem_id="cap-editor", max_length=4000),
        "key": gr.Textbox(visible=False, elem_id="cap-key"),
        "tokens": gr.HTML(elem_id="cap-tokens", js_on_load=None),
        "badges": gr.HTML(elem_id="cap-badges", js_on_load=None)}
    with gr.Row():
        c["save"] = gr.Button("Save (Ctrl+S)", elem_id="cap-save", variant="secondary")
        c["approve"] = gr.Button("Approve & next (Alt+A)", elem_id="cap-approve", variant="primary")
        c["reject"] = gr.Button("Reject & next (Alt+R)", elem_id="cap-reject", variant="stop")
        c["second"] = gr.Button("2nd read & next (Alt+N)", elem_id="cap-second")
    c["notice"] = gr.HTML(elem_id="cap-notice", js_on_load=None)
    c.update(_conflict())
    c["draft"] = gr.Textbox(label="Latest draft", interactive=False, lines=3, elem_id="cap-draft")
    gr.Markdown("Your caption against the draft (struck out: removed, highlighted: added)")
    c["diff"] = gr.HTML(elem_id="cap-diff", js_on_load=None)
    with gr.Row():
        c["comment"] = gr.Textbox(label="Comment", scale=4, elem_id="cap-comment")
        c["comment_btn"] = gr.Button("Add comment", scale=1, elem_id="cap-comment-btn")
    return c


def _history() -> dict[str, Any]:
    with gr.Accordion("History of this image", open=False):
        history = gr.Dataframe(headers=HISTORY_HEADERS, datatype="str", interactive=False, wrap=True,
                               elem_id="cap-history", max_height=360,
                               column_widths=["70px", "150px", "70px", "110px", "130px", "40%", "100px", "140px",
                                              "140px"])
        with gr.Row():
            restore = gr.Dropdown(label="Version to restore", choices=[], scale=4, elem_id="cap-restore-pick")
            restore_b = gr.Button("Restore this version", scale=1, elem_id="cap-restore")
    return {"history": history, "restore": restore, "restore_btn": restore_b}


def render_review() -> dict[str, Any]:
    """Lay out the review panel in the current Blocks context; its components by name."""
    c = {**_toolbar(), **_filters()}
    c["progress"] = gr.HTML(elem_id="cap-progress", js_on_load=None)
    c["position"] = gr.HTML(elem_id="cap-position", js_on_load=None)
    with gr.Row():
        with gr.Column(scale=5):
            c.update(_viewer())
        with gr.Column(scale=6):
            c.update(_editor())
    c.update(_history())
    return c


# ------------------------------------------------------------------------------------------------
# Wiring
# ------------------------------------------------------------------------------------------------
FAST = dict(show_progress="hidden", trigger_mode="once")


def _listen_lists(ctx, c: dict[str, Any], view_out: list) -> None:
    """Page load, reviewer name, dataset, filters and refresh."""
    st, ds, filters = c["state"], c["dataset"], c["filters"]
    root = gr.context.Context.root_block
    if root is not None:
        root.load(bind(ctx, on_load), [st, c["saved_name"]], [c["reviewer"], ds] + view_out + [c["label_filter"]],
                  api_name="caption_load", show_progress="hidden")
    c["reviewer"].change(on_reviewer, c["reviewer"], c["saved_name"], api_name=False, show_progress="hidden",
                         queue=False)
    ds.input(bind(ctx, on_dataset), [st, ds], view_out + [c["label_filter"]], api_name="caption_open_dataset",
             **FAST)
    filter_in = inputs_of(st, ds, filters)
    apply_filters_event = bind(ctx, on_filters, filters=list(filters))
    c["apply_filters"].click(apply_filters_event, filter_in, view_out, api_name="caption_filter", **FAST)
    filters["search"].submit(apply_filters_event, filter_in, view_out, api_name=False, **FAST)
    c["refresh"].click(bind(ctx, on_refresh, filters=list(filters)), filter_in, [ds] + view_out,
                       api_name="caption_refresh", **FAST)


def listen_review(ctx, c: dict[str, Any]) -> None:
    """Wire the review panel's components (``render_review``'s, plus ``state`` and ``saved_name``)."""
    view_out = [c[k] for k in VIEW]
    st, reviewer = c["state"], c["reviewer"]
    _listen_lists(ctx, c, view_out)
    nav_in = [st, c["editor"], c["key"], reviewer]
    for button, event, api_name in NAV_BUTTONS:
        c[button].click(bind(ctx, event), nav_in, view_out, api_name=api_name, **FAST)
    c["goto"].submit(bind(ctx, on_goto), [st, c["goto"], c["editor"], c["key"], reviewer], view_out,
                     api_name="caption_goto", **FAST)
    c["keep_mine"].click(bind(ctx, on_keep), [st, c["mine"], reviewer], view_out, api_name="caption_keep_mine",
                         **FAST)
    c["take_theirs"].click(bind(ctx, on_take), [st], view_out, api_name="caption_take_theirs", **FAST)
    c["comment_btn"].click(bind(ctx, on_comment), [st, c["comment"], reviewer], view_out + [c["comment"]],
                           api_name="caption_comment", **FAST)
    c["restore_btn"].click(bind(ctx, on_restore), [st, c["restore"], reviewer], view_out,
                           api_name="caption_restore", **FAST)
    c["editor"].input(bind(ctx, on_live), [st, c["editor"]], [c[k] for k in LIVE], api_name="caption_live",
                      show_progress="hidden", trigger_mode="always_last")

