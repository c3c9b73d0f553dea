"""The Fine-tune tab's live view: one job and its run as the page shows them (the job's row through the
Executor, the run's ``metrics.jsonl`` through the shared ``MetricsFollower``, the log's last lines), the loss
plots (downsampled here, on the server), and the table of every run of the workspace.

A tick costs O(1): one job row, the metrics lines appended since the last tick (one shared parse per run for
every open tab), and the last ``LOG_LINES`` log lines read from the file's end. Plots are re-sent only when
new points arrived, at most ``MAX_POINTS`` per series.
"""
from __future__ import annotations

import html
import json
import math
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from medart_core.checkpoint import MetricsFollower, MetricsSeries
from medart_core.estimate import estimate, read_calibration
from medart_core.jobs import ACTIVE, Executor, Job

from .context import StudioContext
from .finetune_form import PRESETS, device

MAX_POINTS = 300
LOG_LINES = 12
RUN_COLUMNS = ["run", "state", "preset", "started", "steps", "last val loss", "checkpoints"]

# One reader for every open tab and tick: a run's metrics are parsed once, then only the new lines.
METRICS = MetricsFollower()


def _downsample(xs: Sequence[Any], n: int = MAX_POINTS) -> list[Any]:
    if len(xs) <= n:
        return list(xs)
    stride = math.ceil(len(xs) / n)
    out = list(xs[::stride])
    if out[-1] is not xs[-1]:
        out[-1] = xs[-1]
    return out


def loss_frames(series: MetricsSeries):
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


def latest_job_for_run(jobs: Executor, run: str | None) -> Job | None:
    if not run:
        return None
    found = jobs.list(run=run, limit=1)
    return found[0] if found else None


def active_job(jobs: Executor, owner: str | None) -> Job | None:
    """On page load: this user's running/queued training job, else the most recent one of anyone."""
    for who in ([owner] if owner else []) + [None]:
        found = jobs.list(states=("queued",) + ACTIVE, kind="train", owner=who, limit=1)
        if found:
            return found[0]
    found = jobs.list(kind="train", limit=1)
    return found[0] if found else None


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
    """Everything the live view shows, from one job row, the new metrics lines and the log's last lines.
    ``seen``: what the page already shows, ``{"key": run + metrics version, "state": job state}``; plots
    are re-sent only for new points, the runs table only when the job's state changed."""
    jobs = ctx.executor
    job = jobs.get(job_id) if job_id else latest_job_for_run(jobs, run)
    run = (job.run if job is not None else None) or run
    series = METRICS.get(ctx.ws.run_layout(run).metrics) if run else MetricsSeries()
    grid = None
    if run and series.last.get("validation_grid"):
        p = ctx.ws.run_layout(run).root / series.last["validation_grid"]
        grid = str(p) if p.is_file() else None
    view: dict[str, Any] = {
        "job": job, "job_id": job.id if job else "", "run": run or "", "version": series.version,
        "progress": _progress_html(job, series.last), "grid": grid,
        "log": jobs.log_tail(job.id, LOG_LINES) if job else "",
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
    jobs: dict[str, Job] = {}
    for j in ctx.executor.list(kind="train"):
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


