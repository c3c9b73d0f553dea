"""The ``train`` job kind: ``prepare_train`` validates a submitted training config (in the submitter),
``run_train_job`` runs it in the job process (a new run, or the run continued bitwise-exactly from its latest
checkpoint on a later attempt), and ``resume_hint`` says so in an interrupted job's message. Registered by
name in :mod:`medart_core.job_registry`; the trainer itself is imported only when a job uses it.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .errors import ConfigError, MedArtError, NotFoundError
from .jobs import Job, JobContext, JobFailed, LocalExecutor, is_cuda_oom
from .workspace import Workspace, validate_name

# "preset" and "purpose" ("calibration") are labels for lists and the studio; they change nothing.
TRAIN_CONFIG_KEYS = ("train", "run", "resume", "max_steps", "preset", "purpose")


def prepare_train(ws: Workspace, config: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """``{"train": TrainConfig dict, "run": name?}`` for a new run, or ``{"resume": RUN, "train": ...?}`` to
    continue an existing one; optional ``max_steps`` overrides, ``preset``/``purpose`` labels. Validated here,
    at submit."""
    from .spaces import environment, training_allowed
    from .train_config import TrainConfig

    allowed, why = training_allowed(environment(ws.root))
    if not allowed:   # e.g. ZeroGPU: a GPU per call, for seconds to minutes
        raise ConfigError(why)
    unknown = sorted(set(config) - set(TRAIN_CONFIG_KEYS))
    if unknown:
        raise ConfigError(f"Unknown train job keys {unknown}; use {list(TRAIN_CONFIG_KEYS)}.")
    c = dict(config)
    if c.get("train") is not None:
        cfg = c["train"] if isinstance(c["train"], TrainConfig) else TrainConfig.from_dict(dict(c["train"]))
        c["train"] = cfg.to_dict()
    if c.get("max_steps") is not None:
        if int(c["max_steps"]) < 1:
            raise ConfigError(f"max_steps must be >= 1, got {c['max_steps']}.")
        c["max_steps"] = int(c["max_steps"])
    if c.get("resume"):
        run = validate_name(c["resume"], "run name")
        if not ws.run_layout(run).config.is_file():
            raise NotFoundError(f"There is no run {run!r} to resume in {ws.runs_dir}.")
        c.pop("run", None)
        return c, run
    c.pop("resume", None)
    if not c.get("train"):
        raise ConfigError("A train job needs a training config ('train') or the run to resume ('resume').")
    run = c.get("run")
    if not run:
        base = f"{c['train']['dataset']}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
        run, n = base, 1
        jobs = LocalExecutor(ws, start_supervisor=False)
        try:
            while ws.run_layout(run).root.exists() or jobs.list(run=run, limit=1):
                n += 1
                run = f"{base}-{n}"
        finally:
            jobs.close()
    validate_name(run, "run name")
    if ws.run_layout(run).config.exists():
        raise ConfigError(f"Run {run!r} already exists; resume it (jobs submit train --resume {run}) or choose "
                          "another run name.")
    c["run"] = run
    return c, run


class _TrainJobCallbacks:
    """Training hooks -> job progress (buffered; no I/O on the training thread except checkpoint events)."""

    def __init__(self, ctx: JobContext, total: int | None):
        self.ctx = ctx
        self.step = 0
        self.total = total
        if total:
            ctx.progress(total=total)
        ctx.set_info(phase="loading")

    def on_start(self, info: dict[str, Any]) -> None:
        self.step, self.total = int(info.get("step", 0)), int(info.get("total_steps") or self.total or 0) or None
        self.ctx.progress(step=self.step, total=self.total, phase="training")

    def on_step(self, r: dict[str, Any]) -> None:
        self.step = int(r["step"])
        info = {k: r[k] for k in ("loss", "loss_latent", "lr", "images_per_s", "peak_mem_mb", "epoch") if k in r}
        if "loss_color" in r:
            info["loss_color"] = r["loss_color"]
        self.ctx.progress(step=self.step, phase="training", **info)

    def on_validation(self, grid: Any) -> None:
        self.ctx.set_info(validation_grid=str(grid), validation_step=self.step)

    def on_checkpoint(self, path: Any) -> None:
        if path is not None:
            self.ctx.checkpoint(str(path), self.step)

    def should_stop(self) -> bool:
        return self.ctx.should_stop()

    def sample_requested(self) -> bool:
        """A "Sample now" request (:func:`medart_core.jobs.request_sample`), taken once."""
        from .jobs import take_sample_request

        return take_sample_request(self.ctx.ws, self.ctx.job.id)


def _oom_message(step: int, cfg: Any) -> str:
    """What to change after a CUDA out-of-memory error, naming the step, batch and resolution."""
    bs = getattr(cfg, "batch_size", None)
    res = getattr(cfg, "resolution", None)
    at = f"at {res} px" if res else "at the backbone's resolution"
    hint = "try batch 1 or the small-gpu preset" if (bs or 1) > 1 else \
        "try the small-gpu preset (frozen T5, truncated pixel-loss gradients) or a lower resolution"
    return f"CUDA out of memory at step {step} with batch {bs} {at}: {hint}."


def run_train_job(ctx: JobContext) -> dict[str, Any]:
    """The ``train`` kind: a new run, or (a later attempt, or ``resume``) the run continued bitwise-exactly
    from its latest checkpoint."""
    from .captions import CaptionStore
    from .train import TrainConfig, train

    c = ctx.config
    run = ctx.job.run
    layout = ctx.ws.run_layout(run)
    # A later attempt, or the same attempt requeued by Slurm (ctx.restarted), continues from the checkpoint.
    resume = run if (c.get("resume") or (ctx.resumed and layout.config.is_file())) else None
    if resume:
        saved = TrainConfig.from_json(layout.config.read_text(encoding="utf-8"))
        cfg = None
        if c.get("max_steps") is not None:
            cfg = saved
            cfg.max_steps = int(c["max_steps"])
        elif c.get("resume") and c.get("train"):
            cfg = TrainConfig.from_dict(c["train"])     # e.g. `jobs submit train --resume RUN --max-steps N`
        shown = cfg or saved
    else:
        cfg = TrainConfig.from_dict(c["train"])
        if c.get("max_steps") is not None:
            cfg.max_steps = int(c["max_steps"])
        shown = cfg
    cbs = _TrainJobCallbacks(ctx, shown.max_steps)
    ctx.log(f"{'resuming' if resume else 'starting'} run {run}"
            f"{' (attempt %d)' % ctx.attempt if ctx.attempt > 1 else ''}")
    store = CaptionStore.for_workspace(ctx.ws)
    try:
        res = train(cfg, ctx.ws, store, run_name=None if resume else run, resume=resume, callbacks=cbs,
                    log=lambda m: ctx.log(f"[train] {m}"))
    except MedArtError:
        raise
    except BaseException as e:
        if is_cuda_oom(e):
            raise JobFailed(_oom_message(cbs.step + 1, shown)) from e
        raise
    finally:
        close = getattr(store, "close", None)
        if close:
            close()
    ctx.progress(step=res.step, total=res.total_steps)
    return {"status": res.status, "run": res.run, "step": res.step, "total_steps": res.total_steps,
            "last_checkpoint": str(res.last_checkpoint) if res.last_checkpoint else None, "exports": res.exports,
            "elapsed_s": res.elapsed_s, "train_images_per_s": res.train_images_per_s}


def resume_hint(job: Job) -> str:
    """How an interrupted ``train`` job's message ends: resume continues from the last checkpoint."""
    ck = job.last_checkpoint
    where = f" ({Path(ck).name})" if ck else ""
    return f"; resume continues from the last checkpoint{where}."
