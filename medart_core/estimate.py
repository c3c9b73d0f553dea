"""Before a run: how much accelerator memory and time per step will it take? A simple model you can check
by hand, then measured for real by a short calibration job.

The model (all sizes in bytes; ``a`` = 2 for bf16 on a GPU, 4 for fp32 on a CPU):

* **weights**: the frozen DiT, VAE and (unless ``cache_features`` moves it off the device after the cache is
  built) T5, ``a`` bytes per parameter. Parameter counts are analytic from the architecture:
  DiT ``16 h^2`` per block, T5 ``4 d^2 + 3 d d_ff`` per layer (gated GELU) plus its embedding, the VAE's
  published 83.7 M for the SD VAE (scaled by width^2 for smaller ones).
* **trainable state**: LoRA parameters ``rank x sum(in + out)`` over the targeted linears (26 h per DiT block,
  8 d + 3 (d + d_ff) per T5 layer), each with fp32 weight, gradient and two Adam moments: 16 bytes
  (10 with 8-bit Adam).
* **activations kept for backward**, per sample: ``24 N h a`` per DiT block (N = (res / 8 / patch)^2 image
  tokens; Korthikanti et al. 2022 count 34 s h bytes per 16-bit transformer layer with fused attention,
  about 17 values per token and channel, plus cross-attention and adaLN ~ 7 more), ``(10 d + 4 d_ff) T a``
  per T5 layer when T5 is trained (T text tokens: 120, or ~64 with padding trimming), and for a pixel
  step: CFG doubles the DiT batch; with ``grad_path`` full the M sampling steps keep their activations
  (truncated: the last K), activation checkpointing keeps one step's worth instead; the VAE decoder's
  backward holds ``18 c (res / 2^l)^2 a`` per level l of width c. A pixel step's latent loss graph is alive
  at the same time.
* **peak** = weights + trainable state + max(latent step, pixel step) activations, plus 10 % and 0.5 GiB
  for the CUDA context and allocator fragmentation.
* **time**: FLOPs / effective device throughput. DiT forward ``2 x params x N + 4 N^2 h L + 4 N T h L``
  per sample, backward twice that; T5 ``2 x params x T``; VAE convolutions ``2 x 9 c^2 x pixels`` per 3x3
  conv. A pixel step runs M CFG forwards, the backward of the grad-carrying ones (recomputed once more with
  checkpointing) and the VAE decoder forward + backward. Effective throughput: 35 % of the device's dense
  bf16 peak (a table of common GPUs), or ~15 GFLOP/s per CPU thread in fp32; plus a dispatch cost per
  operator (30 us CPU, 15 us GPU; ~40 operators per block forward) and a fixed 0.02 s
  per step for data, optimiser and the metrics line, which is what dominates the tiny demo backbone.

It is a planning aid (expect +-50 %), not a promise: the **calibrate** button runs 4 real steps (two of them
pixel steps) as a short job and shows the measured time and peak memory next to these figures.

**Checkpointing only when memory needs it** (``hldf.checkpointing: auto``): activation checkpointing costs one
more DiT forward per grad-carrying sampling step (≈ +45 % per pixel step on the CPU `small` bench), so a run
asks :func:`choose_checkpointing` before it loads the model: the un-checkpointed peak of this model against
the memory free right now (CUDA: ``torch.cuda.mem_get_info``; CPU: ``MemAvailable``, via psutil when it is
installed, else ``/proc/meminfo``), with HEADROOM to spare for the model's ±50 %.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

GiB = 1024 ** 3
MFU = 0.35                      # fraction of the dense bf16 peak a training step reaches
CPU_FLOPS_PER_THREAD = 15e9     # fp32, small matmuls and convolutions on one core
CONTEXT_BYTES = 0.5 * GiB       # CUDA context, cuBLAS workspaces
FRAGMENTATION = 1.10
OPS_PER_BLOCK = 40             # tensor operators in one transformer block's forward
CPU_OP_S, GPU_OP_S = 30e-6, 15e-6          # dispatch cost per operator
CPU_STEP_S, GPU_STEP_S = 0.02, 0.02        # data loading, optimiser step, metrics line per step
HEADROOM = 0.75                # auto checkpointing: the un-checkpointed peak must fit in 75 % of free memory
SD_VAE_PARAMS = 83.65e6
SD_VAE_DECODER_SHARE = 0.59

# Dense bf16 tensor-core peaks (TFLOP/s), matched by substring of torch.cuda.get_device_name().
GPU_PEAK_TFLOPS = {
    "H200": 989, "H100": 989, "GH200": 989, "B200": 2250, "A100": 312, "A800": 312, "L40S": 362, "L40": 181,
    "A6000": 155, "A40": 150, "A10G": 70, "A10": 125, "L4": 121, "4090": 165, "3090": 71, "4080": 97,
    "V100": 125, "T4": 65,
}


# =========================================================================================================
# Architecture sizes
# =========================================================================================================
@dataclass(frozen=True)
class BackboneShape:
    """The sizes the model needs, read from a config or a known table (no weights loaded)."""

    label: str
    native_resolution: int
    dit_layers: int
    dit_hidden: int
    patch: int
    t5_layers: int
    t5_d_model: int
    t5_inner: int                  # heads x d_kv
    t5_d_ff: int
    t5_vocab: int
    vae_channels: tuple[int, ...]  # block_out_channels, finest first
    source: str                    # where the sizes came from

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)

    @property
    def dit_params(self) -> float:
        h = self.dit_hidden
        return self.dit_layers * 16 * h * h + 4096 * h + 8 * h * h   # blocks + caption projection, t / adaLN

    @property
    def t5_params(self) -> float:
        d = self.t5_d_model
        return self.t5_layers * (4 * d * self.t5_inner + 3 * d * self.t5_d_ff) + self.t5_vocab * d

    @property
    def vae_params(self) -> float:
        return SD_VAE_PARAMS * (max(self.vae_channels) / 512) ** 2

    def dit_lora_io(self) -> float:
        """sum(in + out) over the DiT linears the paper targets: q, k, v, out of self- and cross-attention (8 h
        each), the MLP (5 h twice), plus the patch/time/caption/adaLN projections (~15 h + 4,400)."""
        h = self.dit_hidden
        return self.dit_layers * 26 * h + 15 * h + 4400

    def t5_lora_io(self) -> float:
        d, inner, ff = self.t5_d_model, self.t5_inner, self.t5_d_ff
        return self.t5_layers * (4 * (d + inner) + 2 * (d + ff) + (ff + d))


XL2 = dict(dit_layers=28, dit_hidden=1152, patch=2, t5_layers=24, t5_d_model=4096, t5_inner=4096, t5_d_ff=10240,
           t5_vocab=32128, vae_channels=(128, 256, 512, 512))


def backbone_shape(spec: str) -> BackboneShape:
    """Sizes of ``spec``: the offline ``tiny``/``small`` presets, a diffusers folder or cached Hub model
    (from its config.json files), else PixArt-XL-2's published sizes (flagged as assumed)."""
    from .backbone import PRESETS

    if spec in PRESETS:
        p = PRESETS[spec]
        return BackboneShape(label=f"{spec} (random-weight demo backbone)", native_resolution=p.resolution,
                             dit_layers=p.dit_layers, dit_hidden=p.dit_heads * p.dit_head_dim, patch=2,
                             t5_layers=p.t5_layers, t5_d_model=p.t5_d_model, t5_inner=p.t5_d_model,
                             t5_d_ff=p.t5_d_ff, t5_vocab=1000, vae_channels=tuple(p.vae_channels),
                             source="preset sizes")
    configs = _read_configs(spec)
    if configs is not None:
        tr, te, vae = configs
        ch = tuple(int(c) for c in vae.get("block_out_channels", (128, 256, 512, 512)))
        heads, dim = int(tr.get("num_attention_heads", 16)), int(tr.get("attention_head_dim", 72))
        return BackboneShape(
            label=spec, native_resolution=int(tr.get("sample_size", 64)) * 2 ** (len(ch) - 1),
            dit_layers=int(tr.get("num_layers", 28)), dit_hidden=heads * dim, patch=int(tr.get("patch_size", 2)),
            t5_layers=int(te.get("num_layers", 24)), t5_d_model=int(te.get("d_model", 4096)),
            t5_inner=int(te.get("num_heads", 64)) * int(te.get("d_kv", 64)), t5_d_ff=int(te.get("d_ff", 10240)),
            t5_vocab=int(te.get("vocab_size", 32128)), vae_channels=ch, source="model config.json files")
    res = 1024 if "1024" in spec else 256 if "256" in spec else 512
    known = "PixArt-XL-2" in spec
    return BackboneShape(label=spec, native_resolution=res, **XL2,
                         source="PixArt-XL-2 published sizes" + ("" if known else " (assumed: model not found)"))


def _read_configs(spec: str) -> tuple[dict, dict, dict] | None:
    folder = Path(spec).expanduser()
    paths: list[Path | None]
    if folder.is_dir():
        paths = [folder / sub / "config.json" for sub in ("transformer", "text_encoder", "vae")]
    else:
        if spec.count("/") != 1:
            return None
        from huggingface_hub import try_to_load_from_cache

        paths = []
        for sub in ("transformer", "text_encoder", "vae"):
            hit = try_to_load_from_cache(spec, f"{sub}/config.json")
            paths.append(Path(hit) if isinstance(hit, str) else None)
    if not all(p is not None and p.is_file() for p in paths):
        return None
    try:
        return tuple(json.loads(p.read_text(encoding="utf-8")) for p in paths)  # type: ignore[return-value]
    except (OSError, json.JSONDecodeError):
        return None


# =========================================================================================================
# The device
# =========================================================================================================
@dataclass(frozen=True)
class DeviceInfo:
    kind: str                  # "cuda" | "cpu"
    name: str
    memory_bytes: float        # total accelerator memory (host RAM for the CPU)
    flops: float               # effective FLOP/s of a training step (the model's assumption)
    threads: int = 1

    @property
    def memory_gb(self) -> float:
        return self.memory_bytes / GiB


def detect_device() -> DeviceInfo:
    """The first CUDA device, else the CPU. Asks ``nvidia-smi`` first, so the caller (the web server) does not
    create a CUDA context of its own on the GPU the supervisor's jobs use; torch only when it is loaded."""
    import shutil
    import subprocess
    import sys

    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10)
            first = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
            if first:
                name, mib = first.rsplit(",", 1)
                return gpu_device(name.strip(), float(mib) * 2**20)
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return gpu_device(props.name, props.total_memory)
    try:
        threads = len(os.sched_getaffinity(0))
    except AttributeError:
        threads = os.cpu_count() or 1
    return cpu_device(threads)


def gpu_device(name: str, memory_bytes: float) -> DeviceInfo:
    peak = next((v for k, v in sorted(GPU_PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])) if k in name), 100)
    return DeviceInfo("cuda", name, float(memory_bytes), peak * 1e12 * MFU)


def cpu_device(threads: int = 1, memory_bytes: float | None = None) -> DeviceInfo:
    if memory_bytes is None:
        try:
            import psutil

            memory_bytes = float(psutil.virtual_memory().total)
        except Exception:
            memory_bytes = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    threads = max(1, int(threads))
    return DeviceInfo("cpu", f"CPU ({threads} thread{'s' if threads > 1 else ''})", memory_bytes,
                      CPU_FLOPS_PER_THREAD * threads, threads)


# =========================================================================================================
# The estimate
# =========================================================================================================
@dataclass
class Estimate:
    peak_bytes: float
    weights_bytes: float
    trainable_bytes: float
    latent_act_bytes: float
    pixel_act_bytes: float
    lora_params: float
    latent_step_s: float
    pixel_step_s: float
    mean_step_s: float
    total_steps: int | None
    total_s: float | None
    device: DeviceInfo
    shape: BackboneShape
    fits: bool
    warnings: list[str] = field(default_factory=list)
    checkpointing: bool = True      # what the estimate assumed (``auto`` resolved against the device's memory)
    precision: str = "fp32"         # the precision it assumed (bytes per frozen weight and activation)

    @property
    def peak_gb(self) -> float:
        return self.peak_bytes / GiB

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["peak_gb"] = round(self.peak_gb, 2)
        return d

    def markdown(self) -> str:
        g = lambda b: f"{b / GiB:.2f} GiB"   # noqa: E731
        mem_what = "accelerator memory" if self.device.kind == "cuda" else "RAM"
        lines = [
            f"**Estimated peak {mem_what}: {g(self.peak_bytes)}** of {self.device.memory_gb:.0f} GiB on "
            f"{self.device.name} — weights {g(self.weights_bytes)}, LoRA + optimiser {g(self.trainable_bytes)} "
            f"({self.lora_params / 1e6:.2f} M trainable parameters), activations {g(self.latent_act_bytes)} "
            f"(latent step) / {g(self.pixel_act_bytes)} (pixel step).",
            f"**Estimated time per step**: {_secs(self.latent_step_s)} latent, {_secs(self.pixel_step_s)} pixel, "
            f"{_secs(self.mean_step_s)} on average"
            + (f"; {self.total_steps} steps ≈ {_secs(self.total_s)}." if self.total_s is not None else "."),
            f"<small>Model sizes: {self.shape.source}. A planning estimate (±50 %): **Calibrate** measures.</small>",
        ]
        lines += [f"⚠️ {w}" for w in self.warnings]
        return "\n\n".join(lines)


def _secs(s: float | None) -> str:
    if s is None:
        return "?"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _vae_levels(shape: BackboneShape, res: int) -> list[tuple[int, float]]:
    return [(c, (res / 2 ** lvl) ** 2) for lvl, c in enumerate(shape.vae_channels)]


def assumed_precision(cfg: Any, device: DeviceInfo) -> str:
    """The precision a run of ``cfg`` would use on ``device`` (GPUs of the table are taken to support bf16:
    asking torch would create a CUDA context in the web server)."""
    from .precision import resolve_precision

    return resolve_precision(cfg.precision, device.kind, cuda_bf16=True)[0]


def estimate(cfg: Any, device: DeviceInfo | None = None, *, n_train_images: int | None = None,
             shape: BackboneShape | None = None, checkpointing: bool | None = None) -> Estimate:
    """Peak memory and time per step of ``cfg`` (a TrainConfig) on ``device`` (default: detected).

    ``checkpointing`` overrides ``cfg.hldf.checkpointing``; its ``auto`` is resolved here against the
    device's total memory (what a planning view can know; a run decides on free memory, see
    :func:`choose_checkpointing`).
    """
    device = device or detect_device()
    shape = shape or backbone_shape(cfg.backbone)
    if checkpointing is None:
        mode = cfg.hldf.checkpointing
        if mode == "auto":
            off = estimate(cfg, device, n_train_images=n_train_images, shape=shape, checkpointing=False)
            if off.peak_bytes <= HEADROOM * device.memory_bytes:
                return off
            return estimate(cfg, device, n_train_images=n_train_images, shape=shape, checkpointing=True)
        checkpointing = mode != "off"
    lora, hl = cfg.lora, cfg.hldf
    res = int(cfg.resolution or shape.native_resolution)
    on_gpu = device.kind == "cuda"
    precision = assumed_precision(cfg, device)
    a = 2 if precision == "bf16" else 4
    B = int(cfg.batch_size)
    N = (res / shape.vae_factor / shape.patch) ** 2
    T = 64 if cfg.trim_text_padding else 120
    h, L = shape.dit_hidden, shape.dit_layers
    train_t5 = bool(lora.t5_enabled)
    t5_on_device = not (cfg.cache_features and not train_t5)

    # ---- memory ---------------------------------------------------------------------------------------------
    weights = a * (shape.dit_params + shape.vae_params + (shape.t5_params if t5_on_device else 0))
    t5_rank = lora.t5_rank or lora.rank
    lora_params = lora.rank * shape.dit_lora_io() + (t5_rank * shape.t5_lora_io() if train_t5 else 0)
    if lora.use_dora:
        lora_params *= 1.05   # magnitude vectors
    per_param = 10 if cfg.optimizer == "adamw8bit" and on_gpu else 16
    trainable = lora_params * per_param
    dit_act = L * 24 * N * h * a                        # one sample, forward kept for backward
    t5_act = shape.t5_layers * (10 * shape.t5_d_model + 4 * shape.t5_d_ff) * T * a if train_t5 else 0.0
    latent_act = B * (dit_act + t5_act)
    grad_steps = int(hl.sample_steps) if hl.grad_path == "full" else min(int(hl.truncated_k), int(hl.sample_steps))
    kept_steps = 1 if checkpointing else grad_steps
    vae_dec_act = B * sum(18 * c * px * a for c, px in _vae_levels(shape, res))
    pixel_act = latent_act + kept_steps * 2 * B * dit_act + vae_dec_act
    peak = (weights + trainable + max(latent_act, pixel_act)) * FRAGMENTATION + (CONTEXT_BYTES if on_gpu else 0)

    # ---- time -----------------------------------------------------------------------------------------------
    dit_fwd = 2 * shape.dit_params * N + 4 * N * N * h * L + 4 * N * T * h * L   # one sample
    t5_fwd = 2 * shape.t5_params * T
    vae_enc = sum(2 * 9 * c * c * px * 4 for c, px in _vae_levels(shape, res))     # ~4 3x3 convs per level
    vae_dec = sum(2 * 9 * c * c * px * 7 for c, px in _vae_levels(shape, res))     # ~7 per level
    latent_flops = B * (3 * dit_fwd + (3 if train_t5 else 1) * t5_fwd * (0 if cfg.cache_features else 1)
                        + vae_enc * (0 if cfg.cache_features else 1))
    M = int(hl.sample_steps)
    pixel_flops = latent_flops + B * (M * 2 * dit_fwd + grad_steps * 2 * dit_fwd * (2 + (1 if checkpointing else 0))
                                      + vae_dec * (3 + (1 if checkpointing else 0)))
    # Small models are bound by per-operator dispatch and the step's fixed work (data, optimiser, log fsync).
    t5_layers_run = shape.t5_layers if not cfg.cache_features else 0
    latent_ops = 3 * OPS_PER_BLOCK * (L + t5_layers_run) + 150
    pixel_ops = latent_ops + OPS_PER_BLOCK * L * (2 * M + 2 * grad_steps) + 300
    op_s, fixed_s = (GPU_OP_S, GPU_STEP_S) if on_gpu else (CPU_OP_S, CPU_STEP_S)
    latent_s = latent_flops / device.flops + latent_ops * op_s + fixed_s
    pixel_s = pixel_flops / device.flops + pixel_ops * op_s + fixed_s
    n_every = max(1, int(hl.pixel_every))
    mean_s = ((n_every - 1) * latent_s + pixel_s) / n_every
    total_steps = None
    if cfg.max_steps:
        total_steps = int(cfg.max_steps)
    elif n_train_images:
        per_step = B * int(cfg.grad_accum)
        total_steps = int(cfg.epochs) * max(0, (n_train_images - int(cfg.val_images)) // per_step)
    total_s = mean_s * total_steps * int(cfg.grad_accum) if total_steps is not None else None
    mean_s *= int(cfg.grad_accum)

    fits = peak <= 0.92 * device.memory_bytes
    warnings = []
    if not fits:
        hint = "try batch 1, the small-gpu preset (frozen T5, truncated pixel gradients), checkpointing or a lower " \
               "resolution" if on_gpu else "lower the batch size or resolution"
        warnings.append(f"This will probably not fit: {peak / GiB:.1f} GiB estimated, {device.memory_gb:.0f} GiB on "
                        f"{device.name}; {hint}.")
    if not on_gpu and shape.dit_params > 1e8:
        warnings.append(f"No GPU detected: a {shape.dit_params / 1e9:.2f} B-parameter DiT on the CPU takes "
                        f"{_secs(mean_s)} per step. Use the cpu-smoke preset to check the pipeline.")
    return Estimate(peak_bytes=peak, weights_bytes=weights, trainable_bytes=trainable, latent_act_bytes=latent_act,
                    pixel_act_bytes=pixel_act, lora_params=lora_params, latent_step_s=latent_s, pixel_step_s=pixel_s,
                    mean_step_s=mean_s, total_steps=total_steps, total_s=total_s, device=device, shape=shape,
                    fits=fits, warnings=warnings, checkpointing=bool(checkpointing), precision=precision)


# =========================================================================================================
# Activation checkpointing only when memory needs it
# =========================================================================================================
def available_memory(kind: str) -> tuple[float, str]:
    """Bytes free for a run on device ``kind`` now, and where the figure comes from."""
    if kind == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info()
        return float(free), "torch.cuda.mem_get_info (free GPU memory)"
    try:
        import psutil

        return float(psutil.virtual_memory().available), "psutil available RAM"
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024, "/proc/meminfo MemAvailable"
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "total RAM (free RAM unknown)"


@dataclass(frozen=True)
class CheckpointingChoice:
    """What a run decided about activation checkpointing, and why (recorded in its provenance and log)."""

    requested: str                  # "auto" | "on" | "off"
    checkpointing: bool
    reason: str
    need_bytes: float | None = None     # estimated peak without checkpointing (auto only)
    budget_bytes: float | None = None   # free memory it was compared with (auto only)

    def to_dict(self) -> dict[str, Any]:
        return {"requested": self.requested, "checkpointing": "on" if self.checkpointing else "off",
                "reason": self.reason,
                "need_gib": None if self.need_bytes is None else round(self.need_bytes / GiB, 3),
                "budget_gib": None if self.budget_bytes is None else round(self.budget_bytes / GiB, 3)}


def choose_checkpointing(cfg: Any, device: DeviceInfo | None = None, *, budget_bytes: float | None = None,
                         shape: BackboneShape | None = None) -> CheckpointingChoice:
    """Resolve ``cfg.hldf.checkpointing``: "on"/"off" as configured; "auto" turns checkpointing off when the
    un-checkpointed peak fits in HEADROOM of ``budget_bytes`` (default: :func:`available_memory` of the
    device now), on otherwise. Call it before the model is loaded: the estimate counts the weights."""
    mode = cfg.hldf.checkpointing
    if mode != "auto":
        return CheckpointingChoice(mode, mode == "on", f"checkpointing {mode} as configured")
    device = device or detect_device()
    source = "given budget"
    if budget_bytes is None:
        budget_bytes, source = available_memory(device.kind)
    need = estimate(cfg, device, shape=shape, checkpointing=False).peak_bytes
    on = need > HEADROOM * budget_bytes
    verdict = ("does not fit, so checkpointing is on" if on else "fits, so checkpointing is off (one DiT "
               "forward less per grad-carrying sampling step)")
    return CheckpointingChoice("auto", on, f"auto: the un-checkpointed peak is ~{need / GiB:.2f} GiB against a "
                               f"budget of {HEADROOM:.0%} of {budget_bytes / GiB:.2f} GiB ({source}): it {verdict}",
                               need_bytes=need, budget_bytes=float(budget_bytes))


# =========================================================================================================
# Calibration: a few real steps as a short job
# =========================================================================================================
CALIBRATION_STEPS = 4      # steps 1, 3 latent; 2, 4 pixel (pixel_every 2); the first of each kind warms up


def calibration_config(cfg: Any) -> Any:
    """``cfg`` cut to 4 steps with a pixel step every 2, no checkpoint but the last, a minimal validation."""
    from .train_config import TrainConfig

    d = cfg.to_dict()
    d.update(max_steps=CALIBRATION_STEPS, checkpoint_every=10_000, validate_every=10_000, validation_steps=1,
             validation_seeds=[0], export_merged=False, keep_checkpoints=1)
    d["hldf"] = dict(d["hldf"], pixel_every=2)
    return TrainConfig.from_dict(d)


@dataclass
class Calibration:
    latent_step_s: float | None
    pixel_step_s: float | None
    peak_mem_mb: float | None
    steps: int

    def markdown(self, est: Estimate | None = None) -> str:
        mem = f"{self.peak_mem_mb / 1024:.2f} GiB" if self.peak_mem_mb else "?"
        s = (f"**Measured** ({self.steps} steps): latent step {_secs(self.latent_step_s)}, pixel step "
             f"{_secs(self.pixel_step_s)}, peak memory {mem}")
        if est is not None and self.latent_step_s:
            s += (f" (estimate: {_secs(est.latent_step_s)} / {_secs(est.pixel_step_s)} / "
                  f"{est.peak_gb:.2f} GiB)")
        return s + "."


def read_calibration(records: list[dict[str, Any]], batch_size: int) -> Calibration:
    """Measured step times from a calibration run's metrics (skipping the first step of each kind)."""
    steps = [r for r in records if "loss_latent" in r and r.get("images_per_s")]

    def t(rs: list[dict[str, Any]]) -> float | None:
        rs = rs[1:] or rs
        return sum(batch_size / r["images_per_s"] for r in rs) / len(rs) if rs else None

    peak = max((r.get("peak_mem_mb") or 0 for r in steps), default=None)
    return Calibration(t([r for r in steps if not r.get("pixel_step")]), t([r for r in steps if r.get("pixel_step")]),
                       peak or None, len(steps))
