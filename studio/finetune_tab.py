"""Fine-tune tab: configure an HLDF run, see its memory/time estimate, launch it as a job, follow it live,
stop and resume it, and browse every run of the workspace.

Training never runs in a handler: "Launch" queues a ``train`` job through the workspace's Executor
(``ctx.executor``), which makes sure the supervisor runs; the page follows the job's row and the run's
``metrics.jsonl`` (``studio.finetune_runs``). Nothing lives in the server's memory but caches, so a reload
(or a studio restart) finds the job again. The job display (status, Stop, Resume, log, timer) is the shared
``studio.job_panel.JobPanel``; the form and its submissions are ``studio.finetune_form``.

This module is the layout (``render_finetune_tab``) and the wiring (``listen_finetune_tab``). The form
travels as one dict by field name; handlers return ``{component: value}`` dicts.

Every handler needs the trainer role (the tab's, in ``studio.app.TABS``); submissions carry ``owner=`` the
signed-in user and ``executor=`` the "Run on" choice (``studio.executors_panel``). Launch, calibrate and
resume share one concurrency slot (``SUBMIT_CONCURRENCY``): each builds a config and an estimate and inserts
a job row, and a burst of them should queue, not pile up.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from medart_core.errors import ConfigError
from medart_core.executors import LOCAL
from medart_core.jobs import ensure_supervisor

from .context import StudioContext
from .errors import user_errors
from .executors_panel import chosen_executor, run_on_dropdown, run_on_update
from .finetune_form import (BACKBONES, FORM, OVERRIDES, PRECISIONS, PRESETS, calibrate, dataset_info, dataset_names,  # noqa: F401
                            default_preset, device, device_banner, estimate_markdown, form_values, launch,
                            make_config, preset_values, resume, stop)
from .finetune_runs import (LOG_LINES, MAX_POINTS, METRICS, RUN_COLUMNS, _progress_html, active_job,  # noqa: F401
                            latest_job_for_run, load_png, loss_frames, run_details, runs_frame, runs_rows, status)
from .job_panel import LIVE, JobPanel, JobView

POLL_S = 2.0
SUBMIT_CONCURRENCY = dict(concurrency_limit=1, concurrency_id="finetune_submit")
QUIET = dict(show_progress="hidden")

LAUNCH_CSS = """
#ft-progress progress {width: 100%; height: 1.1em;}
#ft-progress .ft-err {color: #b91c1c; white-space: pre-wrap;}
#ft-progress .ft-line {margin: 0.2em 0;}
"""


# =========================================================================================================
# Layout
# =========================================================================================================
def _render_form(ctx: StudioContext, c: dict[str, Any]) -> None:
    """The left column: data, backbone, preset, the overrides (``c["form"]``, by field name), the buttons."""
    v0 = preset_values("cpu-smoke")   # replaced on load by the detected device's choice
    f: dict[str, Any] = {}
    f["dataset"] = gr.Dropdown([], value=None, label="Dataset", elem_id="ft-dataset", allow_custom_value=True)
    c["ds_info"] = gr.Markdown(elem_id="ft-ds-info")
    f["captions"] = gr.Radio(["approved", "latest"], value="approved", label="Captions")
    f["backbone"] = gr.Dropdown(list(dict.fromkeys([ctx.backbone_spec, *BACKBONES])), value=ctx.backbone_spec,
                                allow_custom_value=True, label="Backbone", elem_id="ft-backbone")
    f["preset"] = gr.Radio(list(PRESETS), value="cpu-smoke", label="Preset", elem_id="ft-preset")
    num = lambda k, label, **kw: gr.Number(v0[k], label=label, **kw)   # noqa: E731
    with gr.Accordion("Overrides", open=False):
        with gr.Row():
            f["max_steps"] = num("max_steps", "max_steps (0 = epochs)", precision=0, minimum=0,
                                 elem_id="ft-max-steps")
            f["epochs"] = num("epochs", "epochs", precision=0, minimum=1)
            f["batch_size"] = num("batch_size", "batch_size", precision=0, minimum=1)
        with gr.Row():
            f["resolution"] = num("resolution", "resolution (0 = backbone's)", precision=0, minimum=0)
            f["lr"] = num("lr", "lr")
            f["seed"] = num("seed", "seed", precision=0)
        with gr.Row():
            f["pixel_every"] = num("pixel_every", "hldf.pixel_every N", precision=0, minimum=1)
            f["sample_steps"] = num("sample_steps", "hldf.sample_steps M", precision=0, minimum=1)
            f["guidance"] = num("guidance", "hldf.guidance")
        with gr.Row():
            f["grad_path"] = gr.Radio(["full", "truncated"], value=v0["grad_path"], label="hldf.grad_path")
            f["truncated_k"] = num("truncated_k", "truncated_k", precision=0, minimum=1)
        f["rank"] = num("rank", "lora.rank", precision=0, minimum=1)
        with gr.Row():
            f["t5_enabled"] = gr.Checkbox(v0["t5_enabled"], label="lora.t5_enabled (LoRA on T5 too)")
            f["use_dora"] = gr.Checkbox(v0["use_dora"], label="lora.use_dora")
        with gr.Row():
            f["precision"] = gr.Dropdown(list(PRECISIONS), value=v0["precision"], label="precision",
                                         info="bf16: frozen DiT/T5/VAE in bf16, LoRA and losses fp32; auto: bf16 "
                                              "where the device runs it fast", elem_id="ft-precision")
            f["checkpointing"] = gr.Radio(["auto", "on", "off"], value=v0["checkpointing"],
                                          label="hldf.checkpointing", info="auto: only when memory needs it")
        with gr.Row():
            f["ema_decay"] = num("ema_decay", "ema.decay (0 = off; e.g. 0.999)", minimum=0, maximum=0.99999,
                                 elem_id="ft-ema-decay")
            f["snr_gamma"] = num("snr_gamma", "snr_gamma (min-SNR-γ; 0 = off)", minimum=0, elem_id="ft-snr-gamma")
        f["ema_posthoc"] = gr.Checkbox(v0["ema_posthoc"], label="ema.posthoc (snapshots: any EMA length afterwards, "
                                                                "`ema reconstruct` / `ema sweep`)")
    c["form"] = {k: f[k] for k in FORM}
    c["run_name"] = gr.Textbox(label="Run name (optional)", placeholder="dataset + UTC time", elem_id="ft-run-name")
    c["run_on"] = run_on_dropdown("ft-run-on")   # also where Calibrate and Resume run
    c["est_md"] = gr.Markdown(elem_id="ft-estimate")
    c["calib_md"] = gr.Markdown(elem_id="ft-calibration")
    with gr.Row():
        c["est_btn"] = gr.Button("Estimate", size="sm")
        c["calib_btn"] = gr.Button("Calibrate (4 real steps)", size="sm", elem_id="ft-calibrate")
        c["launch_btn"] = gr.Button("Launch", variant="primary", elem_id="ft-launch")


def _render_live(c: dict[str, Any], panel: JobPanel) -> None:
    """The right column: the job panel around the loss plots and the latest validation grid."""
    with gr.Row():
        panel.render_job(elem_id="ft-job")
        c["run_box"] = gr.Textbox(label="Run", interactive=False, elem_id="ft-run")
    panel.render_status(value=_progress_html(None, {}), elem_id="ft-progress")
    with gr.Row():
        panel.render_stop(elem_id="ft-stop")
        panel.render_resume(elem_id="ft-resume")
        # The validation prompts at the job's next step, without stopping it (any executor: a file request)
        c["sample_btn"] = gr.Button("Sample now", elem_id="ft-sample")
    with gr.Row():
        c["latent_plot"] = gr.LinePlot(x="step", y="loss", color="series", title="Latent loss",
                                       elem_id="ft-latent-plot", height=260)
        c["color_plot"] = gr.LinePlot(x="step", y="loss", color="series", title="Colour loss (pixel steps)",
                                      elem_id="ft-color-plot", height=260)
    c["grid"] = gr.Image(label="Latest validation grid", type="pil", format="png", interactive=False,
                         buttons=["download"], elem_id="ft-grid")
    panel.render_log(label=f"Log (last {LOG_LINES} lines)", elem_id="ft-log")
    with gr.Accordion("Job record (JSON)", open=False):
        c["job_json"] = gr.JSON()


def render_finetune_tab(ctx: StudioContext, panel: JobPanel) -> dict[str, Any]:
    """Lay the tab out; its components by name (the form's under ``"form"``, by field name)."""
    # No workspace data in build-time values (it would reach /config for every role): datasets, the dataset
    # summary and the runs table come with the guarded page load.
    c: dict[str, Any] = {"banner": gr.Markdown(elem_id="ft-banner")}
    with gr.Row():
        with gr.Column(scale=1, min_width=360):
            _render_form(ctx, c)
        with gr.Column(scale=2):
            _render_live(c, panel)
    gr.Markdown("### Runs")
    c["runs"] = gr.Dataframe(headers=RUN_COLUMNS, interactive=False, wrap=True, elem_id="ft-runs")
    c["refresh_runs"] = gr.Button("Refresh runs", size="sm")
    with gr.Accordion("Selected run: config and validation grids", open=False):
        c["cfg_code"] = gr.Code(language="json", label="config.json", interactive=False)
        c["gallery"] = gr.Gallery(label="Validation grids", format="png", columns=4, buttons=["download"])
    panel.render_timer()
    c["seen"] = gr.State({})
    c["hidden_run"] = gr.Textbox(visible=False)     # selecting a run by name (API clients, tests)
    c.update(job_box=panel.job, progress=panel.status, stop_btn=panel.stop, resume_btn=panel.resume,
             log_box=panel.log, timer=panel.timer)
    return c


# =========================================================================================================
# Wiring
# =========================================================================================================
def live_components(c: dict[str, Any]) -> list[Any]:
    """The live view's outputs, in the order of the API's results."""
    return [c[k] for k in ("job_box", "run_box", "progress", "latent_plot", "color_plot", "grid", "log_box",
                           "job_json", "stop_btn", "resume_btn", "timer", "seen", "calib_md", "runs")]


def live_updates(c: dict[str, Any], panel: JobPanel, view: dict[str, Any]) -> dict[Any, Any]:
    """``{component: value}`` of the live view from ``finetune_runs.status``'s dict."""
    shown = panel.updates(JobView(view["job"], view["progress"], view["log"]))
    shown[c["resume_btn"]] = gr.Button(interactive=view["can_resume"])    # a CLI run resumes without a job
    plots = view["plots"]
    shown.update({c["run_box"]: view["run"], c["job_json"]: view["json"], c["seen"]: view["seen"]})
    if plots is not None:
        shown.update({c["latent_plot"]: plots[0], c["color_plot"]: plots[1]})
    if view["grid_changed"]:
        shown[c["grid"]] = load_png(view["grid"])
    if view["calibration"]:
        shown[c["calib_md"]] = view["calibration"]
    if view["runs"] is not None:
        shown[c["runs"]] = view["runs"]
    return shown


def _owner(ctx: StudioContext, request: gr.Request | None) -> str | None:
    return ctx.reviewer_for(request, None)


def _listen_load(ctx: StudioContext, c: dict[str, Any], panel: JobPanel, live: list[Any]) -> None:
    form = c["form"]

    @user_errors
    def on_load(request: gr.Request):
        ctx.executor.refresh()                  # a job whose process died while nobody watched: interrupted
        if ctx.executor.list(states=LIVE, limit=1):
            ensure_supervisor(ctx.ws)           # after a restart of the machine or the studio
        job = active_job(ctx.executor, _owner(ctx, request))
        view = status(ctx, job.id if job else None, job.run if job else None, None)
        view["runs"] = runs_frame(ctx)
        p = default_preset()
        names = dataset_names(ctx)
        return {c["banner"]: device_banner(), form["dataset"]: gr.Dropdown(choices=names,
                                                                           value=names[0] if names else None),
                c["run_on"]: run_on_update(ctx), form["preset"]: p, **{form[k]: v for k, v in preset_values(p).items()},
                **live_updates(c, panel, view)}

    root = gr.context.Context.root_block
    if root is not None:
        root.load(on_load, None, [c["banner"], form["dataset"], c["run_on"], form["preset"],
                                  *(form[k] for k in OVERRIDES), *live], api_name="finetune_load", **QUIET)
    form["dataset"].change(lambda d: dataset_info(ctx, d), form["dataset"], c["ds_info"], api_name=False, **QUIET)
    form["preset"].input(lambda p: tuple(preset_values(p).values()), form["preset"],
                         [form[k] for k in OVERRIDES], api_name="finetune_preset", **QUIET)


def _listen_submit(ctx: StudioContext, c: dict[str, Any], panel: JobPanel, live: list[Any]) -> None:
    """Estimate, launch, calibrate and resume: each a library call on the form's dict."""
    inputs = list(c["form"].values())

    @user_errors
    def on_estimate(*values):
        return estimate_markdown(ctx, form_values(values))

    c["est_btn"].click(on_estimate, inputs, c["est_md"], api_name="finetune_estimate")

    def after_submit(job, note: str | None = None) -> dict[Any, Any]:
        view = status(ctx, job.id, job.run, None)
        view["calibration"] = note or view["calibration"]
        view["runs"] = runs_frame(ctx)
        return live_updates(c, panel, view)

    # gr.Request first: Gradio inserts it by position, and the form is passed as *args, "Run on" last.
    @user_errors
    def on_launch(request: gr.Request, name, *values):
        *form, where = values
        return after_submit(launch(ctx, _owner(ctx, request), name, form_values(form),
                                   chosen_executor(ctx, request, where)))

    c["launch_btn"].click(on_launch, [c["run_name"], *inputs, c["run_on"]], live, api_name="finetune_launch",
                          **SUBMIT_CONCURRENCY)

    @user_errors
    def on_calibrate(request: gr.Request, *values):
        *form, where = values
        return after_submit(calibrate(ctx, _owner(ctx, request), form_values(form),
                                      chosen_executor(ctx, request, where)),
                            "Calibrating: 4 real steps (2 pixel steps) as a short job; the measured figures appear "
                            "here when it is done.")

    c["calib_btn"].click(on_calibrate, [*inputs, c["run_on"]], live, api_name="finetune_calibrate",
                         **SUBMIT_CONCURRENCY)

    @user_errors
    def on_resume(job_id, run, where=LOCAL, request: gr.Request = None):
        return after_submit(resume(ctx, job_id, run, _owner(ctx, request), chosen_executor(ctx, request, where)))

    c["resume_btn"].click(on_resume, [c["job_box"], c["run_box"], c["run_on"]], live, api_name="finetune_resume",
                          **SUBMIT_CONCURRENCY, **QUIET)


def _listen_runs(ctx: StudioContext, c: dict[str, Any], panel: JobPanel, live: list[Any]) -> None:
    """The runs table: refresh, and a row (or a name) selected into the live view."""
    c["refresh_runs"].click(user_errors(lambda: runs_frame(ctx)), None, c["runs"], api_name="finetune_runs", **QUIET)
    details = [c["cfg_code"], c["gallery"]]

    def select(run: str) -> dict[Any, Any]:
        job = latest_job_for_run(ctx.executor, run)
        text, grids = run_details(ctx, run)
        return {**live_updates(c, panel, status(ctx, job.id if job else None, run, None)), c["cfg_code"]: text,
                c["gallery"]: [(load_png(g), Path(g).stem) for g in grids]}

    @user_errors
    def on_select(evt: gr.SelectData):
        row = evt.row_value if evt is not None else None
        return select(row[0]) if row and row[0] else gr.skip()

    c["runs"].select(on_select, None, [*live, *details], api_name=False, **QUIET)
    c["hidden_run"].submit(user_errors(select), c["hidden_run"], [*live, *details],
                           api_name="finetune_select_run", **QUIET)


def listen_finetune_tab(ctx: StudioContext, c: dict[str, Any], panel: JobPanel) -> None:
    """Wire the tab: page load, the form's submissions, the job panel's tick and Stop, the runs table."""
    live = live_components(c)
    _listen_load(ctx, c, panel, live)
    _listen_submit(ctx, c, panel, live)

    def show(job_id, run, seen=None) -> dict[Any, Any]:
        return live_updates(c, panel, status(ctx, job_id, run, seen))

    # The tick sends what changed (``seen``); Stop re-sends everything, as a selection does.
    panel.listen(show, [c["run_box"], c["seen"]], live, stop_inputs=[c["run_box"]])

    @user_errors
    def on_sample(job_id: str | None) -> None:
        """Sample now: the grid arrives with a later tick (Latest validation grid)."""
        if not job_id:
            raise ConfigError("No job to sample: launch or select a running training job first.")
        job = ctx.executor.sample_now(job_id)
        gr.Info(f"{job.id} renders its validation prompts at its next step and keeps training; the grid "
                "shows below when it is done.")

    c["sample_btn"].click(on_sample, panel.job, None, api_name="finetune_sample", concurrency_limit=None, **QUIET)
    _listen_runs(ctx, c, panel, live)


def build_finetune_tab(ctx: StudioContext) -> dict[str, Any]:
    """Build the Fine-tune tab inside the caller's ``gr.Tab`` (or any Blocks context); its components by name."""
    panel = JobPanel(ctx, kind="train", api="finetune", log_lines=LOG_LINES, poll_s=POLL_S)
    c = render_finetune_tab(ctx, panel)
    listen_finetune_tab(ctx, c, panel)
    return c
