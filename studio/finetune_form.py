"""The Fine-tune tab's form and what it submits: the named form fields, the device's default preset, the
TrainConfig the form stands for, its memory/time estimate, and the ``train`` jobs it queues (launch,
calibrate, resume) through the workspace's Executor, on the executor the "Run on" choice names.

The form travels as one dict, ``{field name: value}`` (``FORM`` names every field, in the order of the
UI's inputs); the tab zips its components' values into it in one place (``form_values``).
"""
from __future__ import annotations

import time
from functools import lru_cache
from typing import Any, Mapping, Sequence

from medart_core.errors import ConfigError
from medart_core.estimate import calibration_config, detect_device, estimate
from medart_core.executors import LOCAL
from medart_core.jobs import Job

from .context import StudioContext
from .errors import warn

PRESETS = ("paper", "small-gpu", "cpu-smoke")
BACKBONES = ("tiny", "small", "PixArt-alpha/PixArt-XL-2-512x512")
# The typed overrides of a preset, in the order of the UI inputs after the four data fields.
OVERRIDES = ("max_steps", "epochs", "batch_size", "resolution", "lr", "seed", "pixel_every", "sample_steps",
             "guidance", "grad_path", "truncated_k", "rank", "t5_enabled", "use_dora", "precision", "checkpointing",
             "ema_decay", "ema_posthoc", "snr_gamma")
# The precision choice: "device default" = the TrainConfig's None (bf16 on a GPU, fp32 on a CPU).
PRECISIONS = ("device default", "fp32", "bf16", "auto")
FORM = ("dataset", "captions", "backbone", "preset") + OVERRIDES


def form_values(values: Sequence[Any]) -> dict[str, Any]:
    """The form's values, in ``FORM`` order, by name: the one place positions become names."""
    return dict(zip(FORM, values))


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


def preset_values(preset: str) -> dict[str, Any]:
    """The override fields as the preset sets them, by name (0 = unset for max_steps and resolution)."""
    from medart_core.train import TrainConfig

    c = TrainConfig.from_preset(preset)
    return dict(zip(OVERRIDES, [
        c.max_steps or 0, c.epochs, c.batch_size, c.resolution or 0, c.lr, c.seed, c.hldf.pixel_every,
        c.hldf.sample_steps, c.hldf.guidance, c.hldf.grad_path, c.hldf.truncated_k, c.lora.rank,
        c.lora.t5_enabled, c.lora.use_dora, c.precision or "device default", c.hldf.checkpointing, c.ema.decay,
        c.ema.posthoc, c.snr_gamma or 0]))


def make_config(form: Mapping[str, Any]):
    """The TrainConfig of the form: the preset, then every override field."""
    from medart_core.train import TrainConfig

    dataset, preset = form.get("dataset"), form.get("preset")
    if not dataset:
        raise ConfigError("Choose a dataset first (import one in the Dataset tab).")
    if preset not in PRESETS:
        raise ConfigError(f"Unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    v = form
    num = lambda k, cast=int: None if v.get(k) in (None, "") else cast(v[k])   # noqa: E731
    t5 = bool(v.get("t5_enabled"))
    base = TrainConfig.from_preset(preset)
    over: dict[str, Any] = {
        "dataset": dataset, "captions": v.get("captions") or "approved",
        "backbone": (v.get("backbone") or base.backbone).strip(),
        "max_steps": num("max_steps") or None, "epochs": num("epochs") or base.epochs,
        "batch_size": num("batch_size"), "resolution": num("resolution") or None, "lr": num("lr", float),
        "seed": num("seed"),
        # A feature cache needs a frozen T5: training T5 turns the cache off.
        "cache_features": bool(base.cache_features and not t5),
        "hldf": {"pixel_every": num("pixel_every"), "sample_steps": num("sample_steps"),
                 "guidance": num("guidance", float), "grad_path": v.get("grad_path") or base.hldf.grad_path,
                 "truncated_k": num("truncated_k")},
        "lora": {"rank": num("rank"), "t5_enabled": t5, "use_dora": bool(v.get("use_dora"))},
        "precision": None if v.get("precision") in (None, "", "device default") else v["precision"],
        "ema": {"decay": num("ema_decay", float), "posthoc": bool(v.get("ema_posthoc"))},
        "snr_gamma": num("snr_gamma", float) or None,        # 0 = off, as the CLI's default
    }
    if v.get("checkpointing"):
        over["hldf"]["checkpointing"] = v["checkpointing"]
    over["hldf"] = {k: x for k, x in over["hldf"].items() if x is not None}
    over["lora"] = {k: x for k, x in over["lora"].items() if x is not None}
    over["ema"] = {k: x for k, x in over["ema"].items() if x is not None}
    over = {k: x for k, x in over.items() if x is not None or k in ("max_steps", "resolution", "precision",
                                                                   "snr_gamma")}
    return TrainConfig.from_preset(preset, **over)


def _check_captions(ctx: StudioContext, cfg) -> int:
    if cfg.captions == "approved":
        n = ctx.store.count_images(cfg.dataset, status="approved")
        if n == 0:
            raise ConfigError(f"Dataset {cfg.dataset!r} has no approved captions yet: approve some in the Captions "
                              "tab, or train on `latest` captions.")
        return n
    return ctx.store.count_images(cfg.dataset)


def estimate_markdown(ctx: StudioContext, form: Mapping[str, Any]) -> str:
    cfg = make_config(form)
    n = ctx.store.count_images(cfg.dataset, status="approved" if cfg.captions == "approved" else None)
    return estimate(cfg, device(), n_train_images=n).markdown()


def launch(ctx: StudioContext, owner: str | None, run_name: str | None, form: Mapping[str, Any],
           executor: str = LOCAL) -> Job:
    cfg = make_config(form)
    n = _check_captions(ctx, cfg)
    est = estimate(cfg, device(), n_train_images=n)
    if not est.fits:
        warn(est.warnings[0])          # launched anyway: the estimate can be wrong; calibrate to know
    return ctx.executor.submit("train", {"train": cfg.to_dict(), "run": (run_name or "").strip() or None,
                                         "preset": form.get("preset")}, owner=owner, executor=executor)


def calibrate(ctx: StudioContext, owner: str | None, form: Mapping[str, Any], executor: str = LOCAL) -> Job:
    cfg = calibration_config(make_config(form))
    _check_captions(ctx, cfg)
    run = f"calibrate-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    return ctx.executor.submit("train", {"train": cfg.to_dict(), "run": run, "preset": form.get("preset"),
                                         "purpose": "calibration"}, owner=owner, executor=executor)


def stop(ctx: StudioContext, job_id: str) -> Job:
    if not job_id:
        raise ConfigError("No job to stop: launch or select a run first.")
    return ctx.executor.stop(job_id)


def resume(ctx: StudioContext, job_id: str, run: str | None = None, owner: str | None = None,
           executor: str = LOCAL) -> Job:
    """Resume the viewed job on ``executor`` (the "Run on" choice: it may differ from where the job ran);
    a run trained outside any job (the CLI) gets a new job that resumes it."""
    if job_id:
        return ctx.executor.resume(job_id, executor=executor)
    if not run:
        raise ConfigError("Nothing to resume: select a stopped or interrupted run first.")
    return ctx.executor.submit("train", {"resume": run}, owner=owner, executor=executor)
