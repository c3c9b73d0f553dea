"""The Compare tab: FD/KID/PRDC of checkpoints under one recorded protocol, a side-by-side grid with the same
prompts and seeds in every column, blind review by clinicians, and the ablation in miniature.

Each sub-tab is a panel module with its layout apart from its wiring: ``studio.compare_metrics`` (the
metric profile, the ``evaluate`` job through the shared ``studio.job_panel.JobPanel``, the results table),
``studio.compare_side`` (the grid, slider, export), ``studio.compare_blind`` (blind review) and
``studio.ablation_panel``. This module assembles them, and wires what spans panels: the page load, the
job's tick (which fills Metrics and Side by side once the job is done) and loading saved results.

* Roles: the tab is for trainers; the handlers a blind reviewer needs (page load, start, votes) are marked
  ``@requires(ANNOTATOR)`` so clinicians with the annotator role can review.

Every handler is a plain module-level function of ``(ctx, ...)`` wrapped in ``studio.errors.user_errors``
where it is wired, so tests call them directly and library errors reach the user as messages.
"""
# No ``from __future__ import annotations``: Gradio inspects the real ``gr.Request`` annotation of the
# handlers below to inject the request.
from typing import Any

import gradio as gr

from medart_core.accounts import ANNOTATOR

from .ablation_panel import build_ablation_panel
from .auth import requires
from .compare_blind import (HEAD_JS, KEYBOARD_JS, SHORTCUTS, blind_results_html, blind_view,  # noqa: F401
                            blind_vote, coordinator_results, create_study, listen_blind, next_study_name,
                            render_blind, study_names)
from .compare_metrics import (EXTRACTORS, FORM_FIELDS, LOG_LINES, METRIC_LABEL, METRICS,  # noqa: F401
                              checkpoint_choices, compare_view, dataset_names, evaluation_panel, form_values,
                              listen_metrics, make_spec, metric_by_step, per_class_frame, pick_results,
                              random_labels, render_metrics, result_choices, result_ids, results_by_ids,
                              submit_evaluation, table_html, view_components, view_updates, warnings_html)
from .compare_side import (ALL, MAX_GRID_ROWS, REAL, export_grid, grid_components, grid_for,  # noqa: F401
                           grid_rows, grid_updates, grid_view, listen_side, render_side, slider_images)
from .context import StudioContext
from .errors import user_errors
from .job_panel import JobPanel, only

POLL_S = 2.0
QUIET = dict(show_progress="hidden")

CSS = """
.cmp-table {border-collapse: collapse; font-size: .92rem; width: 100%;}
.cmp-table th, .cmp-table td {border-bottom: 1px solid #9994; padding: .25rem .5rem; text-align: right;}
.cmp-table th:first-child, .cmp-table td:first-child {text-align: left;}
.cmp-table .cmp-best {font-weight: 700; background: #16a34a22;}
.cmp-table tr.cmp-other td {color: #9ca3af; font-style: italic;}
.cmp-table tr.cmp-reason td {color: #9ca3af; font-size: .82rem; text-align: left; border-bottom: 1px solid #9996;}
.cmp-legend, .cmp-note {font-size: .85rem; opacity: .85;}
.cmp-warn {background: #f59e0b2e; border-left: 4px solid #d97706; padding: .25rem .5rem; margin: .2rem 0;}
.cmp-keys {display: flex; flex-wrap: wrap; gap: .35rem .9rem; font-size: .85rem; opacity: .85;}
.cmp-keys kbd {border: 1px solid #9994; border-bottom-width: 2px; border-radius: 4px; padding: 0 .3rem;
  font-family: ui-monospace, monospace; font-size: .8rem;}
.blind-pos {font-size: 1.05rem; font-weight: 600;}
#blind-left-img img, #blind-right-img img {width: 100%; height: 100%; object-fit: contain; image-rendering: auto;}
.medart-random {color: #b45309; font-weight: 600;}
"""
LAUNCH_CSS = CSS


def render_compare_tab(ctx: StudioContext, panel: JobPanel) -> dict[str, Any]:
    """Lay the sub-tabs out; their components by name."""
    c: dict[str, Any] = {}
    # The styles also come with LAUNCH_CSS; inline too, so the tab looks right in any Blocks.
    gr.HTML(f"<style>{CSS}</style>", padding=False)
    with gr.Tabs():
        with gr.Tab("Metrics", id="cmp-metrics"):
            render_metrics(c, panel)
        with gr.Tab("Side by side", id="cmp-side"):
            render_side(c)
        with gr.Tab("Blind review", id="cmp-blind"):
            render_blind(c)
        with gr.Tab("Ablation", id="cmp-ablation") as ablation_tab:
            c["ablation"] = build_ablation_panel(ctx, ablation_tab)
    c["timer"] = panel.render_timer()
    return c


def _listen_load(ctx: StudioContext, c: dict[str, Any], panel: JobPanel) -> None:
    """Page load: choices, the reviewer, and the user's running evaluation (which re-arms the timer). The tab
    is for trainers (studio.app.TABS); what a blind reviewer needs is open to annotators."""
    outputs = [c["checkpoints"], c["dataset"], c["b_study"], c["b_reviewer"], c["job"], c["status"], c["timer"],
               c["stop"]]

    @requires(ANNOTATOR)
    @user_errors
    def on_load(remembered: str, request: gr.Request):
        owner = ctx.reviewer_for(request, None)
        ds = dataset_names(ctx)
        # No remembered name: leave the field alone, or a name typed while the page loads would be wiped.
        rev = (gr.Textbox(value=owner, interactive=False) if owner else
               gr.Textbox(value=remembered) if remembered else gr.Textbox())
        return only({**panel.updates(panel.view(panel.active_job(owner))),
                     c["checkpoints"]: gr.Dropdown(choices=checkpoint_choices(ctx)),
                     c["dataset"]: gr.Dropdown(choices=ds, value=ds[0] if ds else None),
                     c["b_study"]: gr.Dropdown(choices=study_names(ctx)), c["b_reviewer"]: rev}, outputs)

    root = gr.context.Context.root_block
    if root is not None:
        root.load(on_load, [c["b_saved_name"]], outputs, api_name="compare_page_load", **QUIET)


def _listen_results(ctx: StudioContext, c: dict[str, Any], panel: JobPanel) -> None:
    """What fills Metrics and Side by side together: the job's tick (once it is done), Load results, and a
    change of the results shown."""
    def all_updates(ids, metric, label, max_rows, dataset) -> dict[Any, Any]:
        choices = result_choices(ctx, dataset or None)
        return {c["results"]: gr.Dropdown(choices=choices, value=list(ids)), **view_updates(ctx, c, ids, metric),
                **grid_updates(ctx, c, ids, label, max_rows)}

    def show(job_id, metric, label, max_rows, dataset) -> dict[Any, Any]:
        v = panel.view(job_id)
        ids = result_ids(v.job)
        # Views are built once, when the job is done; until then a tick is one job row and a bounded log tail.
        return {**panel.updates(v), **(all_updates(ids, metric, label, max_rows, dataset) if ids else {})}

    shown = [c["results"], *view_components(c), *grid_components(c)]
    panel.listen(show, [c["metric"], c["grid_class"], c["grid_max"], c["dataset"]],
                 [c["status"], c["log"], c["timer"], c["stop"], *shown],
                 stop_outputs=[c["status"], c["stop"]], stop_show=panel.show)

    @user_errors
    def on_load_results(dataset, checkpoints, metric, label, max_rows):
        return all_updates(pick_results(ctx, dataset, checkpoints), metric, label, max_rows, dataset)

    c["load"].click(on_load_results, [c["dataset"], c["checkpoints"], c["metric"], c["grid_class"], c["grid_max"]],
                    shown, api_name="compare_load")

    @user_errors
    def on_show(ids, metric, label, max_rows):
        return {**view_updates(ctx, c, ids, metric), **grid_updates(ctx, c, ids, label, max_rows)}

    c["results"].input(on_show, [c["results"], c["metric"], c["grid_class"], c["grid_max"]], shown[1:],
                       api_name="compare_show", **QUIET)


def build_compare_tab(ctx: StudioContext) -> dict[str, Any]:
    """Build the Compare tab inside the caller's ``gr.Tab`` (or any Blocks); returns its components by name."""
    # The grid shows real images (datasets) and evaluation images (samples) as they are on disk; blind-review
    # images never come from these folders (they are fresh PIL images, served from Gradio's cache).
    ctx.ws.samples_dir.mkdir(parents=True, exist_ok=True)
    gr.set_static_paths([str(ctx.ws.datasets_dir), str(ctx.ws.samples_dir)])
    # No workspace data at build time: the dataset list comes with the guarded page load.
    panel = evaluation_panel(ctx)
    c = render_compare_tab(ctx, panel)
    _listen_load(ctx, c, panel)
    listen_metrics(ctx, c, panel)
    _listen_results(ctx, c, panel)
    listen_side(ctx, c)
    listen_blind(ctx, c)
    return c
