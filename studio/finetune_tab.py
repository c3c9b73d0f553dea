"""Fine-tune tab: configure an HLDF run, see its memory/time estimate, launch it as a job, follow it live,
stop and resume it, and browse every run of the workspace.

Training never runs in a handler: "Launch" queues a ``train`` job (``medart_core.jobs``) and makes sure the
supervisor runs; the page follows the job's ledger row and the run's ``metrics.jsonl``. Nothing lives in
the server's memory but caches, so a reload (or a studio restart) finds the job again.

The poll (``gr.Timer(2)``, active only while the viewed job is queued or running) costs O(1) per tick: one
ledger row, the metrics lines appended since the last tick (one shared parse per run for every open tab),
and the last 12 log lines read from the file's end. Plots are re-sent only when new points arrived, at most
``MAX_POINTS`` per series (downsampled here, on the server).

Every handler needs the trainer role (the tab's, in ``studio.app.TABS``); submissions carry ``owner=`` the
signed-in user. Launch, calibrate and resume share one concurrency slot (``SUBMIT_CONCURRENCY``): each
builds a config and an estimate and inserts a ledger row, and a burst of them should queue, not pile up.
"""
from __future__ import annotations

import html
import json
import math
import os
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import gradio as gr

from medart_core.errors import ConfigError
from medart_core.estimate import calibration_config, detect_device, estimate, read_calibration
from medart_core.jobs import ACTIVE, Job, JobLedger, LocalExecutor, ensure_supervisor

from .context import StudioContext
from .errors import user_errors, warn

PRESETS = ("paper", "small-gpu", "cpu-smoke")
BACKBONES = ("tiny", "small", "PixArt-alpha/PixArt-XL-2-512x512")
MAX_POINTS = 300
POLL_S = 2.0
LOG_LINES = 12
RUN_COLUMNS = ["run", "state", "preset", "started", "steps", "last val loss", "checkpoints"]
SUBMIT_CONCURRENCY = dict(concurrency_limit=1, concurrency_id="finetune_submit")

LAUNCH_CSS = """
#ft-progress progress {width: 100%; height: 1.1em;}
#ft-progress .ft-err {color: #b91c1c; white-space: pre-wrap;}
#ft-progress .ft-line {margin: 0.2em 0;}
"""

# The typed overrides, in the order of the UI inputs after (dataset, captions, backbone, preset).
OVERRIDES = ("max_steps", "epochs", "batch_size", "resolution", "lr", "seed", "pixel_every", "sample_steps",
             "guidance", "grad_path", "truncated_k", "rank", "t5_enabled", "use_dora")


# =========================================================================================================
# Metrics, read incrementally and shared by every open tab
# =========================================================================================================
@dataclass
class _Series:
    inode: int = -1
    offset: int = 0
    step: list[int] = field(default_factory=list)
    latent: list[float | None] = field(default_factory=list)
    color: list[tuple[int, float]] = field(default_factory=list)
    val: list[tuple[int, float]] = field(default_factory=list)
    last: dict[str, Any] = field(default_factory=dict)
    version: int = 0


class MetricsFollower:
    """``runs/<run>/metrics.jsonl`` read from where the last call stopped (the file is append-only while a
    run trains; a resume rewrites it, which a new inode or a shorter file reveals, and it is then re-read)."""

    def __init__(self) -> None:
        self._runs: dict[str, _Series] = {}
        self._lock = threading.Lock()

    def get(self, path: Path) -> _Series:
        key = str(path)
        with self._lock:
            s = self._runs.setdefault(key, _Series())
            try:
                st = os.stat(path)
            except FileNotFoundError:
                if s.offset:
                    self._runs[key] = s = _Series(version=s.version + 1)
                return s
            if st.st_ino != s.inode or st.st_size < s.offset:
                s = self._runs[key] = _Series(inode=st.st_ino, version=s.version + 1)
            if st.st_size == s.offset:
                return s
            with open(path, "rb") as f:
                f.seek(s.offset)
                chunk = f.read(st.st_size - s.offset)
            end = chunk.rfind(b"\n") + 1          # a torn last line waits for the next call
            if end == 0:
                return s
            s.offset += end
            for line in chunk[:end].splitlines():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                step = int(r.get("step", 0))
                if "val_loss" in r:
                    # A run with no held-out images (val_images=0) logs its grids with val_loss null.
                    v = r["val_loss"]
                    if isinstance(v, (int, float)) and math.isfinite(v):
                        s.val.append((step, float(v)))
                    s.last["val_loss"], s.last["validation_grid"] = v, r.get("validation_grid")
                    continue
                if "loss_latent" in r:
                    s.step.append(step)
                    s.latent.append(r.get("loss_latent"))
                    if "loss_color" in r:
                        s.color.append((step, float(r["loss_color"])))
                    s.last.update({k: r.get(k) for k in ("step", "loss", "images_per_s", "peak_mem_mb")})
            s.version += 1
            return s


METRICS = MetricsFollower()


def _downsample(xs: Sequence[Any], n: int = MAX_POINTS) -> list[Any]:
    if len(xs) <= n:
        return list(xs)
    stride = math.ceil(len(xs) / n)
    out = list(xs[::stride])
    if out[-1] is not xs[-1]:
        out[-1] = xs[-1]
    return out


def loss_frames(series: _Series):
    """(latent-loss frame with train and validation series, colour-loss frame), each <= MAX_POINTS per series
    (None for a frame with no points yet)."""
    import pandas as pd

    lat = _downsample([(s, v) for s, v in zip(series.step, series.latent) if v is not None])
    rows = [{"step": s, "loss": v, "series": "train (latent)"} for s, v in lat]
    rows += [{"step": s, "loss": v, "series": "validation"} for s, v in _downsample(series.val)]
    if rows and not series.val:
        # A plot keeps the colour categories of its first render (Gradio 6.31): declare "validation" from the
        # start with one invalid (undrawn) point, so the validation curve shows once it exists.
        rows.append({"step": rows[0]["step"], "loss": math.nan, "series": "validation"})
    col = [{"step": s, "loss": v, "series": "train (colour)"} for s, v in _downsample(series.color)]

    def frame(rs: list[dict[str, Any]]):
        # None, not an empty frame, when there is nothing yet: a LinePlot updated from an empty frame to data
        # with a colour field draws no lines (Gradio 6.31 frontend); typed columns keep the axes quantitative.
        if not rs:
            return None
        return pd.DataFrame({"step": pd.Series([r["step"] for r in rs], dtype="int64"),
                             "loss": pd.Series([r["loss"] for r in rs], dtype="float64"),
                             "series": pd.Series([r["series"] for r in rs], dtype="object")})

    return frame(rows), frame(col)


# =========================================================================================================
# Handlers: plain functions of (ctx, inputs), so tests call them directly
# =========================================================================================================
_LEDGERS: dict[str, JobLedger] = {}
_LEDGERS_LOCK = threading.Lock()


def ledger_for(ctx: StudioContext) -> JobLedger:
    """One ledger object per workspace for every tab and tick (its connections are per thread)."""
    key = str(ctx.ws.root)
    with _LEDGERS_LOCK:
        if key not in _LEDGERS:
            _LEDGERS[key] = JobLedger(ctx.ws)
        return _LEDGERS[key]


@lru_cache(maxsize=1)
def device():
    return detect_device()


def device_banner() -> str:
    d = device()
    if d.kind == "cuda":
        return f"**Accelerator**: {d.name}, {d.memory_gb:.0f} GiB. One training job runs on it at a time."
    return ("**No GPU detected**: training runs on the CPU here. The `cpu-smoke` preset (offline tiny backbone, "
            "64 px) goes end to end in about a minute; `paper` and `small-gpu` need a GPU (days on a CPU).")


def default_preset() -> str:
    d = device()
    if d.kind != "cuda":
        return "cpu-smoke"
    return "paper" if d.memory_gb >= 70 else "small-gpu"


def dataset_names(ctx: StudioContext) -> list[str]:
    return [d.name for d in ctx.store.list_datasets()]


def dataset_info(ctx: StudioContext, dataset: str | None) -> str:
    if not dataset:
        return "No dataset yet: import one in the Dataset tab."
    n = ctx.store.count_images(dataset)
    ok = ctx.store.count_images(dataset, status="approved")
    return (f"**{dataset}**: {n} images, **{ok} approved captions**. Training uses approved captions unless you "
            "pick `latest` (each image's current caption, any status).")


def preset_values(preset: str) -> list[Any]:
    """The override fields as the preset sets them (0 = unset for max_steps and resolution)."""
    from medart_core.train import TrainConfig

    c = TrainConfig.from_preset(preset)
    return [c.max_steps or 0, c.epochs, c.batch_size, c.resolution or 0, c.lr, c.seed, c.hldf.pixel_every,
            c.hldf.sample_steps, c.hldf.guidance, c.hldf.grad_path, c.hldf.truncated_k, c.lora.rank,
            c.lora.t5_enabled, c.lora.use_dora]


def make_config(dataset: str | None, captions: str, backbone: str, preset: str, *values: Any):
    """The TrainConfig of the form: the preset, then every override field."""
    from medart_core.train import TrainConfig

    if not dataset:
        raise ConfigError("Choose a dataset first (import one in the Dataset tab).")
    if preset not in PRESETS:
        raise ConfigError(f"Unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    v = dict(zip(OVERRIDES, values))
    num = lambda k, cast=int: None if v.get(k) in (None, "") else cast(v[k])   # noqa: E731
    t5 = bool(v.get("t5_enabled"))
    base = TrainConfig.from_preset(preset)
    over: dict[str, Any] = {
        "dataset": dataset, "captions": captions or "approved", "backbone": (backbone or base.backbone).strip(),
        "max_steps": num("max_steps") or None, "epochs": num("epochs") or base.epochs,
        "batch_size": num("batch_size"), "resolution": num("resolution") or None, "lr": num("lr", float),
        "seed": num("seed"),
        # A feature cache needs a frozen T5: training T5 turns the cache off.
        "cache_features": bool(base.cache_features and not t5),
        "hldf": {"pixel_every": num("pixel_every"), "sample_steps": num("sample_steps"),
                 "guidance": num("guidance", float), "grad_path": v.get("grad_path") or base.hldf.grad_path,
                 "truncated_k": num("truncated_k")},
        "lora": {"rank": num("rank"), "t5_enabled": t5, "use_dora": bool(v.get("use_dora"))},
    }
    over["hldf"] = {k: x for k, x in over["hldf"].items() if x is not None}
    over["lora"] = {k: x for k, x in over["lora"].items() if x is not None}
    over = {k: x for k, x in over.items() if x is not None or k in ("max_steps", "resolution")}
    return TrainConfig.from_preset(preset, **over)


def _check_captions(ctx: StudioContext, cfg) -> int:
    if cfg.captions == "approved":
        n = ctx.store.count_images(cfg.dataset, status="approved")
        if n == 0:
            raise ConfigError(f"Dataset {cfg.dataset!r} has no approved captions yet: approve some in the Captions "
                              "tab, or train on `latest` captions.")
        return n
    return ctx.store.count_images(cfg.dataset)


def estimate_markdown(ctx: StudioContext, *form: Any) -> str:
    cfg = make_config(*form)
    n = ctx.store.count_images(cfg.dataset, status="approved" if cfg.captions == "approved" else None)
    return estimate(cfg, device(), n_train_images=n).markdown()


def launch(ctx: StudioContext, owner: str | None, run_name: str | None, *form: Any) -> Job:
    cfg = make_config(*form)
    n = _check_captions(ctx, cfg)
    est = estimate(cfg, device(), n_train_images=n)
    if not est.fits:
        warn(est.warnings[0])          # launched anyway: the estimate can be wrong; calibrate to know
    return LocalExecutor(ctx.ws).submit("train", {"train": cfg.to_dict(), "run": (run_name or "").strip() or None,
                                                  "preset": form[3]}, owner=owner)


def calibrate(ctx: StudioContext, owner: str | None, *form: Any) -> Job:
    cfg = calibration_config(make_config(*form))
    _check_captions(ctx, cfg)
    run = f"calibrate-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    return LocalExecutor(ctx.ws).submit("train", {"train": cfg.to_dict(), "run": run, "preset": form[3],
                                                  "purpose": "calibration"}, owner=owner)


def stop(ctx: StudioContext, job_id: str) -> Job:
    if not job_id:
        raise ConfigError("No job to stop: launch or select a run first.")
    return LocalExecutor(ctx.ws).stop(job_id)


def resume(ctx: StudioContext, job_id: str, run: str | None = None, owner: str | None = None) -> Job:
    """Resume the viewed job; a run trained outside any job (the CLI) gets a new job that resumes it."""
    ex = LocalExecutor(ctx.ws)
    if job_id:
        return ex.resume(job_id)
    if not run:
        raise ConfigError("Nothing to resume: select a stopped or interrupted run first.")
    return ex.submit("train", {"resume": run}, owner=owner)


def latest_job_for_run(ledger: JobLedger, run: str | None) -> Job | None:
    if not run:
        return None
    jobs = ledger.list(run=run, limit=1)
    return jobs[0] if jobs else None


def active_job(ledger: JobLedger, owner: str | None) -> Job | None:
    """On page load: this user's running/queued training job, else the most recent one of anyone."""
    for who in ([owner] if owner else []) + [None]:
        jobs = ledger.list(states=("queued",) + ACTIVE, kind="train", owner=who, limit=1)
        if jobs:
            return jobs[0]
    jobs = ledger.list(kind="train", limit=1)
    return jobs[0] if jobs else None


def _progress_html(job: Job | None, last: dict[str, Any]) -> str:
    if job is None:
        return '<div class="ft-line">No job yet: configure a run and press <b>Launch</b>.</div>'
    esc = html.escape
    bits = [f"<b>{esc(job.progress_text())}</b>"]
    if last.get("images_per_s"):
        bits.append(f"{last['images_per_s']:.2f} images/s")
    if last.get("peak_mem_mb"):
        bits.append(f"peak memory {last['peak_mem_mb'] / 1024:.2f} GiB")
    if last.get("loss") is not None:
        bits.append(f"loss {last['loss']:.4f}")
    if last.get("val_loss") is not None:
        bits.append(f"val loss {last['val_loss']:.4f}")
    out = [f'<progress value="{job.progress:.4f}" max="1"></progress>',
           f'<div class="ft-line">{" · ".join(bits)}</div>',
           f'<div class="ft-line">job <code>{esc(job.id)}</code> · run <code>{esc(job.run or "-")}</code></div>']
    if job.error:
        hint = " Press <b>Resume</b> to continue from the last checkpoint." if job.resumable else ""
        out.append(f'<div class="ft-line ft-err">{esc(job.error)}{hint}</div>')
    elif job.state == "stopped":
        out.append('<div class="ft-line">Stopped with a checkpoint; <b>Resume</b> continues it.</div>')
    return "\n".join(out)


def status(ctx: StudioContext, job_id: str | None, run: str | None, seen: dict | None = None) -> dict[str, Any]:
    """Everything the live view shows, from one ledger row, the new metrics lines and the log's last lines.
    ``seen``: what the page already shows, ``{"key": run + metrics version, "state": job state}``; plots
    are re-sent only for new points, the runs table only when the job's state changed."""
    ledger = ledger_for(ctx)
    job = ledger.get(job_id) if job_id else latest_job_for_run(ledger, run)
    run = (job.run if job is not None else None) or run
    series = METRICS.get(ctx.ws.run_layout(run).metrics) if run else _Series()
    grid = None
    if run and series.last.get("validation_grid"):
        p = ctx.ws.run_layout(run).root / series.last["validation_grid"]
        grid = str(p) if p.is_file() else None
    view: dict[str, Any] = {
        "job": job, "job_id": job.id if job else "", "run": run or "", "version": series.version,
        "progress": _progress_html(job, series.last), "grid": grid,
        "log": ledger.log_tail(job.id, LOG_LINES) if job else "",
        "json": job.to_dict() if job else {},
        "seen": {"key": f"{run}:{series.version}", "state": job.state if job else None},
        "runs": None,
        "active": bool(job and job.state in ("queued",) + ACTIVE),
        "can_stop": bool(job and job.state in ("queued", "running")),
        "can_resume": bool(job and job.resumable) or bool(job is None and run and _resumable_run(ctx, run)),
        "plots": None, "grid_changed": False, "calibration": None,
    }
    seen = seen or {}
    if seen.get("key") != view["seen"]["key"]:     # new points (or another run): re-send plots and the grid
        view["plots"] = loss_frames(series)
        view["grid_changed"] = True
    if "state" in seen and seen["state"] != view["seen"]["state"]:
        view["runs"] = runs_frame(ctx)
    if job is not None and job.config.get("purpose") == "calibration" and job.state == "done":
        from medart_core.train import TrainConfig, read_metrics

        cfg = TrainConfig.from_dict(job.config["train"])
        cal = read_calibration(read_metrics(ctx.ws, run), int(cfg.batch_size))
        view["calibration"] = cal.markdown(estimate(cfg, device()))
    return view


def _resumable_run(ctx: StudioContext, run: str) -> bool:
    try:
        st = json.loads(ctx.ws.run_layout(run).status.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return st.get("status") in ("stopped", "running", "failed")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


@lru_cache(maxsize=1)
def _preset_dicts() -> dict[str, dict[str, Any]]:
    from medart_core.train import TrainConfig

    return {name: _flat(TrainConfig.from_preset(name).to_dict()) for name in PRESETS}


def _preset_label(cfg: dict[str, Any]) -> str:
    """The preset closest to a run's config (data, length and cadence fields aside): ``cpu-smoke``, or
    ``cpu-smoke (modified)`` when other fields differ."""
    ignore = {"dataset", "captions", "max_steps", "epochs", "backbone", "checkpoint_every", "validate_every",
              "keep_checkpoints", "validation_prompts"}
    flat = _flat(cfg)
    diffs = {name: sum(1 for k, v in p.items() if k not in ignore and flat.get(k) != v)
             for name, p in _preset_dicts().items()}
    best = min(diffs, key=lambda n: diffs[n])
    return best if diffs[best] == 0 else f"{best} (modified)"


def runs_rows(ctx: StudioContext) -> list[list[Any]]:
    """One row per run folder: state (its latest job's, else status.json), preset, started, steps, last
    validation loss, checkpoints. Newest first."""
    ledger = ledger_for(ctx)
    jobs: dict[str, Job] = {}
    for j in ledger.list(kind="train"):
        if j.run and j.run not in jobs:
            jobs[j.run] = j
    rows = []
    root = ctx.ws.runs_dir
    for d in sorted(root.iterdir() if root.is_dir() else [], key=lambda p: -p.stat().st_mtime):
        layout = ctx.ws.run_layout(d.name)
        if not layout.config.is_file():
            continue
        try:
            cfg = json.loads(layout.config.read_text(encoding="utf-8"))
            st = json.loads(layout.status.read_text(encoding="utf-8")) if layout.status.is_file() else {}
        except (OSError, json.JSONDecodeError):
            continue
        job = jobs.get(d.name)
        series = METRICS.get(layout.metrics)
        cks = sorted(p.name for p in layout.checkpoints_dir.glob("step_*")) if layout.checkpoints_dir.is_dir() else []
        step = series.last.get("step") or st.get("step") or 0
        total = st.get("total_steps") or cfg.get("max_steps") or "?"
        val = series.last.get("val_loss")
        rows.append([
            d.name, job.state if job else st.get("status", "?"),
            (job.config.get("preset") if job else None) or _preset_label(cfg),
            time.strftime("%Y-%m-%d %H:%M", time.localtime(layout.config.stat().st_mtime)),
            f"{step}/{total}", f"{val:.4f}" if isinstance(val, (int, float)) else "",
            f"{len(cks)} (latest {cks[-1]})" if cks else "0",
        ])
    listed = {r[0] for r in rows}
    waiting = [j for run, j in jobs.items() if run not in listed and not ctx.ws.run_layout(run).config.is_file()]
    for j in sorted(waiting, key=lambda j: -j.created_at):    # submitted, no run folder yet
        total = (j.config.get("train") or {}).get("max_steps") or "?"
        rows.insert(0, [j.run, j.state, j.config.get("preset") or "", time.strftime(
            "%Y-%m-%d %H:%M", time.localtime(j.created_at)), f"0/{total}", "", "0"])
    return rows


def runs_frame(ctx: StudioContext):
    import pandas as pd

    return pd.DataFrame(runs_rows(ctx), columns=RUN_COLUMNS)


def load_png(path: str | Path | None):
    """A grid as a PIL image: Gradio then writes its own copy into its cache, so the run folder (checkpoints
    included) never has to be an allowed path of the server."""
    if not path:
        return None
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return im.copy()


def run_details(ctx: StudioContext, run: str) -> tuple[str, list[str]]:
    """(config.json text, validation grid PNG paths, oldest first, at most 12)."""
    layout = ctx.ws.run_layout(run)
    cfg = layout.config.read_text(encoding="utf-8") if layout.config.is_file() else "{}"
    grids = sorted(layout.validation_dir.glob("step_*.png")) if layout.validation_dir.is_dir() else []
    return cfg, [str(p) for p in grids[-12:]]


# =========================================================================================================
# Layout and wiring
# =========================================================================================================
def _owner(ctx: StudioContext, request: gr.Request | None) -> str | None:
    return ctx.reviewer_for(request, None)


def build_finetune_tab(ctx: StudioContext) -> None:
    """Build the Fine-tune tab inside the caller's ``gr.Tab`` (or any Blocks context)."""
    # No workspace data in build-time values (it would reach /config for every role): datasets, the dataset
    # summary and the runs table come with the guarded page load.
    preset0 = "cpu-smoke"   # replaced on load by the detected device's choice
    v0 = preset_values(preset0)
    banner = gr.Markdown(elem_id="ft-banner")
    with gr.Row():
        with gr.Column(scale=1, min_width=360):
            dataset = gr.Dropdown([], value=None, label="Dataset", elem_id="ft-dataset", allow_custom_value=True)
            ds_info = gr.Markdown(elem_id="ft-ds-info")
            captions = gr.Radio(["approved", "latest"], value="approved", label="Captions")
            backbone = gr.Dropdown(list(dict.fromkeys([ctx.backbone_spec, *BACKBONES])), value=ctx.backbone_spec,
                                   allow_custom_value=True, label="Backbone", elem_id="ft-backbone")
            preset = gr.Radio(list(PRESETS), value=preset0, label="Preset", elem_id="ft-preset")
            with gr.Accordion("Overrides", open=False):
                with gr.Row():
                    max_steps = gr.Number(v0[0], label="max_steps (0 = epochs)", precision=0, minimum=0,
                                          elem_id="ft-max-steps")
                    epochs = gr.Number(v0[1], label="epochs", precision=0, minimum=1)
                    batch = gr.Number(v0[2], label="batch_size", precision=0, minimum=1)
                with gr.Row():
                    resolution = gr.Number(v0[3], label="resolution (0 = backbone's)", precision=0, minimum=0)
                    lr = gr.Number(v0[4], label="lr")
                    seed = gr.Number(v0[5], label="seed", precision=0)
                with gr.Row():
                    pixel_every = gr.Number(v0[6], label="hldf.pixel_every N", precision=0, minimum=1)
                    sample_steps = gr.Number(v0[7], label="hldf.sample_steps M", precision=0, minimum=1)
                    guidance = gr.Number(v0[8], label="hldf.guidance")
                with gr.Row():
                    grad_path = gr.Radio(["full", "truncated"], value=v0[9], label="hldf.grad_path")
                    truncated_k = gr.Number(v0[10], label="truncated_k", precision=0, minimum=1)
                rank = gr.Number(v0[11], label="lora.rank", precision=0, minimum=1)
                with gr.Row():
                    t5_enabled = gr.Checkbox(v0[12], label="lora.t5_enabled (LoRA on T5 too)")
                    use_dora = gr.Checkbox(v0[13], label="lora.use_dora")
            run_name = gr.Textbox(label="Run name (optional)", placeholder="dataset + UTC time", elem_id="ft-run-name")
            est_md = gr.Markdown(elem_id="ft-estimate")
            calib_md = gr.Markdown(elem_id="ft-calibration")
            with gr.Row():
                est_btn = gr.Button("Estimate", size="sm")
                calib_btn = gr.Button("Calibrate (4 real steps)", size="sm", elem_id="ft-calibrate")
                launch_btn = gr.Button("Launch", variant="primary", elem_id="ft-launch")
        with gr.Column(scale=2):
            with gr.Row():
                job_box = gr.Textbox(label="Job", interactive=False, elem_id="ft-job")
                run_box = gr.Textbox(label="Run", interactive=False, elem_id="ft-run")
            progress = gr.HTML(_progress_html(None, {}), elem_id="ft-progress")
            with gr.Row():
                stop_btn = gr.Button("Stop", variant="stop", interactive=False, elem_id="ft-stop")
                resume_btn = gr.Button("Resume", interactive=False, elem_id="ft-resume")
            gr.Markdown("<small>“Sample now” comes with the Generate tab (a `generate` job kind).</small>")
            with gr.Row():
                latent_plot = gr.LinePlot(x="step", y="loss", color="series", title="Latent loss",
                                          elem_id="ft-latent-plot", height=260)
                color_plot = gr.LinePlot(x="step", y="loss", color="series", title="Colour loss (pixel steps)",
                                         elem_id="ft-color-plot", height=260)
            grid = gr.Image(label="Latest validation grid", type="pil", format="png", interactive=False,
                            buttons=["download"], elem_id="ft-grid")
            log_box = gr.Code(label=f"Log (last {LOG_LINES} lines)", language=None, lines=LOG_LINES,
                              interactive=False, elem_id="ft-log")
            with gr.Accordion("Job record (JSON)", open=False):
                job_json = gr.JSON()
    gr.Markdown("### Runs")
    runs = gr.Dataframe(headers=RUN_COLUMNS, interactive=False, wrap=True,
                        elem_id="ft-runs")
    refresh_runs = gr.Button("Refresh runs", size="sm")
    with gr.Accordion("Selected run: config and validation grids", open=False):
        cfg_code = gr.Code(language="json", label="config.json", interactive=False)
        gallery = gr.Gallery(label="Validation grids", format="png", columns=4, buttons=["download"])
    timer = gr.Timer(POLL_S, active=False)
    seen = gr.State({})

    form = [dataset, captions, backbone, preset, max_steps, epochs, batch, resolution, lr, seed, pixel_every,
            sample_steps, guidance, grad_path, truncated_k, rank, t5_enabled, use_dora]
    overrides = form[4:]
    live = [job_box, run_box, progress, latent_plot, color_plot, grid, log_box, job_json, stop_btn, resume_btn,
            timer, seen, calib_md, runs]

    def live_outputs(view: dict[str, Any]) -> tuple:
        plots = view["plots"]
        return (view["job_id"], view["run"], view["progress"],
                plots[0] if plots is not None else gr.skip(), plots[1] if plots is not None else gr.skip(),
                load_png(view["grid"]) if view["grid_changed"] else gr.skip(), view["log"], view["json"],
                gr.Button(interactive=view["can_stop"]), gr.Button(interactive=view["can_resume"]),
                gr.Timer(active=view["active"]), view["seen"],
                view["calibration"] if view["calibration"] else gr.skip(),
                view["runs"] if view["runs"] is not None else gr.skip())

    quiet = dict(show_progress="hidden")

    @user_errors
    def on_status(job_id, run, version):
        return live_outputs(status(ctx, job_id, run, version))

    timer.tick(on_status, [job_box, run_box, seen], live, api_name="finetune_status", concurrency_limit=None,
               **quiet)

    @user_errors
    def on_load(request: gr.Request):
        owner = _owner(ctx, request)
        ledger = ledger_for(ctx)
        ledger.reconcile()                      # a job whose process died while nobody watched: interrupted
        if ledger.list(states=("queued",) + ACTIVE, limit=1):
            ensure_supervisor(ctx.ws)           # after a restart of the machine or the studio
        job = active_job(ledger, owner)
        view = status(ctx, job.id if job else None, job.run if job else None, None)
        view["runs"] = runs_frame(ctx)
        p = default_preset()
        names = dataset_names(ctx)
        return (device_banner(), gr.Dropdown(choices=names, value=names[0] if names else None), p,
                *preset_values(p), *live_outputs(view))

    root = gr.context.Context.root_block
    if root is not None:
        root.load(on_load, None, [banner, dataset, preset, *overrides, *live], api_name="finetune_load",
                  **quiet)

    dataset.change(lambda d: dataset_info(ctx, d), dataset, ds_info, api_name=False, **quiet)
    preset.input(lambda p: tuple(preset_values(p)), preset, overrides, api_name="finetune_preset", **quiet)

    @user_errors
    def on_estimate(*f):
        return estimate_markdown(ctx, *f)

    est_btn.click(on_estimate, form, est_md, api_name="finetune_estimate")

    def after_submit(job: Job, note: str | None = None):
        view = status(ctx, job.id, job.run, None)
        view["calibration"] = note or view["calibration"]
        view["runs"] = runs_frame(ctx)
        return live_outputs(view)

    # gr.Request first: Gradio inserts it by position, and the form is passed as *args.
    @user_errors
    def on_launch(request: gr.Request, name, *f):
        return after_submit(launch(ctx, _owner(ctx, request), name, *f))

    launch_btn.click(on_launch, [run_name, *form], live, api_name="finetune_launch", **SUBMIT_CONCURRENCY)

    @user_errors
    def on_calibrate(request: gr.Request, *f):
        return after_submit(calibrate(ctx, _owner(ctx, request), *f),
                            "Calibrating: 4 real steps (2 pixel steps) as a short job; the measured figures appear "
                            "here when it is done.")

    calib_btn.click(on_calibrate, form, live, api_name="finetune_calibrate", **SUBMIT_CONCURRENCY)

    @user_errors
    def on_stop(job_id, run):
        stop(ctx, job_id)
        return live_outputs(status(ctx, job_id, run, None))

    stop_btn.click(on_stop, [job_box, run_box], live, api_name="finetune_stop", concurrency_limit=None, **quiet)

    @user_errors
    def on_resume(job_id, run, request: gr.Request = None):
        job = resume(ctx, job_id, run, _owner(ctx, request))
        return after_submit(job)

    resume_btn.click(on_resume, [job_box, run_box], live, api_name="finetune_resume", **SUBMIT_CONCURRENCY, **quiet)

    @user_errors
    def on_runs():
        return runs_frame(ctx)

    refresh_runs.click(on_runs, None, runs, api_name="finetune_runs", **quiet)

    @user_errors
    def on_select(evt: gr.SelectData):
        row = evt.row_value if evt is not None else None
        run = row[0] if row else None
        if not run:
            return (gr.skip(),) * (len(live) + 2)
        job = latest_job_for_run(ledger_for(ctx), run)
        text, grids = run_details(ctx, run)
        return (*live_outputs(status(ctx, job.id if job else None, run, None)), text,
                [(load_png(g), Path(g).stem) for g in grids])

    runs.select(on_select, None, [*live, cfg_code, gallery], api_name=False, **quiet)

    @user_errors
    def on_select_run(run):
        job = latest_job_for_run(ledger_for(ctx), run)
        text, grids = run_details(ctx, run)
        return (*live_outputs(status(ctx, job.id if job else None, run, None)), text,
                [(load_png(g), Path(g).stem) for g in grids])

    # The same as clicking a row, by name (API clients, tests).
    hidden_run = gr.Textbox(visible=False)
    hidden_run.submit(on_select_run, hidden_run, [*live, cfg_code, gallery], api_name="finetune_select_run",
                      **quiet)
