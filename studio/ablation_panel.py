"""The Compare tab's "Ablation" panel: the paper's ablation in miniature (``medart_core.ablation``), run as an
``ablation`` job (on the "Run on" executor) and read back from the workspace — the table with its verdicts and
each cell's sample strip (real images above generated ones). On a Slurm executor the job runs one array task
per cell (``medart_core.fanout``) and its status line counts them ("cells: 2 pending · 1 running · 3 done").
The library does the work; this module only lays it out.
"""
# No ``from __future__ import annotations``: Gradio inspects the real ``gr.Request`` annotation.
from typing import Any

import gradio as gr

from medart_core import ablation as A
from medart_core.constants import DEMO_LABEL
from medart_core.errors import ConfigError
from medart_core.executors import LOCAL
from medart_core.jobs import Job

from .context import StudioContext
from .errors import user_errors
from .executors_panel import chosen_executor, run_on_dropdown, run_on_update
from .job_panel import JobPanel, only
from .render import esc

PRESET_CHOICES = [("mini — 6 rows + reference x 4 seeds, ~23 min on 2 CPU cores", "mini"),
                  ("smoke — the same code for a few steps, ~2 min (checks the pipeline, not the method)", "smoke")]
INTRO = (f"Table 3 of the paper in miniature: the **{DEMO_LABEL}** fine-tuned on a colour-shifted set of its own "
         "fundus and histology images, once per row and seed; colour-moment gap, domain FD and KID per row with "
         "95 % intervals over seeds, and which of the paper's claims hold. Also from the command line: "
         "`python -m medart_core ablation --preset mini`. Method and caveats: `bench/RESULTS.md`.")


def ablation_choices(ctx: StudioContext) -> list[tuple[str, str]]:
    out = []
    for d in A.list_ablations(ctx.ws):
        state = "finished" if d["finished"] else f"{d['cells_done']}/{d['cells']} cells"
        out.append((f"{d['name']} ({state})", d["name"]))
    return out


def show_ablation(ctx: StudioContext, name: str | None) -> tuple[str, Any, list[tuple[Any, str]]]:
    """(markdown, overview image, gallery items) of one saved ablation; images are loaded here (served from
    Gradio's cache), so no workspace folder needs to be a static path."""
    from PIL import Image

    if not name:
        return "No ablation yet: run one below (or with the command line).", None, []
    info = A.load_ablation(ctx.ws, name)
    if info["table_md"] is None:
        md = (f"**{esc(name)}** is not finished: {info['cells_done']} of {info['cells']} cells done. Run it again "
              "(or resume its job) to finish; finished cells are kept.")
    else:
        md = info["table_md"]
    items = []
    for path, label in info["strips"]:
        with Image.open(path) as im:
            items.append((im.convert("RGB"), f"{label}: real (top), generated (bottom)"))
    return md, A.overview_image(info["strips"]), items


def submit_ablation(ctx: StudioContext, owner: str | None, preset: str | None, executor: str = LOCAL) -> Job:
    """Queue an ``ablation`` job of ``preset`` to run on ``executor``."""
    if preset not in A.PRESETS:
        raise ConfigError(f"Choose a preset: {', '.join(sorted(A.PRESETS))}.")
    return ctx.executor.submit("ablation", {"preset": preset}, owner=owner, executor=executor)


def job_text(ctx: StudioContext, job_id: str | None) -> tuple[str, bool]:
    """The job's status line and whether it is still queued or running."""
    v = JobPanel(ctx, kind="ablation", api="ablation").view(job_id)
    return v.text, v.active


def build_ablation_panel(ctx: StudioContext, tab: Any = None) -> dict[str, Any]:
    """Lay the panel out in the current Blocks context; ``tab`` (its ``gr.Tab``) refreshes it when selected."""
    panel = JobPanel(ctx, kind="ablation", api="ablation")
    c = render_ablation_panel(panel)
    listen_ablation_panel(ctx, c, panel, tab)
    return c


def render_ablation_panel(panel: JobPanel) -> dict[str, Any]:
    """The layout: saved ablations, the overview and every cell, then the preset and its job."""
    c: dict[str, Any] = {}
    gr.Markdown(INTRO)
    with gr.Row():
        c["which"] = gr.Dropdown([], label="Saved ablation", scale=4, allow_custom_value=True)
        c["refresh"] = gr.Button("↻", size="sm", scale=0, min_width=40)
    c["table"] = gr.Markdown()
    c["overview"] = gr.Image(label="At a glance: real images, then each row's generated images (first seed)",
                             type="pil", interactive=False)
    with gr.Accordion("Every cell (row and seed)", open=False):
        c["strips"] = gr.Gallery(label="Cells: real images (top) and the first generated image of each (bottom)",
                                 columns=4, object_fit="contain")
    with gr.Row():
        c["preset"] = gr.Dropdown(PRESET_CHOICES, value="mini", label="Preset", scale=3)
        c["run_on"] = run_on_dropdown("ablation-run-on", scale=2)
        c["run"] = gr.Button("Run as a job", variant="primary", scale=1)
    panel.render(show_job=False)
    c["job"], c["status"], c["timer"] = panel.job, panel.status, panel.timer
    return c


def listen_ablation_panel(ctx: StudioContext, c: dict[str, Any], panel: JobPanel, tab: Any = None) -> None:
    """The events: list and show saved ablations, run one as a job, follow it until it is done."""
    @user_errors
    def on_refresh(cur):
        choices = ablation_choices(ctx)
        names = [v for _, v in choices]
        pick = cur if cur in names else (names[0] if names else None)
        return (gr.Dropdown(choices=choices, value=pick), *show_ablation(ctx, pick))

    out = [c["which"], c["table"], c["overview"], c["strips"]]
    c["refresh"].click(on_refresh, c["which"], out, api_name="ablation_list")
    if tab is not None:   # filled when the panel is opened, not on every page load (nothing races the form)
        tab.select(on_refresh, c["which"], out, api_name="ablation_open", show_progress="hidden")
    c["which"].input(user_errors(lambda name: show_ablation(ctx, name)), c["which"], out[1:],
                     api_name="ablation_show")

    run_out = [c["job"], c["status"], c["timer"]]

    @user_errors
    def on_run(request: gr.Request, preset, where=LOCAL):
        job = submit_ablation(ctx, ctx.reviewer_for(request, None), preset, chosen_executor(ctx, request, where))
        return only(panel.updates(panel.view(job)), run_out)

    c["run"].click(on_run, [c["preset"], c["run_on"]], run_out, api_name="ablation_run", concurrency_limit=2)
    root = gr.context.Context.root_block
    if root is not None:   # the executors with the page, never at build time (nor in /config)
        root.load(user_errors(lambda cur: run_on_update(ctx, cur)), c["run_on"], c["run_on"],
                  api_name="ablation_executors", show_progress="hidden")

    def on_tick(job_id, cur) -> dict[Any, Any]:
        v = panel.view(job_id)
        shown = panel.updates(v)
        if v.active:
            return shown
        return {**shown, **dict(zip(out, on_refresh(cur)))}     # done: the finished table and its strips

    panel.listen(on_tick, [c["which"]], [c["status"], c["timer"], *out], tick={"concurrency_limit": "default"})
