"""The Captions tab's batch and export panels: find/replace, prepend/append and re-draft on the filtered
set (previewed, applied and undone as one unit), and the export of approved captions.

As in ``studio.caption_review``: actions ``(ctx, state, ...) -> {output name: value}`` call the review
session; events ``on_*(ctx, ...)`` are what Gradio calls (the batch form arrives as a ``{field: value}``
dict); :func:`render_batch`/:func:`render_export` lay out, :func:`listen_batch` wires. The exports need
admin (``@requires``); the rest of the tab, annotator.
"""
# No ``from __future__ import annotations``: Gradio inspects the real ``gr.Request`` annotations.
from typing import Any

import gradio as gr

from medart_core import caption_ops as ops
from medart_core.accounts import ADMIN
from medart_core.review import BATCH_OPS

from .auth import requires
from .caption_review import FAST
from .caption_view import (VIEW, CaptionSession, _batch_kept, _batch_updates, _notice, _notice_kept,
                           _preview_kept, resolve_reviewer)
from .errors import user_errors
from .forms import as_tuple, bind, inputs_of

PREVIEW_HEADERS = ["image", "file", "class", "before", "after"]
BATCH_PREVIEW = ["state", "batch_table", "batch_notice"]
BATCH_OUT = VIEW + ["batch_table", "batch_notice", "batch_id"]


# --- actions -------------------------------------------------------------------------------------
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


# --- events --------------------------------------------------------------------------------------
@user_errors
def on_preview(ctx, st: CaptionSession, batch: dict) -> tuple:
    """``batch``: the batch form, named as batch_preview's parameters."""
    return as_tuple(BATCH_PREVIEW, batch_preview(ctx, st, **batch))


@user_errors
def on_apply(ctx, st: CaptionSession, reviewer_name: str, request: gr.Request) -> tuple:
    return as_tuple(BATCH_OUT, batch_apply(ctx, st, resolve_reviewer(ctx, request, reviewer_name)))


@user_errors
def on_undo(ctx, st: CaptionSession, bid: str | None, reviewer_name: str, request: gr.Request) -> tuple:
    return as_tuple(BATCH_OUT, batch_undo(ctx, st, bid, resolve_reviewer(ctx, request, reviewer_name)))


@requires(ADMIN)
@user_errors
def on_export_imagefolder(ctx, st: CaptionSession) -> str:
    return export(ctx, st, "imagefolder")


@requires(ADMIN)
@user_errors
def on_export_csv(ctx, st: CaptionSession) -> str:
    return export(ctx, st, "medart-csv")


# --- layout --------------------------------------------------------------------------------------
def render_batch() -> dict[str, Any]:
    """The batch accordion; ``batch`` is its form, named as batch_preview's parameters, in their order (the
    API's inputs of caption_batch_preview)."""
    with gr.Accordion("Batch operations on the filtered set", open=False):
        with gr.Row():
            op = gr.Radio(BATCH_OPS, value=BATCH_OPS[0], label="Operation")
            drafter = gr.Dropdown(ops.available_drafters(), value="template", label="Drafter (re-draft)")
        with gr.Row():
            find = gr.Textbox(label="Find", elem_id="cap-b-find")
            replace = gr.Textbox(label="Replace with", elem_id="cap-b-replace")
            regex = gr.Checkbox(label="regex", value=True)
        with gr.Row():
            prefix = gr.Textbox(label="Prepend (include a trailing space)", elem_id="cap-b-prefix")
            suffix = gr.Textbox(label="Append (include a leading space)", elem_id="cap-b-suffix")
        with gr.Row():
            preview_b = gr.Button("Preview changes", elem_id="cap-b-preview")
            apply_b = gr.Button("Apply batch", variant="primary", elem_id="cap-b-apply")
            batch_id = gr.Textbox(label="Batch id (for undo)", elem_id="cap-b-id")
            undo_b = gr.Button("Undo batch", variant="stop", elem_id="cap-b-undo")
        notice = gr.HTML(js_on_load=None, elem_id="cap-b-notice")
        table = gr.Dataframe(headers=PREVIEW_HEADERS, datatype="str", interactive=False, wrap=True,
                             max_height=420, elem_id="cap-b-table",
                             column_widths=["70px", "200px", "120px", "35%", "35%"])
    form = {"op": op, "find": find, "replace": replace, "regex": regex, "prefix": prefix, "suffix": suffix,
            "drafter": drafter}
    return {"batch": form, "batch_preview": preview_b, "batch_apply": apply_b, "batch_id": batch_id,
            "batch_undo": undo_b, "batch_notice": notice, "batch_table": table}


def render_export() -> dict[str, Any]:
    with gr.Accordion("Export approved captions", open=False):
        with gr.Row():
            exp_if = gr.Button("Export imagefolder (Hugging Face datasets)", elem_id="cap-export-if")
            exp_csv = gr.Button("Export Med-Art CSV", elem_id="cap-export-csv")
        notice = gr.HTML(js_on_load=None, elem_id="cap-export-notice")
    return {"export_imagefolder": exp_if, "export_csv": exp_csv, "export_notice": notice}


# --- wiring --------------------------------------------------------------------------------------
def listen_batch(ctx, c: dict[str, Any]) -> None:
    """Wire the batch and export panels (``render_batch``'s and ``render_export``'s components, plus the
    review panel's outputs: applying or undoing a batch redraws the image)."""
    st, reviewer, form = c["state"], c["reviewer"], c["batch"]
    c["batch_preview"].click(bind(ctx, on_preview, batch=list(form)), inputs_of(st, form),
                             [c[n] for n in BATCH_PREVIEW], api_name="caption_batch_preview", **FAST)
    c["batch_apply"].click(bind(ctx, on_apply), [st, reviewer], [c[n] for n in BATCH_OUT],
                           api_name="caption_batch_apply", **FAST)
    c["batch_undo"].click(bind(ctx, on_undo), [st, c["batch_id"], reviewer], [c[n] for n in BATCH_OUT],
                          api_name="caption_batch_undo", **FAST)
    c["export_imagefolder"].click(bind(ctx, on_export_imagefolder), [st], c["export_notice"],
                                  api_name="caption_export_imagefolder", **FAST)
    c["export_csv"].click(bind(ctx, on_export_csv), [st], c["export_notice"], api_name="caption_export_csv",
                          **FAST)
