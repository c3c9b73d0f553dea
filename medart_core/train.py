"""The HLDF training run: ``train()`` = ``prepare_run`` → ``build_model`` → ``TrainData`` → ``Validator`` →
``fit``. Read top to bottom; the pieces it uses live in their own modules (``train_config``, ``examples``,
``cache``, ``checkpoint``, ``validation``, ``export``, ``hldf``).

Determinism is by construction rather than by hope:

* the data order of epoch e is ``randperm`` from a generator seeded with (seed, e); the random crop of the
  sample at position i of epoch e is drawn from a generator seeded with (seed, e, i);
* the noise, timesteps and pixel-step sampling of optimiser step s on rank r come from a generator seeded
  with (seed, r, s);
* everything else that could draw from a global RNG (dropout in T5/LoRA) sees the python/numpy/torch
  states that the checkpoint saved and the resume restores, per rank.

So a run killed at any point and resumed from its last checkpoint replays the very same arithmetic and ends
with bitwise identical adapter weights (tests/test_resume.py kills a real subprocess with SIGKILL twice).
The EMA of the adapters (``--ema.decay``) and the post-hoc EMA profiles (``--ema.posthoc``) are updated after
each optimiser step on the main process only (every rank holds the same weights after the gradient
all-reduce) and saved in every checkpoint, so they resume bitwise too (``Averages``).

The run's state (step, epoch, position in the epoch) is a ``RunState`` passed explicitly to the functions
that read or advance it. torch/diffusers/accelerate are imported inside functions: the CLI imports this
module at start-up.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from . import hldf, provenance
from .checkpoint import (
    MetricsLog,
    clean_tmp_dirs,
    gather_rng,
    latest_checkpoint,
    optimizer_from_tensors,
    optimizer_to_tensors,
    read_checkpoint,
    read_metrics,
    rng_restore,
    write_checkpoint,
    write_status,
)
from .constants import MAX_TOKENS
from .errors import ConfigError, TrainingDivergedError
from .examples import Example, captions_digest, collect_examples, epoch_order, load_pixels, split_holdout, tokenize
from .fileio import atomic_write_text
from .seeds import derive_seed
from .train_config import (
    RESUME_MUTABLE,
    TrainConfig,
    load_run_config,
    merge_for_resume,
)
from .workspace import RunLayout, Workspace

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["train", "TrainConfig", "TrainCallbacks", "TrainResult", "RunState", "read_metrics",
           "RESUME_MUTABLE"]


# =========================================================================================================
# Callbacks and result
# =========================================================================================================
class TrainCallbacks:
    """Hooks the studio and the job runner use to follow and steer a run; subclass and override what you
    need. A plain object with any subset of these methods works too."""

    def on_start(self, info: dict[str, Any]) -> None: ...          # run, run_dir, step, total_steps
    def on_step(self, metrics: dict[str, Any]) -> None: ...
    def on_validation(self, grid_path: Path) -> None: ...
    def on_checkpoint(self, path: Path) -> None: ...
    def should_stop(self) -> bool:                                   # checked before every optimiser step
        return False

    def sample_requested(self) -> bool:                             # "Sample now": checked there too
        return False


class _Hooks:
    def __init__(self, callbacks: Any):
        if callbacks is None:
            callbacks = []
        self.cbs = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]

    def __getattr__(self, name: str) -> Callable[..., list[Any]]:
        return lambda *args: [getattr(cb, name)(*args) for cb in self.cbs if callable(getattr(cb, name, None))]

    def should_stop(self) -> bool:
        return any(bool(r) for r in self.__getattr__("should_stop")())

    def sample_requested(self) -> bool:
        return any(bool(r) for r in self.__getattr__("sample_requested")())


@dataclass
class TrainResult:
    run: str
    run_dir: Path
    step: int                       # optimiser steps completed
    total_steps: int
    epoch: int
    status: str                     # "finished" | "stopped"
    last_checkpoint: Path | None
    metrics_path: Path
    validation_grids: list[Path] = field(default_factory=list)
    exports: dict[str, str] = field(default_factory=dict)
    over_long_captions: int = 0
    cache: dict[str, Any] | None = None
    elapsed_s: float = 0.0
    train_images_per_s: float = 0.0  # images per second of the optimiser steps alone (no validation/checkpoints)
    backbone: Any = field(default=None, repr=False)   # the trained model (LoRA attached), e.g. to sample from


@dataclass
class RunState:
    """What advances during a run; saved in every checkpoint (step, epoch, position) and restored on resume."""

    step: int = 0                   # optimiser steps completed
    epoch: int = 0
    position: int = 0               # optimiser steps completed within the epoch
    last_checkpoint: Path | None = None
    stopped: bool = False
    grids: list[Path] = field(default_factory=list)
    step_time: float = 0.0          # seconds spent in optimiser steps (throughput without validation/checkpoints)
    steps_timed: int = 0


# =========================================================================================================
# Setup: run folder and config, model, data
# =========================================================================================================
@dataclass
class Env:
    """Processes, device and precision of this run."""

    accelerator: Any
    device: Any
    rank: int
    world: int
    main: bool
    on_cuda: bool
    precision: str                  # resolved: "fp32" | "bf16" (frozen weights and their forward passes)
    precision_reason: str
    weight_dtype: Any
    say: Callable[[str], None]

    def log(self, msg: str) -> None:
        if self.main:
            self.say(msg)

    def autocast(self) -> Any:
        """bf16 autocast on this device for bf16 runs (``precision.autocast``), a no-op for fp32."""
        from .precision import autocast

        return autocast(self.precision, self.device)

    def device_info(self) -> Any:
        """This run's device as the memory/time estimate sees it."""
        import torch

        from .estimate import cpu_device, gpu_device

        if self.on_cuda:
            idx = self.device.index or 0
            return gpu_device(torch.cuda.get_device_name(idx), torch.cuda.get_device_properties(idx).total_memory)
        return cpu_device(torch.get_num_threads())


def prepare_run(cfg: TrainConfig | None, ws: Workspace, run_name: str | None, resume: str | None
                ) -> tuple[TrainConfig, str, RunLayout, Path | None]:
    """(config, run name, run folder, checkpoint to resume from). On resume the saved config wins; only
    RESUME_MUTABLE fields may differ."""
    if resume is not None:
        layout = ws.run_layout(resume)
        cfg = merge_for_resume(load_run_config(layout.config), cfg)
        return cfg, resume, layout, latest_checkpoint(layout.root)
    if cfg is None:
        raise ConfigError("train() needs a TrainConfig (or resume=RUN to continue a run).")
    run_name = run_name or f"{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    layout = ws.run_layout(run_name)
    if layout.config.exists():
        raise ConfigError(f"Run {run_name!r} already exists; continue it with --resume {run_name} or choose "
                          "another --run name.")
    return cfg, run_name, layout, None


def recorded_precision(ck_path: Path | None) -> str | None:
    """The precision a run's checkpoint was trained in ("no" in runs written before it was a setting)."""
    if ck_path is None:
        return None
    prov = json.loads((ck_path / "state.json").read_text(encoding="utf-8")).get("provenance") or {}
    p = {"no": "fp32"}.get(prov.get("precision"), prov.get("precision"))
    return p if p in ("fp32", "bf16") else None


def make_env(cfg: TrainConfig, accelerator: Any, log: Callable[[str], None] | None, *,
             resumed_precision: str | None = None) -> Env:
    """Processes, device and the resolved precision. A resumed run keeps the precision its checkpoint was
    trained in (``auto`` could resolve differently on another machine; resume must replay the same maths)."""
    import torch
    from accelerate import Accelerator

    from .precision import resolve_precision, torch_dtype

    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    device = accelerator.device
    on_cuda = device.type == "cuda"
    say = log or (lambda msg: print(f"[train] {msg}", file=sys.stderr, flush=True))
    if resumed_precision is not None:
        precision, reason = resumed_precision, "kept from the checkpoint being resumed"
    else:
        precision, reason = resolve_precision(cfg.precision, device)
    return Env(accelerator=accelerator, device=device, rank=accelerator.process_index,
               world=accelerator.num_processes, main=accelerator.is_main_process, on_cuda=on_cuda,
               precision=precision, precision_reason=reason, weight_dtype=torch_dtype(precision), say=say)


def build_model(cfg: TrainConfig, env: Env) -> tuple[Any, list[Any]]:
    """The frozen backbone with LoRA attached, on the device; returns it and the trainable parameters."""
    import numpy as np
    import torch

    from .backbone import load_backbone
    from .lora import attach_lora, trainable_parameters
    from .pixart import t5_is_trainable

    backbone = load_backbone(cfg.backbone, torch_dtype=env.weight_dtype if env.precision == "bf16" else None)
    resolution = int(cfg.resolution or backbone.resolution)
    if resolution % backbone.vae_scale_factor:
        raise ConfigError(f"resolution {resolution} is not a multiple of the VAE factor {backbone.vae_scale_factor}.")
    backbone.resolution = resolution
    # Same seed on every rank so LoRA starts identical everywhere (rank 0's copy is also broadcast below).
    torch.manual_seed(cfg.seed)
    attach_lora(backbone, cfg.lora)
    if cfg.cache_features and t5_is_trainable(backbone):
        raise ConfigError("cache_features needs a frozen T5 (its embeddings would change while training); set "
                          "lora.t5_enabled to false or cache_features to false.")
    for module in (backbone.text_encoder, backbone.vae, backbone.transformer):
        module.to(env.device)
    params = trainable_parameters(backbone)
    if env.world > 1:
        import torch.distributed as dist

        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)
    # Per-rank global RNG streams (dropout); the checkpoint saves and restores them per rank.
    random.seed(derive_seed(cfg.seed, "python", env.rank))
    np.random.seed(derive_seed(cfg.seed, "numpy", env.rank) % 2**32)
    torch.manual_seed(derive_seed(cfg.seed, "torch", env.rank))
    return backbone, params


class TrainData:
    """The training examples and how a batch is made from them: from the feature cache (T5 embeddings and
    VAE posteriors computed once, centre crop) or from pixels and token ids (the paper's random crop)."""

    def __init__(self, cfg: TrainConfig, env: Env, backbone: Any, train_set: list[Example], val_set: list[Example],
                 cache: Any):
        from .pixart import encode_negative, t5_is_trainable

        self.cfg, self.env, self.backbone = cfg, env, backbone
        self.train_set, self.val_set, self.cache = train_set, val_set, cache
        self.per_step = cfg.batch_size * cfg.grad_accum * env.world   # images per optimiser step, all ranks
        self.steps_per_epoch = len(train_set) // self.per_step
        if self.steps_per_epoch < 1:
            raise ConfigError(f"{len(train_set)} training images (after holding out {len(val_set)} for validation) "
                              f"are fewer than one step needs ({self.per_step} = batch_size x grad_accum x "
                              "processes); approve more captions, lower batch_size/grad_accum or val_images.")
        self.total_steps = int(cfg.max_steps) if cfg.max_steps else int(cfg.epochs) * self.steps_per_epoch
        self.ids, self.masks, lengths = tokenize(backbone.tokenizer, [e.text for e in train_set])
        self.over_long = [e.key for e, n in zip(train_set, lengths) if n > MAX_TOKENS]
        self.train_t5 = t5_is_trainable(backbone)
        with env.autocast():
            neg = encode_negative(backbone, 1, text=cfg.hldf.negative_prompt, trim_padding=cfg.trim_text_padding)
        self.neg = (neg[0].detach(), neg[1])
        self.vae_scale = float(backbone.vae.config.scaling_factor)

    def batch(self, positions: list[int], order: list[int], epoch: int, pixel: bool, gen: "torch.Generator") -> dict:
        """The batch at ``positions`` of this epoch's ``order``; ``gen`` is the step's generator."""
        exs = [self.train_set[order[i]] for i in positions]
        if self.cache is not None:
            return self._cached(exs, pixel, gen)
        return self._uncached(exs, positions, order, epoch)

    def _cached(self, exs: list[Example], pixel: bool, gen: "torch.Generator") -> dict:
        import torch

        from .cache import cache_item
        from .pixart import trim_text_padding

        dev, dt = self.env.device, self.env.weight_dtype
        feats = [self.cache.load(cache_item(e)) for e in exs]
        mean = torch.stack([f["latent_mean"] for f in feats]).to(dev, torch.float32)
        std = torch.stack([f["latent_std"] for f in feats]).to(dev, torch.float32)
        # Same draw as hldf's own VAE path: a posterior sample, not the mean.
        eps = torch.randn(tuple(mean.shape), generator=gen, device=gen.device).to(dev)
        p_emb = torch.stack([f["prompt_embeds"] for f in feats])
        p_mask = torch.stack([f["prompt_mask"] for f in feats])
        n_emb, n_mask = self.neg[0].cpu(), self.neg[1].cpu()
        if self.cfg.trim_text_padding:
            # Pad tokens carry exactly zero weight in cross-attention: dropping the all-pad tail of both the
            # captions and the negative prompt computes the same thing with ~5x fewer text tokens.
            both = torch.cat([p_mask, n_mask.expand(p_mask.shape[0], -1)])
            keep = trim_text_padding(both, both)[1].shape[1]
            p_emb, p_mask, n_emb, n_mask = p_emb[:, :keep], p_mask[:, :keep], n_emb[:, :keep], n_mask[:, :keep]
        batch = {"latents": (mean + std * eps) * self.vae_scale,      # float32: the noising is float32 maths
                 "prompt_embeds": p_emb.to(dev, dt), "prompt_mask": p_mask.to(dev),
                 "neg_embeds": n_emb.to(dev, dt), "neg_mask": n_mask.to(dev)}
        if pixel:
            batch["pixel_values"] = torch.stack([load_pixels(e.path, self.backbone.resolution, crop="center")
                                                 for e in exs]).to(dev)
        return batch

    def _uncached(self, exs: list[Example], positions: list[int], order: list[int], epoch: int) -> dict:
        import torch

        dev, res, seed = self.env.device, self.backbone.resolution, self.cfg.seed
        crops = [load_pixels(e.path, res, crop="random",
                             generator=torch.Generator().manual_seed(derive_seed(seed, "crop", epoch, i)))
                 for e, i in zip(exs, positions)]
        rows = [order[i] for i in positions]
        # Pixels stay float32 whatever the precision: the colour loss compares them (the VAE casts its input).
        batch = {"pixel_values": torch.stack(crops).to(dev),
                 "input_ids": self.ids[rows], "attention_mask": self.masks[rows]}
        if not self.train_t5:
            batch["neg_embeds"], batch["neg_mask"] = self.neg[0].to(dev), self.neg[1].to(dev)
        return batch


def prepare_cache(cfg: TrainConfig, env: Env, ws: Workspace, backbone: Any, examples: list[Example]
                  ) -> tuple[Any, dict[str, Any] | None]:
    """The verified, completed feature cache (``cache_features``) or (None, None)."""
    if not cfg.cache_features:
        return None, None
    from .cache import FeatureCache, cache_item

    cache = FeatureCache(ws, backbone_spec=cfg.backbone, resolution=int(backbone.resolution),
                         dtype="bf16" if env.precision == "bf16" else "fp32")
    items = [cache_item(e) for e in examples]
    report = None
    if env.main:
        report = cache.ensure(backbone, items, batch_size=cfg.cache_batch_size, log=env.say).to_dict()
    env.accelerator.wait_for_everyone()
    if not env.main:
        report = cache.ensure(backbone, items, build=False).to_dict()
    return cache, report


def make_optimizer(cfg: TrainConfig, params: list[Any], env: Env) -> tuple[Any, str]:
    import torch

    if cfg.optimizer == "adamw8bit":
        if env.on_cuda:
            try:
                import bitsandbytes as bnb  # type: ignore[import-not-found]

                return bnb.optim.AdamW8bit(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                           weight_decay=cfg.weight_decay), "adamw8bit"
            except ImportError:
                env.log("optimizer=adamw8bit: bitsandbytes is not installed; using torch AdamW (fp32 states).")
        else:
            env.log("optimizer=adamw8bit needs CUDA (bitsandbytes); using torch AdamW (fp32 states) on CPU.")
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay), "adamw"


# =========================================================================================================
# Provenance
# =========================================================================================================
def git_commit() -> str | None:
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        r = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return r.stdout.strip() or None if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


TRAIN_PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "numpy", "pillow")


def package_versions() -> dict[str, str]:
    return provenance.package_versions(TRAIN_PACKAGES)


def _peak_mem_mb(on_cuda: bool) -> float:
    if on_cuda:
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


# =========================================================================================================
# The run
# =========================================================================================================
@dataclass
class Run:
    """Everything ``fit`` needs that does not change while it runs."""

    cfg: TrainConfig
    env: Env
    name: str
    layout: RunLayout
    backbone: Any
    params: list[Any]
    optimizer: Any
    data: TrainData
    validator: Any
    metrics: MetricsLog
    hooks: _Hooks
    provenance: dict[str, Any]
    hldf: Any = None                # cfg.hldf with ``checkpointing: auto`` resolved for this device
    averages: "Averages | None" = None   # EMA / post-hoc EMA of the adapters (main process, when configured)


class Averages:
    """The run's EMA (``cfg.ema.decay``) and post-hoc EMA profiles (``cfg.ema.posthoc``) of the adapter weights,
    with what a checkpoint stores of them: tensor groups ``ema`` (keyed like ``adapters``, so
    ``RUN@STEP:ema`` loads it as adapters) and ``posthoc_ema``, and their counters in ``state.json``."""

    def __init__(self, params: dict[str, Any], ema: Any, posthoc: Any):
        self.params, self.ema, self.posthoc = params, ema, posthoc

    @classmethod
    def create(cls, cfg: TrainConfig, backbone: Any, run_dir: Path) -> "Averages | None":
        if not (cfg.ema.enabled or cfg.ema.posthoc):
            return None
        from .checkpoint import posthoc_dir
        from .ema import EMA, PostHocEMA, adapter_parameters

        params = adapter_parameters(backbone)
        ema = EMA(params, cfg.ema.decay, warmup=cfg.ema.warmup) if cfg.ema.enabled else None
        posthoc = None
        if cfg.ema.posthoc:
            folder = posthoc_dir(run_dir)
            folder.mkdir(parents=True, exist_ok=True)
            posthoc = PostHocEMA(params, cfg.ema.sigma_rels, snapshot_every=cfg.ema.snapshot_every, folder=folder)
        return cls(params, ema, posthoc)

    def update(self, step: int) -> None:
        """After the optimiser step with 0-based index ``step``."""
        if self.ema is not None:
            self.ema.update(self.params, step)
        if self.posthoc is not None:
            self.posthoc.update(self.params, step)

    def to_checkpoint(self) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        """(tensor groups, state.json entries); also snapshots the post-hoc profiles at this step, so every
        checkpoint step can be reconstructed exactly."""
        groups: dict[str, dict[str, Any]] = {}
        meta: dict[str, Any] = {}
        if self.ema is not None:
            groups["ema"], meta["ema"] = self.ema.state_dict()
        if self.posthoc is not None:
            groups["posthoc_ema"], meta["posthoc_ema"] = self.posthoc.state_dict()
            if self.posthoc.t > 0:
                self.posthoc.snapshot()
        return groups, meta

    def restore(self, saved: dict[str, Any], tensors: dict[str, dict[str, Any]], step: int) -> None:
        """Load the averages of a checkpoint at ``step``; post-hoc snapshots written after it (by a run killed
        later) are removed: the resumed run writes them again, bit for bit."""
        from .ema import list_snapshots

        for name, avg in (("ema", self.ema), ("posthoc_ema", self.posthoc)):
            if avg is None:
                continue
            if name not in tensors or name not in saved:
                raise ConfigError(f"Checkpoint step {step} has no {name} state although the run's config keeps "
                                  "one; it was written by another version: start a new run.")
            avg.load_state_dict(tensors[name], saved[name])
        if self.posthoc is not None:
            for snap in list_snapshots(self.posthoc.folder):
                if snap.step > step:
                    snap.path.unlink(missing_ok=True)


def train(cfg: TrainConfig | None, ws: Workspace, store: Any, *, run_name: str | None = None,
          resume: str | None = None, callbacks: Any = None, accelerator: Any = None,
          log: Callable[[str], None] | None = None) -> TrainResult:
    """Fine-tune LoRA adapters with HLDF; see the module docstring. ``resume=RUN`` continues run RUN from its
    latest checkpoint (``cfg`` may then be None, or differ only in RESUME_MUTABLE fields)."""
    import torch

    from .validation import Validator

    t_start = time.perf_counter()
    cfg, run_name, layout, ck_path = prepare_run(cfg, ws, run_name, resume)
    cfg.validate()
    env = make_env(cfg, accelerator, log, resumed_precision=recorded_precision(ck_path))
    if resume is not None:
        env.log(f"resuming run {resume} from {ck_path.name if ck_path else 'the start (no checkpoint yet)'}")
    # Decided before the weights are loaded: the estimate counts them against the memory free now.
    from .estimate import choose_checkpointing

    ckpt_choice = choose_checkpointing(cfg, env.device_info())
    run_hldf = dataclasses.replace(cfg.hldf, checkpointing="on" if ckpt_choice.checkpointing else "off")
    env.log(f"precision {env.precision} ({env.precision_reason}); {ckpt_choice.reason}")
    backbone, params = build_model(cfg, env)

    pool, explicit_val = collect_examples(ws, store, cfg)
    train_set, val_set = split_holdout(pool, explicit_val, int(cfg.val_images), cfg.seed)
    data = TrainData(cfg, env, backbone, train_set, val_set, cache=None)
    if data.over_long:
        env.log(f"{len(data.over_long)} of {len(train_set)} captions are longer than {MAX_TOKENS} T5 tokens and "
                f"are truncated (e.g. {data.over_long[:3]}); shorten them in the Captions tab to train on all "
                "their words.")
    data.cache, cache_report = prepare_cache(cfg, env, ws, backbone, train_set + val_set)
    val_prompts = list(cfg.validation_prompts) or [e.text for e in val_set[:4]] or [train_set[0].text]
    validator = Validator(backbone, cfg, layout=layout, run_name=run_name, prompts=val_prompts, val_set=val_set,
                          cache=data.cache, device=env.device, weight_dtype=env.weight_dtype,
                          autocast=env.autocast)
    if data.cache is not None:  # T5 is not needed any more: give its memory back to the DiT.
        backbone.text_encoder.to("cpu")
        if env.on_cuda:
            torch.cuda.empty_cache()
    optimizer, opt_name = make_optimizer(cfg, params, env)
    provenance = {
        "dataset": cfg.dataset, "captions_source": cfg.captions, "n_train_images": len(train_set),
        "n_validation_images": len(val_set), "validation_image_keys": [e.key for e in val_set],
        "captions_sha256": captions_digest(train_set + val_set), "backbone": cfg.backbone,
        "backbone_is_random": backbone.is_random, "resolution": backbone.resolution,
        "crop": "center (feature cache)" if data.cache else "random (seeded per sample)",
        "over_long_captions": {"count": len(data.over_long), "max_tokens": MAX_TOKENS, "keys": data.over_long[:100]},
        "optimizer": opt_name, "precision": env.precision, "precision_requested": cfg.precision,
        "precision_reason": env.precision_reason, "checkpointing": ckpt_choice.to_dict(), "world_size": env.world,
        "packages": package_versions(), "git_commit": git_commit(), "feature_cache": cache_report,
        "ema": dataclasses.asdict(cfg.ema),
        "snr_gamma": cfg.snr_gamma,
    }
    run = Run(cfg=cfg, env=env, name=run_name, layout=layout, backbone=backbone, params=params,
              optimizer=optimizer, data=data, validator=validator, metrics=MetricsLog(layout.metrics),
              hooks=_Hooks(callbacks), provenance=provenance, hldf=run_hldf,
              averages=Averages.create(cfg, backbone, layout.root) if env.main else None)
    state = start_or_resume(run, ck_path, fresh=resume is None)
    env.log(f"run {run_name}: {len(train_set)} images, {data.steps_per_epoch} steps/epoch, steps {state.step}->"
            f"{data.total_steps}, {backbone.resolution}px, {opt_name}, precision {env.precision}, {env.world} "
            f"process(es), device {env.device}, pixel step every {cfg.hldf.pixel_every} (M={cfg.hldf.sample_steps}), "
            f"{'cached features' if data.cache else 'T5+VAE every step'}")
    if env.main:
        run.hooks.on_start({"run": run_name, "run_dir": layout.root, "step": state.step,
                            "total_steps": data.total_steps})

    try:
        fit(run, state)
    except TrainingDivergedError as e:
        if env.main:
            write_status(layout.root, status="diverged", step=state.step, error=str(e))
        raise
    except BaseException as e:
        if env.main:
            write_status(layout.root, status="failed", step=state.step, error=f"{type(e).__name__}: {e}")
        raise

    exports: dict[str, str] = {}
    if env.main and not state.stopped and state.last_checkpoint is not None:
        from .export import export_from_backbone

        exports = export_from_backbone(backbone, layout.export_dir, cfg=cfg, provenance=provenance,
                                       step=state.step, merged=cfg.export_merged)
    status = "stopped" if state.stopped else "finished"
    if env.main:
        write_status(layout.root, status=status, step=state.step, error=None)
    env.accelerator.wait_for_everyone()
    return TrainResult(run=run_name, run_dir=layout.root, step=state.step, total_steps=data.total_steps,
                       epoch=state.epoch, status=status, last_checkpoint=state.last_checkpoint,
                       metrics_path=layout.metrics, validation_grids=state.grids, exports=exports,
                       over_long_captions=len(data.over_long), cache=cache_report,
                       elapsed_s=round(time.perf_counter() - t_start, 3),
                       train_images_per_s=(round(state.steps_timed * data.per_step / state.step_time, 4)
                                           if state.step_time else 0.0),
                       backbone=backbone)


def start_or_resume(run: Run, ck_path: Path | None, *, fresh: bool) -> RunState:
    """Write the run folder (fresh) or restore adapters, optimiser, data position and RNG (resume)."""
    env, layout = run.env, run.layout
    state = RunState(last_checkpoint=ck_path)
    if env.main:
        layout.root.mkdir(parents=True, exist_ok=True)
        clean_tmp_dirs(layout.root)
        if fresh:
            atomic_write_text(layout.config, run.cfg.to_json())
    if ck_path is not None:
        from .checkpoint import load_adapter_tensors

        saved, tensors = read_checkpoint(ck_path)
        load_adapter_tensors(run.backbone, tensors["adapters"])
        optimizer_from_tensors(run.optimizer, tensors["optimizer"], saved["optimizer"])
        state.step, state.epoch, state.position = int(saved["step"]), int(saved["epoch"]), int(saved["position"])
        if run.averages is not None:
            run.averages.restore(saved, tensors, state.step)
        if int(saved.get("world_size", 1)) == env.world:
            rng_restore({k: v[env.rank] for k, v in tensors["rng"].items()})
        else:  # the data position is kept in images; RNG streams cannot be mapped to a new rank count
            state.position = (state.position * int(saved["images_per_step"])) // run.data.per_step
            env.log(f"resuming with {env.world} processes instead of {saved['world_size']}: data position kept, "
                    "but the run is no longer bitwise identical to an uninterrupted one.")
    if env.main:
        run.metrics.truncate_after(state.step)
        write_status(layout.root, status="running", run=run.name, step=state.step, total_steps=run.data.total_steps,
                     pid=os.getpid(), error=None)
    env.accelerator.wait_for_everyone()
    return state


def fit(run: Run, state: RunState) -> None:
    """The loop: optimiser steps until ``total_steps`` or a stop request, validating and checkpointing on
    the way. Advances ``state`` in place."""
    from tqdm.auto import tqdm

    cfg, env, data = run.cfg, run.env, run.data
    run.backbone.transformer.train()
    if data.train_t5:
        run.backbone.text_encoder.train()
    bar = tqdm(total=data.total_steps, initial=state.step, desc=run.name, unit="step",
               disable=not (env.main and sys.stderr.isatty()))
    order = epoch_order(len(data.train_set), cfg.seed, state.epoch)
    try:
        while state.step < data.total_steps:
            if state.position >= data.steps_per_epoch:
                state.epoch, state.position = state.epoch + 1, 0
                order = epoch_order(len(data.train_set), cfg.seed, state.epoch)
            if _all_ranks_any(env, env.main and run.hooks.should_stop()):
                state.stopped = True
                break
            if _all_ranks_any(env, env.main and run.hooks.sample_requested()):
                if env.main:    # "Sample now": the validation prompts here, the training untouched
                    env.log(f"sample now: the validation prompts at step {state.step}, on request")
                    validate(run, state, requested=True)
                env.accelerator.wait_for_everyone()
            record = optimizer_step(run, state, order)
            if env.main:
                run.metrics.write(record)
                run.hooks.on_step(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
            if state.step % cfg.validate_every == 0 or state.step == data.total_steps:
                if env.main:
                    validate(run, state)
                env.accelerator.wait_for_everyone()
            if state.step % cfg.checkpoint_every == 0 or state.step == data.total_steps:
                state.last_checkpoint = save_checkpoint(run, state) or state.last_checkpoint
                if env.main:
                    write_status(run.layout.root, status="running", step=state.step)
                    run.hooks.on_checkpoint(state.last_checkpoint)
        if state.stopped and (state.last_checkpoint is None or int(state.last_checkpoint.name[5:]) != state.step):
            state.last_checkpoint = save_checkpoint(run, state) or state.last_checkpoint
            if env.main:
                run.hooks.on_checkpoint(state.last_checkpoint)
    finally:
        bar.close()


def optimizer_step(run: Run, state: RunState, order: list[int]) -> dict[str, Any]:
    """One optimiser step (all micro-batches, all ranks); returns its metrics record."""
    import torch

    cfg, env, data = run.cfg, run.env, run.data
    t0 = time.perf_counter()
    gen = torch.Generator(device=env.device).manual_seed(derive_seed(cfg.seed, "step", env.rank, state.step))
    pixel = hldf.is_pixel_step(state.step, run.hldf)
    logs: dict[str, float] = {}
    for micro in range(cfg.grad_accum):
        first = state.position * data.per_step + (micro * env.world + env.rank) * cfg.batch_size
        positions = list(range(first, first + cfg.batch_size))
        batch = data.batch(positions, order, state.epoch, pixel, gen)
        with env.autocast():
            loss, mlogs = hldf.hybrid_loss(state.step, run.backbone, batch, run.hldf, generator=gen,
                                           trim_padding=cfg.trim_text_padding, snr_gamma=cfg.snr_gamma)
        if _all_ranks_any(env, not bool(torch.isfinite(loss.detach()).all())):
            keys = [data.train_set[order[i]].key for i in positions]
            raise diverged(run, state.step + 1, f"the loss is {float(loss.detach())} (batch images {keys})")
        (loss / cfg.grad_accum).backward()
        for k, v in mlogs.items():
            logs[k] = logs.get(k, 0.0) + v / cfg.grad_accum
    if env.world > 1:
        _average_gradients(run.params, env)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip))
    if not math.isfinite(grad_norm):
        raise diverged(run, state.step + 1, f"the gradient norm is {grad_norm}")
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.averages is not None:   # main process only: the weights are the same on every rank
        run.averages.update(state.step)
    state.step, state.position = state.step + 1, state.position + 1
    dt = time.perf_counter() - t0
    state.step_time += dt
    state.steps_timed += 1
    record = {"step": state.step, "epoch": state.epoch, "loss": logs.get("loss"),
              "loss_latent": logs.get("loss_latent"), "lr": run.optimizer.param_groups[0]["lr"],
              "grad_norm": grad_norm, "images_per_s": round(data.per_step / dt, 4),
              "peak_mem_mb": _peak_mem_mb(env.on_cuda), "pixel_step": pixel}
    if "loss_color" in logs:
        record["loss_color"] = logs["loss_color"]
    return record


def validate(run: Run, state: RunState, *, requested: bool = False) -> None:
    """The validation grid and loss at this step (main process), written to the metrics log (``requested``:
    asked for by "Sample now", outside the schedule; its seeded sampling leaves the training's RNG alone)."""
    avg = run.averages
    if run.cfg.ema.validate_with == "ema" and avg is not None and avg.ema is not None:
        with avg.ema.swap_into(avg.params):   # the raw weights come back bit for bit afterwards
            res = run.validator.run(state.step)
    else:
        res = run.validator.run(state.step)
    if res.problem is not None:
        raise diverged(run, state.step, res.problem)
    state.grids.append(res.grid)
    run.metrics.write({"step": state.step, "epoch": state.epoch, "val_loss": res.loss,
                       "validation_grid": str(res.grid.relative_to(run.layout.root)),
                       **({"requested": True} if requested else {})})
    run.hooks.on_validation(res.grid)


def save_checkpoint(run: Run, state: RunState) -> Path | None:
    """Adapters, optimiser, every rank's RNG and the data position (a collective: all ranks call it)."""
    from .checkpoint import adapter_tensors

    cfg, env, data = run.cfg, run.env, run.data
    rng = gather_rng(env.accelerator)
    path = None
    if env.main:
        opt_tensors, opt_meta = optimizer_to_tensors(run.optimizer)
        saved = {"run": run.name, "step": state.step, "epoch": state.epoch, "position": state.position,
                 "steps_per_epoch": data.steps_per_epoch, "images_per_step": data.per_step,
                 "total_steps": data.total_steps, "samples_seen": state.step * data.per_step, "world_size": env.world,
                 "data_order": {"kind": "randperm", "seed": derive_seed(cfg.seed, "order", state.epoch),
                                "epoch": state.epoch, "position": state.position},
                 "loss_generator": "per step: derive_seed(seed, 'step', rank, step)",
                 "optimizer": opt_meta, "config": cfg.to_dict(), "provenance": run.provenance,
                 "writer_rank": env.rank, "writer_pid": os.getpid(),
                 "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        groups = {"adapters": adapter_tensors(run.backbone), "optimizer": opt_tensors, "rng": rng}
        if run.averages is not None:
            avg_groups, avg_meta = run.averages.to_checkpoint()
            groups.update(avg_groups)
            saved.update(avg_meta)
        path = write_checkpoint(run.layout.root, state.step, groups, saved, keep=cfg.keep_checkpoints)
    env.accelerator.wait_for_everyone()
    return path


def diverged(run: Run, at_step: int, what: str) -> TrainingDivergedError:
    """``at_step``: 1-based number of the optimiser step that went wrong (as in metrics.jsonl)."""
    last = latest_checkpoint(run.layout.root)
    keep = (f"The last good checkpoint {last.name} is kept; resume from it" if last
            else "No checkpoint was written yet; restart")
    return TrainingDivergedError(
        f"Training diverged at step {at_step}: {what}. Likely causes: a learning rate too high "
        f"(lr={run.cfg.lr}; try 10x lower), bf16 overflow (try precision 'fp32'), a corrupt image or a bad "
        f"caption in the batch. {keep} after fixing the cause.")


def _all_ranks_any(env: Env, flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (every rank must take the same branch)."""
    import torch

    t = torch.tensor([1.0 if flag else 0.0], device=env.device)
    if env.world > 1:
        t = env.accelerator.reduce(t, reduction="sum")
    return float(t) > 0


def _average_gradients(params: list[Any], env: Env) -> None:
    """Data-parallel: average gradients over ranks (what DDP does, made explicit)."""
    import torch

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = env.accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n
