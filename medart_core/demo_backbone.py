"""The demo backbone: a small PixArt-α-architecture model trained on the sample dataset, and its recipe.

This module owns ``build_demo_backbone`` (the recipe), its sizes (``DemoArchitecture``) and schedules
(``DemoSchedule``, ``SCHEDULES``) and the manifest written next to the weights (the ``demo-backbone build``
sub-command is in ``commands/demo.py``). ``backbone.load_backbone("demo")`` only *loads* the folder the recipe
wrote (``assets/demo_backbone``); nothing here runs when the studio starts.

The recipe, every random draw seeded from ``seed``:

1. build the sample dataset (213 real CT/MR/X-ray/ultrasound/fundus/histology images, 10 classes, each
   with its class's template caption) into a temporary workspace, and read it at 64 px;
2. train ``AutoencoderKL`` (4x down to 16x16x4 latents) on random 32 px crops with flips (L1 + MSE + a
   small KL term). The VAE is fully convolutional (no mid-block attention), so crops teach it the same
   local code as whole images at a quarter of the cost;
3. standardise its latents per channel by folding their mean and std into ``quant_conv`` and
   ``post_quant_conv`` (an exact rewrite of the same function): PixArt reads only one ``scaling_factor``,
   and an unregularised VAE's channels differ in spread several-fold, which would leave the diffusion
   model's noise swamping the quiet channels;
4. keep the seeded ``T5EncoderModel`` frozen at its random initialisation: the captions differ in their
   words, so their (padded, masked) token sequences stay distinguishable and the DiT's cross-attention
   learns to read them (see bench/RESULTS.md for the measurement);
5. train ``PixArtTransformer2DModel`` with PixArt's ε-prediction loss (``hldf.latent_loss``) on the
   latents of the images and their mirror images, the caption dropped to "" for ``uncond_prob`` of the
   samples so that classifier-free guidance works, with an exponential moving average of the weights;
6. save a diffusers pipeline folder (``save_backbone``: stock ``PixArtAlphaPipeline.from_pretrained``
   loads it), the VAE and DiT weights in fp16, and ``MANIFEST.json`` (recipe, seed, schedule, package
   versions, build time, licences of the training images, sha256 of every file).

torch / diffusers / transformers are imported inside functions: the CLI imports this module at start-up.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from . import provenance
from .config import JsonConfig
from .constants import DEMO_LABEL
from .errors import ConfigError
from .fileio import sha256_file
from .seeds import derive_seed

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .backbone import Backbone

DATASET = "sample"
MANIFEST = "MANIFEST.json"
RECIPE_COMMAND = "python -m medart_core demo-backbone build --out assets/demo_backbone"
# Packages whose versions decide the bytes the recipe writes (and where the training images come from).
VERSIONED = ("torch", "diffusers", "transformers", "safetensors", "tokenizers", "numpy", "pillow", "pydicom",
             "pydicom-data", "scikit-image")


@dataclass(frozen=True)
class DemoArchitecture(JsonConfig):
    """Sizes of the demo backbone (PixArt-XL-2: 28 blocks of 16 heads x 72, T5-XXL d=4096, the SD VAE).

    Chosen for ≤ 5 MB of weights and a ≤ 30 min CPU recipe: the DiT (~1.8 M parameters, 6 blocks, hidden
    128, patch 2 over 16x16 latents = 64 tokens) holds most of the budget; the VAE (~0.23 M) downsamples
    4x, not the SD VAE's 8x: at 64 px an 8x8x4 latent reconstructs too blurry for the CT and MR classes to
    stay recognisable (measured: 23.4 vs 26.7 dB PSNR, and a classifier of the real images tells 60 % vs
    72 % of the reconstructions' classes); the frozen T5 (~0.1 M) only has to keep the captions apart.
    """

    CONFIG_NAME = "demo architecture"

    resolution: int = 64
    vae_channels: tuple[int, ...] = (16, 32, 32)
    vae_groups: int = 8
    latent_channels: int = 4
    t5_d_model: int = 64
    t5_layers: int = 2
    t5_heads: int = 4
    t5_d_ff: int = 128
    dit_layers: int = 6
    dit_heads: int = 4
    dit_head_dim: int = 32
    patch_size: int = 2


@dataclass(frozen=True)
class DemoSchedule(JsonConfig):
    """How long and how hard each part trains. ``full`` builds the shipped weights; ``short`` runs the very
    same code for a handful of steps (the reproducibility test)."""

    CONFIG_NAME = "demo schedule"

    vae_steps: int
    dit_steps: int
    vae_batch: int = 32
    vae_crop: int = 32
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-3
    dit_batch: int = 32
    dit_lr: float = 1e-3
    dit_warmup: int = 100
    dit_final_lr_fraction: float = 0.1
    ema_decay: float = 0.999
    uncond_prob: float = 0.1
    grad_clip: float = 1.0


SCHEDULES: dict[str, DemoSchedule] = {
    "full": DemoSchedule(vae_steps=1500, dit_steps=4000),
    "short": DemoSchedule(vae_steps=3, dit_steps=3, vae_batch=4, dit_batch=8, dit_warmup=1),
}


@dataclass
class TrainingSet:
    """The sample images at the backbone's resolution, with labels and captions (in dataset order)."""

    pixels: "torch.Tensor"            # float [N, 3, S, S] in [-1, 1]
    labels: list[str]
    captions: list[str]
    licences: dict[str, Any]
    classes: dict[str, int] = field(default_factory=dict)


# ---- data ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _sample_workspace(workspace: Any) -> Iterator[tuple[Any, Any]]:
    """(workspace, caption store) holding the sample dataset: the given workspace (the dataset is built
    there if it is missing) or a temporary one that is removed afterwards."""
    from .captions import CaptionStore
    from .data import build_sample_dataset
    from .workspace import Workspace

    with contextlib.ExitStack() as stack:
        if workspace is None:
            root = stack.enter_context(tempfile.TemporaryDirectory(prefix="medart-demo-"))
            ws = Workspace.open(Path(root) / "workspace")
        else:
            ws = workspace if isinstance(workspace, Workspace) else Workspace.open(workspace)
        store = CaptionStore.for_workspace(ws)
        stack.callback(store.close)
        if not store.has_dataset(DATASET):
            build_sample_dataset(ws, store, DATASET)
        yield ws, store


def licence_summary(manifest_path: Path) -> dict[str, Any]:
    """The sample manifest's licences per source package: version, image count and, per source file, its
    licence text, origin and image count."""
    out: dict[str, Any] = {}
    for line in manifest_path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        pkg = out.setdefault(rec["package"], {"version": rec.get("version"), "images": 0, "files": {}})
        pkg["images"] += 1
        f = pkg["files"].setdefault(rec["source_file"], {"licence": rec.get("licence"), "origin": rec.get("origin"),
                                                         "images": 0})
        f["images"] += 1
    return out


def load_training_set(ws: Any, store: Any, resolution: int) -> TrainingSet:
    """Every image of the sample dataset prepared as evaluation prepares images (shorter side to S, centre
    crop), with its class and current caption text."""
    import torch
    from PIL import Image

    from .extractors import images_to_uint8

    recs = sorted(store.list_images(DATASET), key=lambda r: r.id)
    text = {s.image_id: s.text for s in store.states(DATASET)}
    imgs = []
    for r in recs:
        with Image.open(ws.image_path(DATASET, r.file_name)) as im:
            imgs.append(im.convert("RGB"))
    u8 = images_to_uint8(imgs, resolution)
    labels = [r.label for r in recs]
    classes: dict[str, int] = {}
    for lab in labels:
        classes[lab] = classes.get(lab, 0) + 1
    return TrainingSet(pixels=u8.to(torch.float32) / 127.5 - 1.0, labels=labels,
                       captions=[text.get(r.id, "") for r in recs],
                       licences=licence_summary(ws.manifest_path(DATASET)), classes=dict(sorted(classes.items())))


# ---- components --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Model constructors draw from the global RNG: fork it, so the caller's random state is untouched."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_components(arch: DemoArchitecture, seed: int) -> "Backbone":
    """The untrained demo backbone: PixArt-α's classes at ``arch``'s sizes, seeded from ``seed``."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from .backbone import PIXART_SCHEDULER_CONFIG, Backbone, _tiny_tokenizer

    tokenizer = _tiny_tokenizer()
    n = len(arch.vae_channels)
    with _seeded(derive_seed("demo-backbone", seed, "text_encoder")):
        t5 = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer), d_model=arch.t5_d_model, d_kv=arch.t5_d_model // arch.t5_heads,
            d_ff=arch.t5_d_ff, num_layers=arch.t5_layers, num_heads=arch.t5_heads,
            relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
            feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False, pad_token_id=0,
            eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False,
        ))
    with _seeded(derive_seed("demo-backbone", seed, "vae")):
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(arch.vae_channels),
            layers_per_block=1, latent_channels=arch.latent_channels, norm_num_groups=arch.vae_groups,
            sample_size=arch.resolution, scaling_factor=1.0, mid_block_add_attention=False,
        )
    with _seeded(derive_seed("demo-backbone", seed, "transformer")):
        hidden = arch.dit_heads * arch.dit_head_dim
        transformer = PixArtTransformer2DModel(
            num_attention_heads=arch.dit_heads, attention_head_dim=arch.dit_head_dim,
            in_channels=arch.latent_channels, out_channels=2 * arch.latent_channels, num_layers=arch.dit_layers,
            cross_attention_dim=hidden, caption_channels=arch.t5_d_model, sample_size=arch.resolution // 2 ** (n - 1),
            patch_size=arch.patch_size, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
            attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
            use_additional_conditions=False,
        )
    for m in (t5, vae, transformer):
        m.eval().requires_grad_(False)
    return Backbone(spec="demo", tokenizer=tokenizer, text_encoder=t5, vae=vae, transformer=transformer,
                    scheduler=DPMSolverMultistepScheduler(**PIXART_SCHEDULER_CONFIG), resolution=arch.resolution,
                    is_random=False, extra={"label": DEMO_LABEL})


# ---- training ------------------------------------------------------------------------------------------------
def _flip_half(x: "torch.Tensor", g: "torch.Generator") -> "torch.Tensor":
    import torch

    flip = torch.rand(x.shape[0], generator=g) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def train_vae(vae: Any, pixels: "torch.Tensor", sched: DemoSchedule, *, seed: int,
              log: Callable[[str], None]) -> dict[str, float]:
    """L1 + MSE reconstruction of random crops (flipped half the time) plus ``vae_kl_weight`` x the KL per
    value; AdamW, linear warm-up then cosine decay. Returns the final loss and the PSNR of whole images."""
    import torch

    g = torch.Generator().manual_seed(derive_seed("demo-backbone", seed, "vae-steps"))
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=sched.vae_lr, weight_decay=0.0)
    steps, warm = sched.vae_steps, max(1, min(50, sched.vae_steps // 10))
    lr_at = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    size, crop = pixels.shape[-1], min(sched.vae_crop, pixels.shape[-1])
    running = float("nan")
    for step in range(steps):
        idx = torch.randint(0, pixels.shape[0], (sched.vae_batch,), generator=g)
        ox, oy = torch.randint(0, size - crop + 1, (2,), generator=g).tolist()
        x = _flip_half(pixels[idx, :, oy:oy + crop, ox:ox + crop], g)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        y = vae.decode(z).sample
        rec = (y - x).abs().mean() + (y - x).pow(2).mean()
        loss = rec + sched.vae_kl_weight * post.kl().mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), sched.grad_clip)
        opt.step()
        lr_at.step()
        running = loss.item() if step == 0 else 0.98 * running + 0.02 * loss.item()
        if step % 250 == 0 or step == steps - 1:
            log(f"vae step {step + 1}/{steps}: loss {running:.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        mse = sum(float((vae.decode(vae.encode(b).latent_dist.mean).sample.clamp(-1, 1) - b).pow(2).sum())
                  for b in pixels.split(64)) / pixels.numel()
    return {"vae_final_loss": running, "vae_psnr_db": 10 * math.log10(4.0 / max(mse, 1e-12))}


def standardise_latents(vae: Any, pixels: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """Fold the per-channel mean and std of the posterior means into ``quant_conv``/``post_quant_conv`` (the
    decoder undoes what the encoder now divides out: the same VAE, standardised latents), set
    ``scaling_factor`` to the inverse of what std is left, and return the new posterior means and stds of
    ``pixels`` (unscaled)."""
    import torch

    def posterior() -> tuple["torch.Tensor", "torch.Tensor"]:
        with torch.no_grad():
            dists = [vae.encode(b).latent_dist for b in pixels.split(64)]
        return torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])

    mu, _ = posterior()
    m, s = mu.mean(dim=(0, 2, 3)).double(), mu.std(dim=(0, 2, 3)).double().clamp_min(1e-6)
    lc = m.shape[0]
    with torch.no_grad():
        q, pq = vae.quant_conv, vae.post_quant_conv
        w, b = q.weight.double(), q.bias.double()
        w[:lc] /= s[:, None, None, None]
        b[:lc] = (b[:lc] - m) / s
        b[lc:] -= 2 * s.log()  # logvar of mean/s
        q.weight.copy_(w)
        q.bias.copy_(b)
        w2, b2 = pq.weight.double(), pq.bias.double()
        b2 += w2[:, :, 0, 0] @ m
        w2 *= s[None, :, None, None]
        pq.weight.copy_(w2)
        pq.bias.copy_(b2)
    mu, sd = posterior()
    vae.register_to_config(scaling_factor=float(1.0 / mu.std()))
    return mu, sd


def encode_captions(backbone: "Backbone", texts: list[str]) -> tuple["torch.Tensor", "torch.Tensor"]:
    """T5 embeddings and mask of ``texts``, trimmed to the longest caption (the pipeline's padding beyond
    it carries no weight; see ``pixart.trim_text_padding``)."""
    from .pixart import encode_text, trim_text_padding

    emb, mask = encode_text(backbone, texts)
    return trim_text_padding(emb, mask)


def train_dit(backbone: "Backbone", mu: "torch.Tensor", sd: "torch.Tensor", caption_index: "torch.Tensor",
              text_emb: "torch.Tensor", text_mask: "torch.Tensor", uncond: int, sched: DemoSchedule, *,
              seed: int, log: Callable[[str], None]) -> dict[str, float]:
    """PixArt's ε-prediction loss on posterior samples of the latents; caption ``caption_index[i]`` of the
    text table for latent i, replaced by the unconditional row ``uncond`` with probability ``uncond_prob``.
    AdamW with warm-up and cosine decay; the EMA of the weights is copied into the DiT at the end."""
    import copy

    import torch

    from .hldf import latent_loss

    dit = backbone.transformer
    g = torch.Generator().manual_seed(derive_seed("demo-backbone", seed, "dit-steps"))
    scale = float(backbone.vae.config.scaling_factor)
    ema = copy.deepcopy(dit).requires_grad_(False)
    dit.train().requires_grad_(True)
    opt = torch.optim.AdamW(dit.parameters(), lr=sched.dit_lr, weight_decay=0.0)
    steps, warm, floor = sched.dit_steps, max(1, sched.dit_warmup), sched.dit_final_lr_fraction
    lr_at = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * s / steps))))
    running = float("nan")
    for step in range(steps):
        idx = torch.randint(0, mu.shape[0], (sched.dit_batch,), generator=g)
        z = (mu[idx] + sd[idx] * torch.randn(mu[idx].shape, generator=g)) * scale
        ci = torch.where(torch.rand(sched.dit_batch, generator=g) < sched.uncond_prob,
                         torch.full_like(caption_index[idx], uncond), caption_index[idx])
        loss = latent_loss(dit, z, text_emb[ci], text_mask[ci], generator=g,
                           scheduler_config=backbone.scheduler.config)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), sched.grad_clip)
        opt.step()
        lr_at.step()
        decay = min(sched.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), dit.parameters()):
                pe.lerp_(p, 1.0 - decay)
        running = loss.item() if step == 0 else 0.98 * running + 0.02 * loss.item()
        if step % 250 == 0 or step == steps - 1:
            log(f"dit step {step + 1}/{steps}: loss {running:.4f}")
    dit.load_state_dict(ema.state_dict())
    dit.eval().requires_grad_(False)
    return {"dit_final_loss": running}


# ---- saving --------------------------------------------------------------------------------------------------
def file_hashes(folder: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under ``folder`` except the manifest, by POSIX relative path."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out[p.relative_to(folder).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return out


def _to_fp16(path: Path) -> None:
    """Rewrite a safetensors file with its floating tensors in fp16 (diffusers upcasts them on load)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    half = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    save_file(half, str(path), metadata=meta)
    path.chmod(0o644)  # safetensors writes through a private temporary file


def _save(backbone: "Backbone", folder: Path) -> dict[str, str]:
    """The pipeline folder (stock layout) with the VAE and the DiT in fp16. T5 stays fp32: transformers loads
    weights in the dtype they were saved in, and a fp16 T5 would hand the stock pipeline's fp32 DiT fp16
    embeddings."""
    from .backbone import save_backbone

    save_backbone(backbone, folder)
    dtypes = {"text_encoder": "float32"}
    for part in ("vae", "transformer"):
        for f in sorted((folder / part).glob("*.safetensors")):
            _to_fp16(f)
        dtypes[part] = "float16"
    return dtypes


def package_versions() -> dict[str, str]:
    return provenance.package_versions(VERSIONED)


def _check_out_dir(out: Path) -> None:
    """Refuse (before any training) to replace a non-empty folder that is not a demo build."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise ConfigError(f"{out} exists and is not a demo backbone folder (no {MANIFEST}); choose another --out "
                          "or remove it.")


def _prepare_out_dir(out: Path) -> Path:
    """A fresh sibling folder to build into (moved over ``out`` once complete)."""
    _check_out_dir(out)
    tmp = out.with_name(f".{out.name}.building")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _count(m: Any) -> int:
    return sum(p.numel() for p in m.parameters())


# ---- the recipe -------------------------------------------------------------------------------------------
def build_demo_backbone(out_dir: str | os.PathLike, *, workspace: Any = None, schedule: str = "full",
                        seed: int = 0, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train the demo backbone from seeded random weights and write it to ``out_dir``; return the manifest.

    ``workspace``: a Workspace (or folder) whose ``sample`` dataset is used (built there when missing);
    None builds it in a temporary workspace. ``schedule``: "full" (the shipped weights) or "short" (the
    same code for a few steps). The same seed, schedule, packages and thread count write the same bytes.
    """
    import torch

    if schedule not in SCHEDULES:
        raise ConfigError(f"Unknown demo schedule {schedule!r}; choose one of {sorted(SCHEDULES)}.")
    say = log or (lambda m: None)
    sched, arch = SCHEDULES[schedule], DemoArchitecture()
    out = Path(out_dir).expanduser().resolve()
    _check_out_dir(out)
    t0, cpu0 = time.perf_counter(), time.process_time()
    times: dict[str, float] = {}
    with _sample_workspace(workspace) as (ws, store):
        data = load_training_set(ws, store, arch.resolution)
    times["sample_dataset_s"] = time.perf_counter() - t0
    say(f"sample dataset: {len(data.labels)} images in {len(data.classes)} classes "
        f"({times['sample_dataset_s']:.1f} s)")

    bb = build_components(arch, seed)
    t = time.perf_counter()
    stats = train_vae(bb.vae, data.pixels, sched, seed=seed, log=say)
    times["vae_s"] = time.perf_counter() - t
    say(f"vae: PSNR {stats['vae_psnr_db']:.2f} dB ({times['vae_s']:.1f} s)")

    t = time.perf_counter()
    pixels = torch.cat([data.pixels, data.pixels.flip(-1)])  # mirror images are training images too
    mu, sd = standardise_latents(bb.vae, pixels)
    texts = sorted(set(data.captions))
    emb, mask = encode_captions(bb, texts + [""])
    index = torch.tensor([texts.index(c) for c in data.captions] * 2, dtype=torch.int64)
    stats.update(train_dit(bb, mu, sd, index, emb, mask, len(texts), sched, seed=seed, log=say))
    times["dit_s"] = time.perf_counter() - t
    say(f"dit: loss {stats['dit_final_loss']:.4f} ({times['dit_s']:.1f} s)")

    t = time.perf_counter()
    tmp = _prepare_out_dir(out)
    dtypes = _save(bb, tmp)
    times["save_s"] = time.perf_counter() - t
    times["total_s"] = time.perf_counter() - t0
    # CPU seconds of all threads: on a machine shared with other work, wall time overstates the recipe's cost.
    times["cpu_s"] = time.process_time() - cpu0
    files = file_hashes(tmp)
    command = RECIPE_COMMAND + (" --short" if schedule == "short" else "") + (f" --seed {seed}" if seed else "")
    manifest = {
        "label": DEMO_LABEL,
        "recipe": command,
        "seed": seed,
        "schedule_name": schedule,
        "schedule": sched.to_dict(),
        "architecture": arch.to_dict(),
        "parameters": {"text_encoder": _count(bb.text_encoder), "vae": _count(bb.vae),
                       "transformer": _count(bb.transformer)},
        "dtypes": dtypes,
        "text_encoder_training": "frozen at its seeded random initialisation",
        "versions": package_versions(),
        "torch_threads": torch.get_num_threads(),
        "build_seconds": {k: round(v, 2) for k, v in times.items()},
        "training_data": {
            "dataset": DATASET, "images": len(data.labels), "resolution": arch.resolution,
            "classes": data.classes,
            "captions": {lab: cap for lab, cap in sorted(set(zip(data.labels, data.captions)))},
            "augmentation": f"horizontal flips; random {min(sched.vae_crop, arch.resolution)} px crops for the VAE",
            "licences": data.licences,
        },
        "metrics": {k: round(v, 5) for k, v in stats.items()},
        "files": files,
        "total_bytes": sum(f["bytes"] for f in files.values()),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    say(f"wrote {out} ({manifest['total_bytes'] / 1e6:.2f} MB, {times['total_s']:.0f} s)")
    return manifest


__all__ = ["DemoArchitecture", "DemoSchedule", "SCHEDULES", "TrainingSet", "build_demo_backbone",
           "build_components", "train_vae", "standardise_latents", "train_dit", "licence_summary",
           "load_training_set", "file_hashes"]
