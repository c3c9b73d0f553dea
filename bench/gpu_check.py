"""One-GPU check of HLDF at PixArt-XL-2-512 size: the reference approach and ours, in the same run.

Builds PixArt-XL-2-512-sized components with random weights (no downloads, no network):
  DiT      28 blocks, hidden 1152 = 16 heads x 72, patch 2, in 4 / out 8 channels, sample 64 (512 px),
           caption channels 4096 (~0.61 B parameters)
  T5       v1.1-XXL encoder: d_model 4096, 24 layers, 64 heads x 64, d_ff 10240, gated-GELU, vocab 32128
           (~4.76 B parameters), built directly on the device in the run's dtype (never a CPU fp32 copy)
  VAE      the SD VAE config: block_out_channels 128/256/512/512, 2 layers per block, scaling 0.18215
and measures, with bf16 frozen weights and fp32 LoRA (rank 8 on the DiT and on T5):

  pixel step (batch 1, M=20, CFG 4.5, negative prompt ""): time and peak memory of
    ref        the reference approach: DiT + VAE reloaded from local disk (``from_pretrained``) at every
               pixel step, the trained DiT/T5 plugged into a stock ``PixArtAlphaPipeline`` whose
               ``__call__`` runs without its ``no_grad``, the reloaded VAE decodes; full backprop, no
               checkpointing. T5's reload is timed once (``--t5-reload once``) or every step (``every``).
    full       ours: ``hldf.pixel_loss``, gradients through all M steps + VAE decoder + T5, checkpointing
    truncated  ours with ``grad_path="truncated"``, K=2
    full_auto, truncated_auto  ours as ``train --precision auto --hldf.checkpointing auto`` runs them: the
               forward passes under ``precision.autocast`` of the resolved precision (bf16 on a bf16 GPU) and
               checkpointing on or off as ``estimate.choose_checkpointing`` decides against the free memory
               (the choice and its reason are in ``pixel_step.auto_choices``)
  latent step: images/s at batch 4 and 1, ours with cached T5 embeddings + VAE posteriors vs the
    reference's work per step (T5 with LoRA + VAE encoder every step), both with an AdamW step
  generation: s/image, ``pixart.sample_latents`` (no grad) + ``decode`` vs stock ``PixArtAlphaPipeline``
    over the same components, M steps, CFG 4.5

Peak memory on CUDA is ``torch.cuda.max_memory_allocated`` (reset before each measurement; it includes the
resident weights, so it is what a card of that size must hold). On CPU (``--size tiny --device cpu``, the
same code path, used by the tests) it is the peak resident-set size of the process. Out-of-memory in a
variant is caught and reported as "OOM" (a result, not a crash). Goals printed as PASS/FAIL: full-mode
peak < 80 GB, truncated-mode peak < 24 GB. The last line printed is one JSON object with every figure.

    python bench/gpu_check.py --size xl --device cuda          # on an H100/H200 (via bench/gpu_check.sh)
    python bench/gpu_check.py --size tiny --device cpu --steps 3   # the same path on CPU in seconds
    python bench/gpu_check.py --size xl --dry-run               # plan, parameter counts, weight memory

Weights are random: losses and images are meaningless, only times and memory are measured. The tokenizer
is the repository's offline test tokenizer (prompts are padded to 120 tokens as PixArt does, so the cost
is that of the real tokenizer).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # typing.Self is 3.11+; the GPU machine's Python may be older
    from typing import Self

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROMPT = "An endoscopic image of a polyp with red mucosa"
GUIDANCE = 4.5
TRUNCATED_K = 2
LORA_RANK = 8
GOALS_GB = {"full": 80.0, "truncated": 24.0}  # the issue's targets, batch 1, M=20
GB = 1e9


@dataclass(frozen=True)
class Sizes:
    """Architecture sizes of the random components (``xl`` = PixArt-XL-2-512 + T5 v1.1 XXL + SD VAE)."""

    name: str
    resolution: int
    dit_layers: int
    dit_heads: int
    dit_head_dim: int
    t5_vocab: int | None  # None: the tokenizer's size (tiny)
    t5_d_model: int
    t5_layers: int
    t5_heads: int
    t5_d_kv: int
    t5_d_ff: int
    t5_buckets: int
    t5_max_distance: int
    vae_channels: tuple[int, ...]
    vae_layers_per_block: int
    vae_groups: int


SIZES: dict[str, Sizes] = {
    "xl": Sizes(name="xl", resolution=512, dit_layers=28, dit_heads=16, dit_head_dim=72, t5_vocab=32128,
                t5_d_model=4096, t5_layers=24, t5_heads=64, t5_d_kv=64, t5_d_ff=10240, t5_buckets=32,
                t5_max_distance=128, vae_channels=(128, 256, 512, 512), vae_layers_per_block=2, vae_groups=32),
    # medart_core.backbone's "tiny" preset sizes, but built by this file's builder so CPU runs the XL path.
    "tiny": Sizes(name="tiny", resolution=64, dit_layers=2, dit_heads=2, dit_head_dim=16, t5_vocab=None,
                  t5_d_model=32, t5_layers=2, t5_heads=4, t5_d_kv=8, t5_d_ff=64, t5_buckets=8,
                  t5_max_distance=32, vae_channels=(8, 16, 16, 16), vae_layers_per_block=2, vae_groups=4),
}


# --------------------------------------------------------------------------------------------------------
# building


@contextlib.contextmanager
def _factory_defaults(device: Any, dtype: Any):
    """Create every parameter directly on ``device`` in ``dtype``: T5-XXL in fp32 on the CPU would be
    19 GB and minutes of init; on the GPU in bf16 it is ~9.5 GB and the library's init takes seconds."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def build_models(sizes: Sizes, vocab: int, device: Any, dtype: Any, seed: int = 0) -> dict[str, Any]:
    """The DiT, T5 encoder and VAE of ``sizes``, random weights, frozen, on ``device`` in ``dtype``.

    ``device="meta"`` builds shapes only (parameter counts in milliseconds, no memory).
    """
    import torch
    from diffusers import AutoencoderKL, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    s = sizes
    n = len(s.vae_channels)
    out: dict[str, Any] = {}
    times: dict[str, float] = {}
    if str(device) != "meta":
        torch.manual_seed(seed)
    with _factory_defaults(device, dtype):
        t0 = time.perf_counter()
        out["text_encoder"] = T5EncoderModel(T5Config(
            vocab_size=vocab, d_model=s.t5_d_model, d_kv=s.t5_d_kv, d_ff=s.t5_d_ff, num_layers=s.t5_layers,
            num_heads=s.t5_heads, relative_attention_num_buckets=s.t5_buckets,
            relative_attention_max_distance=s.t5_max_distance, dropout_rate=0.0, feed_forward_proj="gated-gelu",
            layer_norm_epsilon=1e-6, is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0, tie_word_embeddings=False,
        ))
        times["text_encoder"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        out["vae"] = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=s.vae_channels,
            layers_per_block=s.vae_layers_per_block, act_fn="silu", latent_channels=4, norm_num_groups=s.vae_groups,
            sample_size=s.resolution, scaling_factor=0.18215,
        )
        times["vae"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        hidden = s.dit_heads * s.dit_head_dim
        out["transformer"] = PixArtTransformer2DModel(
            num_attention_heads=s.dit_heads, attention_head_dim=s.dit_head_dim, in_channels=4, out_channels=8,
            num_layers=s.dit_layers, cross_attention_dim=hidden, caption_channels=s.t5_d_model,
            sample_size=s.resolution // 2 ** (n - 1), patch_size=2, norm_type="ada_norm_single",
            norm_elementwise_affine=False, norm_eps=1e-6, attention_bias=True, activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000, use_additional_conditions=False,
        )
        times["transformer"] = time.perf_counter() - t0
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()  # `.to(dtype)` warns about keep-in-fp32 modules; PixArt/the VAE have none
    dlog.disable_progress_bar()
    from transformers.utils import logging as tlog

    tlog.disable_progress_bar()  # save/load shard bars would drown the figures in the log
    for m in out.values():
        # Buffers built from numpy in __init__ (the DiT's sin-cos position table) land on the CPU: move them.
        m.to(device=device, dtype=dtype)
        m.eval().requires_grad_(False)
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    out["build_s"] = times
    return out


def build_backbone(sizes: Sizes, device: Any, dtype: Any, seed: int = 0):
    """A ``medart_core.backbone.Backbone`` over :func:`build_models` (scheduler = PixArt's DPM-Solver++)."""
    from diffusers import DPMSolverMultistepScheduler

    from medart_core.backbone import PIXART_SCHEDULER_CONFIG, Backbone, load_tokenizer

    tok = load_tokenizer("tiny")
    vocab = sizes.t5_vocab or len(tok)
    if vocab < len(tok):
        raise ValueError(f"T5 vocab {vocab} is smaller than the tokenizer's {len(tok)}")
    parts = build_models(sizes, vocab, device, dtype, seed)
    bb = Backbone(spec=f"{sizes.name}-random", tokenizer=tok, text_encoder=parts["text_encoder"], vae=parts["vae"],
                  transformer=parts["transformer"], scheduler=DPMSolverMultistepScheduler(**PIXART_SCHEDULER_CONFIG),
                  resolution=sizes.resolution, is_random=True)
    return bb, parts["build_s"]


def n_params(module: Any, *, trainable: bool | None = None) -> int:
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


def lora_config():
    from medart_core.lora import LoRAConfig

    return LoRAConfig(rank=LORA_RANK, alpha=float(LORA_RANK), t5_enabled=True)


# --------------------------------------------------------------------------------------------------------
# measuring


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: no CPU memory figure
        return 0


class Meter:
    """Wall time and peak memory of one measurement.

    CUDA: synchronise, reset the peak counter, run, synchronise, read ``max_memory_allocated``.
    CPU: sample the process RSS every 2 ms in a thread (torch's CPU allocations are invisible otherwise).
    """

    def __init__(self, device: Any):
        import torch

        self.torch = torch
        self.cuda = torch.device(device).type == "cuda"
        self.seconds = 0.0
        self.peak = 0

    def __enter__(self) -> Self:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
        else:
            self.peak = _rss()
            self._stop = threading.Event()
            self._t = threading.Thread(target=self._sample, daemon=True)
            self._t.start()
        self._t0 = time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> bool:
        if self.cuda:
            with contextlib.suppress(Exception):  # after an OOM the device is still usable; be safe anyway
                self.torch.cuda.synchronize()
            self.seconds = time.perf_counter() - self._t0
            self.peak = int(self.torch.cuda.max_memory_allocated())
        else:
            self.seconds = time.perf_counter() - self._t0
            self._stop.set()
            self._t.join()
            self.peak = max(self.peak, _rss())
        return False

    def current(self) -> int:
        return int(self.torch.cuda.memory_allocated()) if self.cuda else _rss()


def _is_oom(exc: BaseException) -> bool:
    import torch

    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
    return isinstance(exc, oom_types) or "out of memory" in str(exc).lower()


def _free(device: Any) -> None:
    import torch

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def measure(name: str, fn: Callable[[], dict[str, Any] | None], *, runs: int, device: Any,
            before: Callable[[], None] | None = None, after_first: Callable[[], None] | None = None,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``fn`` ``runs`` times (the first is a warm-up when runs > 1) and collect time and peak memory.

    The result's ``status`` is "ok", "OOM" (out of memory: reported, not raised) or "error: ...".
    ``time_s`` is the best timed run; ``peak_gb`` the largest peak of all runs (the warm-up included:
    memory does not warm up). ``fn`` may return extra figures (e.g. the reload time), kept per run.
    ``before`` runs ahead of every run, ``after_first`` after the first successful one, both untimed.
    """
    res: dict[str, Any] = {"status": "ok", "times_s": [], "peaks_gb": []}
    for r in range(runs):
        if before is not None:
            before()
        _free(device)
        meter = Meter(device)
        base = meter.current()
        try:
            with meter:
                extra = fn() or {}
        except Exception as exc:  # noqa: BLE001 - OOM is a result; anything else is reported, not fatal
            # (the traceback, which pins the failed step's tensors, dies with `exc` at the end of this block)
            res["status"] = "OOM" if _is_oom(exc) else f"error: {type(exc).__name__}: {str(exc)[:300]}"
            if res["status"] != "OOM":
                traceback.print_exc()  # into the log: one GPU run must be enough to diagnose
            res["peak_at_failure_gb"] = meter.peak / GB
            break
        res["times_s"].append(meter.seconds)
        res["peaks_gb"].append(meter.peak / GB)
        res["resident_before_gb"] = base / GB
        for k, v in extra.items():
            res.setdefault(k, []).append(v)
        if r == 0 and after_first is not None:
            after_first()
    if before is not None:
        before()
    _free(device)
    if res["status"] == "ok":
        timed = res["times_s"][1:] if len(res["times_s"]) > 1 else res["times_s"]
        res["time_s"] = min(timed)
        res["peak_gb"] = max(res["peaks_gb"])
        # What the step itself added on top of what was resident (weights, LoRA, optimiser state).
        res["step_extra_gb"] = res["peak_gb"] - res["resident_before_gb"]
        log(f"  {name:<28} {res['time_s']:8.3f} s   peak {res['peak_gb']:8.3f} GB")
    else:
        res["time_s"] = None
        res["peak_gb"] = None
        log(f"  {name:<28} {res['status']}")
    return res


def goals(pixel: dict[str, dict[str, Any]], limits: dict[str, float]) -> dict[str, dict[str, Any]]:
    """PASS when the variant ran and its peak is below the limit; FAIL when above or out of memory;
    NOT MEASURED when it was skipped or failed for another reason (no figure to judge)."""
    out: dict[str, dict[str, Any]] = {}
    for variant, limit in limits.items():
        r = pixel.get(variant) or {"status": "skipped"}
        if r.get("status") == "ok" and r.get("peak_gb") is not None:
            verdict = "PASS" if float(r["peak_gb"]) < float(limit) else "FAIL"
        elif r.get("status") == "OOM":
            verdict = "FAIL"
        else:
            verdict = "NOT MEASURED"
        out[f"{variant}_peak_lt_{limit:g}gb"] = {"verdict": verdict, "peak_gb": r.get("peak_gb"),
                                                 "limit_gb": float(limit), "status": r.get("status")}
    return out


# --------------------------------------------------------------------------------------------------------
# the variants


class Check:
    """State shared by the measurements of one run (backbone, inputs, temp folder, results)."""

    def __init__(self, args: argparse.Namespace):
        import torch

        self.args = args
        self.torch = torch
        self.device = torch.device(args.device)
        self.dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[args.dtype]
        self.sizes = SIZES[args.size]
        self.t_start = time.perf_counter()
        self.deadline = self.t_start + args.budget_s if args.budget_s > 0 else float("inf")
        self.results: dict[str, Any] = {}
        self.simulate_oom = {v for v in (args.simulate_oom or "").split(",") if v}
        self.grads: dict[str, Any] = {}
        self.auto_choices: dict[str, dict[str, Any]] = {}   # grad path -> the checkpointing: auto decision

    # -- bookkeeping --
    def log(self, msg: str) -> None:
        print(msg, flush=True)

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def has_time(self, need_s: float, what: str) -> bool:
        if self.left() >= need_s:
            return True
        self.log(f"  {what}: skipped, {self.left():.0f} s left of the time budget (needs ~{need_s:.0f} s)")
        return False

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def save_partial(self) -> None:
        if self.args.json_out:
            Path(self.args.json_out).write_text(json.dumps(self.summary(), default=str, indent=1))

    def _maybe_oom(self, variant: str) -> None:
        # Test hook: exercise the OOM path on machines that cannot run out of memory on demand.
        if variant in self.simulate_oom:
            raise self.torch.OutOfMemoryError(f"simulated out of memory in {variant} (--simulate-oom)")

    # -- setup --
    def setup(self) -> None:
        torch = self.torch
        from medart_core.lora import attach_lora, trainable_parameters

        t0 = time.perf_counter()
        self.bb, build_s = build_backbone(self.sizes, self.device, self.dtype, seed=self.args.seed)
        build_s["total"] = time.perf_counter() - t0
        self.results["build_s"] = build_s
        self.results["params"] = {"dit": n_params(self.bb.transformer), "t5": n_params(self.bb.text_encoder),
                                  "vae": n_params(self.bb.vae)}
        self.log(f"built {self.sizes.name}: DiT {self.results['params']['dit'] / 1e9:.3f} B, "
                 f"T5 {self.results['params']['t5'] / 1e9:.3f} B, VAE {self.results['params']['vae'] / 1e6:.1f} M "
                 f"parameters in {build_s['total']:.1f} s")
        # The reference reloads the base components from disk; write them once, before LoRA is attached.
        self.tmp = Path(tempfile.mkdtemp(prefix="medart_gpu_check_", dir=self.args.tmp_dir))
        parts = ["transformer", "vae"] + (["text_encoder"] if self.args.t5_reload != "skip" else [])
        t0 = time.perf_counter()
        save_s = {}
        for part in parts:
            t1 = time.perf_counter()
            getattr(self.bb, part).save_pretrained(str(self.tmp / part), safe_serialization=True)
            save_s[part] = time.perf_counter() - t1
        save_s["total"] = time.perf_counter() - t0
        self.results["save_s"] = save_s
        self.log(f"saved {', '.join(parts)} to {self.tmp} in {save_s['total']:.1f} s (once, as a training "
                 "script starts)")

        torch.manual_seed(self.args.seed)
        attach_lora(self.bb, lora_config())
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # a mid-training state (B != 0), so every LoRA matrix gets a gradient
            for p in trainable_parameters(self.bb):
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.device, p.dtype))
        rep = self.bb.extra["lora_report"]
        self.results["params"]["lora_trainable"] = rep.n_trainable
        self.results["params"]["lora_dit"] = n_params(self.bb.transformer, trainable=True)
        self.results["params"]["lora_t5"] = n_params(self.bb.text_encoder, trainable=True)
        self.log("LoRA: " + rep.summary())

        res = self.bb.resolution
        gen = torch.Generator().manual_seed(2)
        self.real = (torch.rand(1, 3, res, res, generator=gen) * 2 - 1).to(self.device)
        self.noise = torch.randn(1, 4, self.bb.latent_size, self.bb.latent_size,
                                 generator=torch.Generator().manual_seed(3)).to(self.device, self.dtype)
        self.sync()

    def snapshot_grads(self, name: str) -> None:
        """Keep the LoRA gradients of one pixel step (CPU, fp32) to compare ours with the reference's."""
        torch = self.torch
        from medart_core.lora import trainable_parameters

        flat = [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().flatten().cpu()
                for p in trainable_parameters(self.bb)]
        self.grads[name] = torch.cat(flat)

    def zero_grad(self) -> None:
        for m in (self.bb.transformer, self.bb.text_encoder):
            m.zero_grad(set_to_none=True)

    # -- pixel steps --
    def pixel_ours(self, grad_path: str, *, auto: bool = False) -> dict[str, Any]:
        from medart_core.hldf import HLDFConfig, pixel_loss
        from medart_core.pixart import encode_prompts, tokenize_prompts
        from medart_core.precision import autocast

        variant = grad_path + ("_auto" if auto else "")
        self._maybe_oom(variant)
        ckpt, precision = (self.auto_choice(grad_path)["checkpointing"] == "on", self.auto_precision[0]) \
            if auto else (True, "fp32")
        cfg = HLDFConfig(sample_steps=self.args.steps, guidance=GUIDANCE, grad_path=grad_path,
                         truncated_k=TRUNCATED_K, checkpointing=ckpt, negative_prompt="")
        with autocast(precision, self.device):
            ids, mask = tokenize_prompts(self.bb.tokenizer, [PROMPT])
            emb, m = encode_prompts(self.bb, ids, mask)
            loss = pixel_loss(self.bb, emb.to(self.dtype), m, self.real, cfg, generator=None, noise=self.noise)
        loss.backward()
        return {"loss": float(loss.detach())}

    @property
    def auto_precision(self) -> tuple[str, str]:
        from medart_core.precision import resolve_precision

        return resolve_precision("auto", self.device)

    def auto_choice(self, grad_path: str) -> dict[str, Any]:
        """``hldf.checkpointing: auto`` for this size and grad path, decided as a training run decides it (the
        estimate's un-checkpointed peak against the memory free now, weights already resident here, so the
        budget is free memory plus what the resident weights take)."""
        if grad_path in self.auto_choices:
            return self.auto_choices[grad_path]
        from medart_core.estimate import BackboneShape, available_memory, choose_checkpointing, cpu_device, gpu_device
        from medart_core.train_config import TrainConfig

        z = self.sizes
        shape = BackboneShape(label=z.name, native_resolution=z.resolution, dit_layers=z.dit_layers,
                              dit_hidden=z.dit_heads * z.dit_head_dim, patch=2, t5_layers=z.t5_layers,
                              t5_d_model=z.t5_d_model, t5_inner=z.t5_heads * z.t5_d_kv, t5_d_ff=z.t5_d_ff,
                              t5_vocab=z.t5_vocab or 1000, vae_channels=tuple(z.vae_channels), source="gpu_check sizes")
        cfg = TrainConfig.from_dict({"backbone": z.name, "resolution": z.resolution, "batch_size": 1,
                                     "precision": "auto", "lora": {"rank": LORA_RANK, "t5_enabled": True},
                                     "hldf": {"sample_steps": self.args.steps, "grad_path": grad_path,
                                              "truncated_k": TRUNCATED_K, "checkpointing": "auto"}})
        torch = self.torch
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            dev = gpu_device(props.name, props.total_memory)
        else:
            dev = cpu_device(torch.get_num_threads())
        free, source = available_memory(self.device.type)
        resident = Meter(self.device).current() if self.device.type == "cuda" else 0
        choice = choose_checkpointing(cfg, dev, budget_bytes=free + resident, shape=shape).to_dict()
        choice["budget_source"] = source + (" + resident weights" if resident else "")
        self.auto_choices[grad_path] = choice
        self.log(f"  checkpointing auto ({grad_path}): {choice['reason']}")
        return choice

    def _reload(self, parts: list[str]) -> dict[str, Any]:
        from diffusers import AutoencoderKL, PixArtTransformer2DModel
        from transformers import T5EncoderModel

        cls = {"transformer": PixArtTransformer2DModel, "vae": AutoencoderKL, "text_encoder": T5EncoderModel}
        out = {}
        for part in parts:
            m = cls[part].from_pretrained(str(self.tmp / part), torch_dtype=self.dtype)
            out[part] = m.to(self.device).eval().requires_grad_(False)
        self.sync()
        return out

    def pixel_ref(self) -> dict[str, Any]:
        """The reference's pixel step (see the module docstring); reload time is part of the step."""
        from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline

        from medart_core.hldf import color_moment_loss

        t0 = time.perf_counter()
        parts = ["transformer", "vae"] + (["text_encoder"] if self.args.t5_reload == "every" else [])
        loaded = self._reload(parts)
        reload_s = time.perf_counter() - t0
        self._maybe_oom("ref")
        vae = loaded.pop("vae")
        # The trained DiT and T5 replace the freshly loaded ones, which are dropped as the reference drops them.
        loaded.clear()
        pipe = PixArtAlphaPipeline(tokenizer=self.bb.tokenizer, text_encoder=self.bb.text_encoder, vae=vae,
                                   transformer=self.bb.transformer,
                                   scheduler=DPMSolverMultistepScheduler.from_config(self.bb.scheduler.config))
        pipe.set_progress_bar_config(disable=True)
        call = PixArtAlphaPipeline.__call__.__wrapped__  # the stock pipeline without its @torch.no_grad()
        latents = call(pipe, prompt=PROMPT, negative_prompt="", num_inference_steps=self.args.steps,
                       guidance_scale=GUIDANCE, height=self.bb.resolution, width=self.bb.resolution,
                       latents=self.noise.clone(), use_resolution_binning=False, clean_caption=False,
                       output_type="latent", return_dict=False)[0]
        image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
        loss = color_moment_loss(image, self.real, "paper")
        loss.backward()
        return {"loss": float(loss.detach()), "reload_s": reload_s}

    def run_pixel(self) -> None:
        self.log(f"pixel step: batch 1, M={self.args.steps}, CFG {GUIDANCE}, {self.args.dtype} frozen weights, "
                 f"fp32 LoRA r{LORA_RANK}")
        pixel = self.results.setdefault("pixel_step", {})
        runs = 1 + self.args.repeats
        plan = [("truncated", lambda: self.pixel_ours("truncated")), ("full", lambda: self.pixel_ours("full")),
                ("truncated_auto", lambda: self.pixel_ours("truncated", auto=True)),
                ("full_auto", lambda: self.pixel_ours("full", auto=True)),
                ("ref", self.pixel_ref)]  # ours first: an OOM in ref must not fragment the heap they run on
        pixel["auto_precision"] = dict(zip(("precision", "reason"), self.auto_precision))
        pixel["auto_choices"] = self.auto_choices
        for name, fn in plan:
            if not self.has_time(self.args.section_min_s, f"pixel step {name}"):
                pixel[name] = {"status": "skipped (time budget)", "time_s": None, "peak_gb": None}
                continue
            pixel[name] = measure(f"pixel step {name}", fn, runs=runs, device=self.device, before=self.zero_grad,
                                  after_first=(lambda n=name: self.snapshot_grads(n)) if name != "truncated" else None,
                                  log=self.log)
            self.save_partial()
        ref = pixel.get("ref", {})
        if ref.get("reload_s"):
            timed = slice(1, None) if len(ref["reload_s"]) > 1 else slice(None)
            ref["reload_time_s"] = min(ref["reload_s"][timed])
            ref["time_without_reload_s"] = min(t - r for t, r in zip(ref["times_s"][timed], ref["reload_s"][timed]))
            ref["reloaded_parts"] = ["transformer", "vae"] + (["text_encoder"] if self.args.t5_reload == "every"
                                                              else [])
        if "ref" in self.grads and "full" in self.grads:
            a, b = self.grads["ref"], self.grads["full"]
            # Same forward maths: the gradients should agree up to the dtype's rounding.
            pixel["grad_max_rel_diff_full_vs_ref"] = float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))
            pixel["grad_cosine_full_vs_ref"] = float(self.torch.nn.functional.cosine_similarity(a, b, dim=0))
        self.grads.clear()
        for v in ("full", "truncated", "full_auto", "truncated_auto"):
            if ref.get("time_s") and (pixel.get(v) or {}).get("time_s"):
                pixel[f"time_ratio_ref_over_{v}"] = ref["time_s"] / pixel[v]["time_s"]

    def run_t5_reload_once(self) -> None:
        if self.args.t5_reload != "once" or not self.has_time(self.args.section_min_s, "T5 reload"):
            return
        t0 = time.perf_counter()
        loaded = self._reload(["text_encoder"])
        dt = time.perf_counter() - t0
        del loaded
        _free(self.device)
        self.results["t5_reload_s"] = dt
        self.log(f"  T5 reload from disk (once)     {dt:8.3f} s   (the reference pays this per pixel step too)")
        ref = self.results.get("pixel_step", {}).get("ref", {})
        if ref.get("status") == "ok":
            ref["time_with_t5_reload_s"] = ref["time_s"] + dt

    # -- latent steps --
    def run_latent(self) -> None:
        from medart_core.hldf import HLDFConfig
        from medart_core.lora import trainable_parameters

        cfg = HLDFConfig(pixel_every=10**9)  # never a pixel step: the latent-only objective
        opt = self.torch.optim.AdamW(trainable_parameters(self.bb), lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2)
        out = self.results.setdefault("latent_step", {})
        self.log(f"latent step (loss + backward + AdamW), {self.args.latent_iters} timed iterations")
        for b in self.args.latent_batches:
            if not self.has_time(self.args.section_min_s, f"latent step batch {b}"):
                out[f"ref_b{b}"] = out[f"ours_cached_b{b}"] = {"status": "skipped (time budget)"}
                continue
            self._latent_batch(b, opt, cfg, out)
            ref_r, ours_r = out[f"ref_b{b}"], out[f"ours_cached_b{b}"]
            if ref_r.get("images_per_s") and ours_r.get("images_per_s"):
                out[f"speedup_b{b}"] = ours_r["images_per_s"] / ref_r["images_per_s"]
        opt.state.clear()
        self.zero_grad()
        _free(self.device)

    def _latent_batch(self, b: int, opt: Any, cfg: Any, out: dict[str, Any]) -> None:
        """Time ``latent_iters`` training steps at batch ``b``: the reference's per-step work, then ours."""
        torch = self.torch
        from medart_core.hldf import hybrid_loss
        from medart_core.pixart import tokenize_prompts

        res, vae = self.bb.resolution, self.bb.vae
        gen = torch.Generator().manual_seed(10 + b)
        px = (torch.rand(b, 3, res, res, generator=gen) * 2 - 1).to(self.device, self.dtype)
        ids, mask = tokenize_prompts(self.bb.tokenizer, [PROMPT] * b)
        with torch.no_grad():  # the feature cache: computed once, before training
            emb = self.bb.text_encoder(ids.to(self.device), attention_mask=mask.to(self.device))[0]
            dist = vae.encode(px).latent_dist
            mean, std = dist.mean.clone(), dist.std.clone()
        cached_mask = mask.to(self.device)

        def ref_batch() -> dict[str, Any]:  # T5 (with its LoRA, so with grad) + VAE encoder every step
            return {"pixel_values": px, "input_ids": ids, "attention_mask": mask}

        def cached_batch() -> dict[str, Any]:
            z = (mean + std * torch.randn_like(std)) * vae.config.scaling_factor  # a posterior sample, as uncached
            return {"latents": z, "prompt_embeds": emb, "prompt_mask": cached_mask}

        def step(batch_fn: Callable[[], dict[str, Any]], variant: str) -> None:
            self._maybe_oom(variant)
            loss, _ = hybrid_loss(0, self.bb, batch_fn(), cfg, generator=None)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for name, batch_fn in ((f"ref_b{b}", ref_batch), (f"ours_cached_b{b}", cached_batch)):
            variant = "latent_" + name.rsplit("_b", 1)[0]  # --simulate-oom names: latent_ref, latent_ours_cached

            def loop(batch_fn: Callable[[], dict[str, Any]] = batch_fn, variant: str = variant) -> dict[str, Any]:
                for _ in range(self.args.latent_iters):
                    step(batch_fn, variant)
                return {}

            self.zero_grad()
            with contextlib.suppress(Exception):  # one untimed step: kernels, allocator, AdamW state;
                step(batch_fn, variant)  # a failing warm-up fails again, measured, below
            r = measure(f"latent {name} (x{self.args.latent_iters})", loop, runs=1, device=self.device,
                        before=self.zero_grad, log=self.log)
            if r["status"] == "ok":
                r["images_per_s"] = b * self.args.latent_iters / r["time_s"]
                r["step_s"] = r["time_s"] / self.args.latent_iters
                self.log(f"    -> {r['images_per_s']:.2f} images/s")
            out[name] = r
            self.save_partial()

    # -- generation --
    def run_generation(self) -> None:
        torch = self.torch
        from medart_core.pixart import decode, encode_text, sample_latents

        if not self.has_time(self.args.section_min_s, "generation"):
            self.results["generation"] = {"status": "skipped (time budget)"}
            return
        self.zero_grad()
        self.log(f"generation: 1 image, {self.args.steps} steps, CFG {GUIDANCE}")
        res = self.bb.resolution
        images: dict[str, Any] = {}

        def ours() -> dict[str, Any]:
            with torch.no_grad():
                emb, m = encode_text(self.bb, [PROMPT])
                neg, negm = encode_text(self.bb, [""])
                lat = sample_latents(self.bb, emb.to(self.dtype), m, neg.to(self.dtype), negm, steps=self.args.steps,
                                    guidance=GUIDANCE, latents=self.noise.clone())
                images["ours"] = (decode(self.bb.vae, lat) / 2 + 0.5).clamp(0, 1)  # as output_type="pt" returns
            return {}

        pipe = self.bb.pipeline()
        pipe.set_progress_bar_config(disable=True)

        def stock() -> dict[str, Any]:
            images["pipeline"] = pipe(prompt=PROMPT, negative_prompt="", num_inference_steps=self.args.steps,
                                      guidance_scale=GUIDANCE, height=res, width=res, latents=self.noise.clone(),
                                      use_resolution_binning=False, clean_caption=False, output_type="pt",
                                      return_dict=False)[0]
            return {}

        runs = 1 + self.args.repeats
        gen = {"ours": measure("generate ours", ours, runs=runs, device=self.device, log=self.log),
               "pipeline": measure("generate PixArtAlphaPipeline", stock, runs=runs, device=self.device,
                                   log=self.log)}
        for r in gen.values():
            if r["status"] == "ok":
                r["s_per_image"] = r["time_s"]
        if "ours" in images and "pipeline" in images:
            a, b = images["ours"].float().cpu(), images["pipeline"].float().cpu()
            # Same noise, same components: the two samplers should agree up to bf16 rounding.
            gen["max_abs_diff_ours_vs_pipeline"] = float((a - b).abs().max()) if a.shape == b.shape else None
        self.results["generation"] = gen
        images.clear()
        _free(self.device)

    # -- report --
    def summary(self) -> dict[str, Any]:
        import diffusers
        import peft
        import transformers

        torch = self.torch
        pixel = self.results.get("pixel_step", {})
        limits = {"full": self.args.goal_full_gb, "truncated": self.args.goal_truncated_gb}
        out: dict[str, Any] = {
            "size": self.sizes.name, "sizes": asdict(self.sizes), "device": str(self.device),
            "device_name": (torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"),
            "device_total_gb": (torch.cuda.get_device_properties(self.device).total_memory / GB
                                if self.device.type == "cuda" else None),
            "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "dtype": self.args.dtype,
            "lora_dtype": "float32", "lora_rank": LORA_RANK, "steps": self.args.steps, "guidance": GUIDANCE,
            "truncated_k": TRUNCATED_K, "pixel_batch": 1, "repeats": self.args.repeats,
            "t5_reload": self.args.t5_reload,
            "memory_metric": ("torch.cuda.max_memory_allocated (includes resident weights)"
                              if self.device.type == "cuda" else "peak process RSS (CPU)"),
            **self.results,
            "goals": goals(pixel, limits),
            "wall_s": time.perf_counter() - self.t_start,
        }
        return out

    def cleanup(self) -> None:
        tmp = getattr(self, "tmp", None)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------
# dry run


def dry_run(args: argparse.Namespace) -> dict[str, Any]:
    """Shapes on the meta device: parameter counts, weight and LoRA-state memory of the components."""
    import torch

    from medart_core.lora import attach_lora, resolve_targets

    sizes = SIZES[args.size]
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    bytes_w = torch.tensor([], dtype=dtype).element_size()
    t0 = time.perf_counter()
    bb, _ = build_backbone(sizes, "meta", dtype)
    params = {"dit": n_params(bb.transformer), "t5": n_params(bb.text_encoder), "vae": n_params(bb.vae)}
    cfg = lora_config()
    targets = {"dit": resolve_targets(bb.transformer, cfg.dit_targets),
               "t5": resolve_targets(bb.text_encoder, cfg.t5_targets)}
    attach_lora(bb, cfg)  # peft on meta tensors: shapes only, so LoRA sizes come from the real injector
    params["lora_dit"] = n_params(bb.transformer, trainable=True)
    params["lora_t5"] = n_params(bb.text_encoder, trainable=True)
    lora = params["lora_dit"] + params["lora_t5"]
    weights_gb = {k: params[k] * bytes_w / GB for k in ("dit", "t5", "vae")}
    # fp32 LoRA weight + grad + AdamW's two moments = 16 bytes per trainable parameter.
    lora_state_gb = lora * 16 / GB
    resident = sum(weights_gb.values()) + lora_state_gb
    lat = sizes.resolution // 2 ** (len(sizes.vae_channels) - 1)
    tokens = (lat // 2) ** 2
    plan = {
        "size": sizes.name, "dtype": args.dtype, "params": params, "weights_gb": weights_gb,
        "lora_state_gb": lora_state_gb, "resident_gb": resident, "lora_targets": targets,
        "dit_tokens_per_image": tokens, "latent_size": lat, "steps": args.steps, "guidance": GUIDANCE,
        "goals_gb": {"full": args.goal_full_gb, "truncated": args.goal_truncated_gb},
        "build_meta_s": time.perf_counter() - t0,
    }
    print(f"plan for --size {sizes.name} ({args.dtype} frozen weights, fp32 LoRA rank {LORA_RANK}):")
    print(f"  DiT  {params['dit'] / 1e9:7.3f} B params -> {weights_gb['dit']:6.2f} GB   "
          f"({sizes.dit_layers} blocks, {sizes.dit_heads}x{sizes.dit_head_dim}, {tokens} tokens/image at "
          f"{sizes.resolution} px)")
    print(f"  T5   {params['t5'] / 1e9:7.3f} B params -> {weights_gb['t5']:6.2f} GB   "
          f"(d_model {sizes.t5_d_model}, {sizes.t5_layers} layers, {sizes.t5_heads} heads, d_ff {sizes.t5_d_ff})")
    print(f"  VAE  {params['vae'] / 1e6:7.1f} M params -> {weights_gb['vae']:6.2f} GB")
    print(f"  LoRA {lora / 1e6:7.2f} M trainable (DiT {params['lora_dit'] / 1e6:.2f} M, T5 "
          f"{params['lora_t5'] / 1e6:.2f} M) -> {lora_state_gb:.3f} GB with grads + AdamW state")
    print(f"  resident before any activation: {resident:.2f} GB; activations are measured on the device")
    print("  measurements: pixel step truncated K=2 / full / ref (reload DiT+VAE each step, T5 reload "
          f"'{args.t5_reload}'), latent step batch {args.latent_batches} ours-cached vs ref, generation ours vs "
          "PixArtAlphaPipeline")
    print(f"  goals: full peak < {args.goal_full_gb:g} GB, truncated peak < {args.goal_truncated_gb:g} GB")
    return plan


# --------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="xl")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--dtype", choices=("bf16", "fp32", "fp16"), default="bf16", help="frozen-weight dtype")
    ap.add_argument("--steps", type=int, default=20, help="M, sampling steps (paper: 20)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs after one warm-up (pixel, generation)")
    ap.add_argument("--latent-batches", type=int, nargs="+", default=[4, 1])
    ap.add_argument("--latent-iters", type=int, default=5, help="timed latent steps per batch size")
    ap.add_argument("--t5-reload", choices=("once", "every", "skip"), default="once",
                    help="the reference also reloads T5 each pixel step: time it once (default), include it "
                         "in every reference step, or skip it")
    ap.add_argument("--tmp-dir", default=None, help="where the reference's reload folder goes (default: $TMPDIR)")
    ap.add_argument("--budget-s", type=float, default=430.0,
                    help="stop starting new sections after this many seconds (0: no limit)")
    ap.add_argument("--section-min-s", type=float, default=15.0, help="a section starts only with this much left")
    ap.add_argument("--goal-full-gb", type=float, default=GOALS_GB["full"])
    ap.add_argument("--goal-truncated-gb", type=float, default=GOALS_GB["truncated"])
    ap.add_argument("--json-out", default=None, help="also write the summary here (updated after each section)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and XL memory estimate, build nothing")
    ap.add_argument("--simulate-oom", default="", help=argparse.SUPPRESS)  # tests: exercise the OOM path on CPU
    args = ap.parse_args(argv)
    if args.steps < 1 or args.repeats < 0 or args.latent_iters < 1:
        ap.error("--steps and --latent-iters must be >= 1, --repeats >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dry_run:
        print(json.dumps(dry_run(args), default=str))
        return 0
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print(f"CUDA is not available to torch {torch.__version__} (cuda {torch.version.cuda}); run on the GPU "
              "machine or pass --device cpu --size tiny.", file=sys.stderr)
        return 2

    check = Check(args)

    def on_term(signum: int, frame: Any) -> None:  # `timeout` sends SIGTERM: still end with the JSON line
        s = check.summary()
        s["aborted"] = f"signal {signum} after {s['wall_s']:.0f} s"
        print(json.dumps(s, default=str), flush=True)
        check.cleanup()  # os._exit skips the finally below; the reload folder can hold ~11 GB
        os._exit(124)

    previous = signal.signal(signal.SIGTERM, on_term)
    print(f"torch {torch.__version__} (cuda {torch.version.cuda}), device {args.device}"
          + (f" = {torch.cuda.get_device_name(torch.device(args.device))}" if args.device.startswith("cuda") else ""),
          flush=True)
    rc = 0
    try:
        # One shot on a lent GPU: a section that breaks is recorded (traceback in the log) and the others
        # still run; only a failed setup ends the run early, and even then the JSON line is printed.
        for section in (check.setup, check.run_pixel, check.run_latent, check.run_generation,
                        check.run_t5_reload_once):
            try:
                section()
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                check.results.setdefault("errors", {})[section.__name__] = f"{type(exc).__name__}: {exc}"[:500]
                if section == check.setup:
                    rc = 1
                    break
            check.save_partial()
    finally:
        check.cleanup()
        signal.signal(signal.SIGTERM, previous)  # main() may run inside another program (the tests)
    s = check.summary()
    for key, g in s["goals"].items():
        peak = f"{g['peak_gb']:.2f} GB" if g["peak_gb"] is not None else g["status"]
        print(f"GOAL {key}: {g['verdict']} ({peak}, limit {g['limit_gb']:g} GB)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(s, default=str, indent=1))
    print(json.dumps(s, default=str), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
