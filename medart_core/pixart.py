"""The PixArt-α forward, written once: text encoding, the DiT ε call, guided sampling and VAE decoding.

Generation, HLDF's pixel loss, the latent loss and the validation loss all go through these functions, so
size conditions (the 1024 px model), the ε half of the DiT output and the VAE scale are decided in one
place. ``sampling.py`` owns the schedule and the solver; this module plugs PixArt's parts into them.

Text-padding trimming is an explicit argument (``trim_padding``): padding keys carry exactly zero weight in
T5 self-attention and the DiT's cross-attention, so trimming the all-padding tail computes the same thing
over fewer tokens; the reference approach (all 120 positions) is ``trim_padding=False``.

torch / diffusers are imported inside functions: the CLI imports this module at start-up.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .constants import MAX_TOKENS
from .errors import ConfigError
from .sampling import Denoiser, GradMode, StepCallback, dpm_schedule, final_step_first_order, sample_dpmpp_2m

if TYPE_CHECKING:  # pragma: no cover
    import torch


# ---- geometry ------------------------------------------------------------------------------------------
def vae_scale_factor(vae: Any) -> int:
    """Pixels per latent cell, computed as the pipeline does (8 for the SD VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_shape(backbone: Any, batch: int, resolution: int | None = None) -> tuple[int, int, int, int]:
    """Shape of pure-noise latents for ``batch`` square images at ``resolution`` (default the backbone's)."""
    side = int(resolution or backbone.resolution) // vae_scale_factor(backbone.vae)
    return (batch, int(backbone.transformer.config.in_channels), side, side)


def size_conditions(transformer: Any, x: torch.Tensor, latent_scale: int, dtype: Any) -> dict[str, Any]:
    """PixArt's ``added_cond_kwargs``: image size/aspect only for the 1024 px model (sample_size 128), as the
    pipeline decides; ``None`` for the 512 px model and the random backbones."""
    import torch

    if int(transformer.config.sample_size) != 128:
        return {"resolution": None, "aspect_ratio": None}
    b = x.shape[0]
    h, w = x.shape[-2] * latent_scale, x.shape[-1] * latent_scale
    return {"resolution": torch.tensor([h, w], dtype=dtype, device=x.device).repeat(b, 1),
            "aspect_ratio": torch.tensor([float(h / w)], dtype=dtype, device=x.device).repeat(b, 1)}


# ---- text ----------------------------------------------------------------------------------------------
def tokenize_prompts(tokenizer: Any, prompts: list[str], *, max_length: int = MAX_TOKENS,
                     lowercase: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask the way ``PixArtAlphaPipeline.encode_prompt`` makes them.

    Padding to ``max_length`` (120 for PixArt-α), truncation, ``</s>`` appended; the pipeline lower-cases
    and strips prompts when ``clean_caption`` is off, so ``lowercase=True`` matches it.
    """
    texts = [p.lower().strip() if lowercase else p for p in prompts]
    enc = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                    add_special_tokens=True, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


def trim_text_padding(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the tail of text positions that are padding in every row (right padding, as PixArt pads).

    A 12-token caption padded to 120 then costs a tenth of the text work. Works on token ids as well as
    embeddings; returns the inputs unchanged when no position can be dropped.
    """
    keep = max(int(mask.sum(1).max()), 1) if mask.numel() else mask.shape[-1]
    if keep >= mask.shape[1] or bool(mask[:, keep:].any()):
        return embeds, mask
    return embeds[:, :keep], mask[:, :keep]


def run_text_encoder(text_encoder: Any, ids: torch.Tensor, mask: torch.Tensor, *,
                     trim_padding: bool = True) -> torch.Tensor:
    """T5 hidden states for padded ``ids`` (optionally computed on the non-padding length only).

    The returned tensor keeps the padded length (zeros at all-padding positions, which every consumer
    masks), so shapes and cache entries are those of the pipeline's 120-token encoding.
    """
    import torch.nn.functional as F

    ids_t, mask_t = trim_text_padding(ids, mask) if trim_padding else (ids, mask)
    emb = text_encoder(ids_t, attention_mask=mask_t)[0]
    if emb.shape[1] < ids.shape[1]:
        emb = F.pad(emb, (0, 0, 0, ids.shape[1] - emb.shape[1]))
    return emb


def t5_is_trainable(backbone: Any) -> bool:
    return any(p.requires_grad for p in backbone.text_encoder.parameters())


def encode_prompts(backbone: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                   trim_padding: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 hidden states and mask for already tokenised prompts (padded to 120 tokens, mask passed to T5).

    Builds a graph only when the text encoder has trainable parameters (LoRA on T5), so frozen-T5 runs
    keep no activations.
    """
    import torch

    te = backbone.text_encoder
    ids, mask = input_ids.to(te.device), attention_mask.to(te.device)
    with torch.set_grad_enabled(torch.is_grad_enabled() and t5_is_trainable(backbone)):
        emb = run_text_encoder(te, ids, mask, trim_padding=trim_padding)
    return emb, mask


def encode_text(backbone: Any, prompts: list[str], *, max_length: int = MAX_TOKENS, lowercase: bool = True,
                trim_padding: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 embeddings and mask for ``prompts`` (no grad), matching the pipeline's own prompt encoding."""
    import torch

    ids, mask = tokenize_prompts(backbone.tokenizer, prompts, max_length=max_length, lowercase=lowercase)
    te = backbone.text_encoder
    with torch.no_grad():
        emb = run_text_encoder(te, ids.to(te.device), mask.to(te.device), trim_padding=trim_padding)
    return emb, mask.to(te.device)


def encode_negative(backbone: Any, batch_size: int, *, text: str = "", max_length: int = MAX_TOKENS,
                    trim_padding: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of the negative prompt (``""`` in the paper) for ``batch_size`` images, tokenised and
    lower-cased as the PixArt pipeline does; with a graph when T5 is trainable (it is part of the CFG)."""
    ids, mask = tokenize_prompts(backbone.tokenizer, [text] * batch_size, max_length=max_length)
    return encode_prompts(backbone, ids, mask, trim_padding=trim_padding)


# ---- the DiT -------------------------------------------------------------------------------------------
def dit_eps(transformer: Any, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor, *,
            latent_scale: int = 8, trim_padding: bool = True) -> torch.Tensor:
    """ε prediction of the PixArt DiT: the first ``in_channels`` output channels (the learned-variance half
    is ignored, as in the paper's loss and the pipeline), with the 1024 px model's size conditions.

    ``t`` is an int64 DDPM timestep tensor of shape [B] (or a scalar, broadcast over the batch).
    Inputs are cast to the DiT's weight dtype and ε comes back in float32 whatever the DiT computes in
    (bf16 under ``precision.autocast``): the solver and the losses do their arithmetic in float32.
    """
    import torch

    if trim_padding:
        embeds, mask = trim_text_padding(embeds, mask)
    wdt = transformer.dtype
    x, embeds = x.to(wdt), embeds.to(wdt)
    t = t.reshape(-1).to(device=x.device, dtype=torch.int64)
    if t.shape[0] == 1 and x.shape[0] != 1:
        t = t.expand(x.shape[0])
    out = transformer(x, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=t,
                      added_cond_kwargs=size_conditions(transformer, x, latent_scale, embeds.dtype),
                      return_dict=False)[0]
    return out[:, : int(transformer.config.in_channels)].float()


def guided_denoiser(transformer: Any, prompt_embeds: torch.Tensor, prompt_mask: torch.Tensor,
                    neg_embeds: torch.Tensor | None = None, neg_mask: torch.Tensor | None = None,
                    guidance: float = 4.5, *, latent_scale: int = 8, trim_padding: bool = True) -> Denoiser:
    """ε-denoiser with classifier-free guidance, as ``PixArtAlphaPipeline`` runs it.

    One DiT call per step on the concatenated batch ``[uncond; cond]``; ``eps = u + g·(c − u)``. With
    ``guidance <= 1`` or no negative embeddings the conditional prediction alone is used. The returned
    closure only reads its captured tensors, so it is safe to recompute under activation checkpointing.
    """
    import torch

    cfg = guidance > 1.0 and neg_embeds is not None
    if cfg:
        embeds = torch.cat([neg_embeds, prompt_embeds], dim=0)
        mask = torch.cat([neg_mask, prompt_mask], dim=0)
    else:
        embeds, mask = prompt_embeds, prompt_mask
    if trim_padding:
        embeds, mask = trim_text_padding(embeds, mask)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        xin = torch.cat([x, x], dim=0) if cfg else x
        out = dit_eps(transformer, xin, t, embeds, mask, latent_scale=latent_scale, trim_padding=False)
        if not cfg:
            return out
        uncond, cond = out.chunk(2)
        return uncond + guidance * (cond - uncond)

    return denoise


# ---- noise, sampling, decoding ---------------------------------------------------------------------------
def initial_noise(shape: tuple[int, ...], generator: torch.Generator | None, *, device: Any = "cpu",
                  dtype: Any = None) -> torch.Tensor:
    """Pure-noise latents drawn exactly as the pipeline draws them (``randn_tensor``; init sigma is 1)."""
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(shape, generator=generator, device=torch.device(device), dtype=dtype or torch.float32)


def sample_latents(
    backbone: Any,
    prompt_embeds: torch.Tensor,
    prompt_mask: torch.Tensor,
    neg_embeds: torch.Tensor | None = None,
    neg_mask: torch.Tensor | None = None,
    *,
    steps: int = 20,
    guidance: float = 4.5,
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
    grad_mode: GradMode = "none",
    truncated_k: int = 2,
    checkpoint: bool = False,
    trim_padding: bool = True,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Generate PixArt latents (scaled, as the DiT sees them) from pure noise with DPM-Solver++(2M) + CFG.

    ``grad_mode``: ``"none"`` (inference, no graph), ``"full"`` (backprop through every step) or
    ``"truncated"`` (only the last ``truncated_k`` steps build a graph). The noise is drawn from
    ``generator`` with the pipeline's shape rule unless ``latents`` is given. With ``neg_embeds=None``
    and ``guidance > 1`` the negative prompt "" is encoded on the fly (no grad). ``callback(i, n, x)``
    is called after each solver step (e.g. to show progress). The latents come back in float32.
    """
    import contextlib

    import torch

    if grad_mode not in ("none", "full", "truncated"):
        raise ConfigError(f"grad_mode must be 'none', 'full' or 'truncated', got {grad_mode!r}.")
    b = prompt_embeds.shape[0]
    if guidance > 1.0 and neg_embeds is None:
        neg_embeds, neg_mask = encode_text(backbone, [""] * b, max_length=prompt_embeds.shape[1],
                                           trim_padding=trim_padding)
        neg_embeds = neg_embeds.to(prompt_embeds.dtype)
    if neg_embeds is not None and neg_embeds.shape[0] != b:
        neg_embeds, neg_mask = neg_embeds.expand(b, -1, -1), neg_mask.expand(b, -1)
    if latents is None:
        latents = initial_noise(latent_shape(backbone, b), generator, device=prompt_embeds.device)
    elif latents.shape[0] != b:
        raise ConfigError(f"noise has batch {latents.shape[0]} but there are {b} prompts.")
    if grad_mode == "truncated" and truncated_k < 1:
        raise ConfigError(f"truncated_k must be >= 1, got {truncated_k}.")
    grad_from = max(0, steps - truncated_k) if grad_mode == "truncated" else 0
    den = guided_denoiser(backbone.transformer, prompt_embeds, prompt_mask, neg_embeds, neg_mask, guidance,
                          latent_scale=vae_scale_factor(backbone.vae), trim_padding=trim_padding)
    config = backbone.scheduler.config
    ctx = torch.no_grad() if grad_mode == "none" else contextlib.nullcontext()
    with ctx:
        # The solver state stays float32 whatever the model computes in (bf16 rounding would accumulate).
        return sample_dpmpp_2m(den, latents.to(torch.float32), dpm_schedule(config, steps),
                               grad_from_step=grad_from, checkpoint=checkpoint and grad_mode != "none",
                               final_first_order=final_step_first_order(config, steps), callback=callback)


def decode(vae: Any, latents: torch.Tensor, *, checkpoint: bool = False) -> torch.Tensor:
    """VAE-decode scaled latents to images in [-1, 1] (unclamped, like the pipeline before post-processing).

    ``checkpoint`` recomputes the decoder's mid and up blocks one at a time in the backward pass, so the
    peak holds one block's activations instead of the whole decoder's. (Checkpointing the decoder as one
    unit would save nothing: its backward comes right after its forward.) The VAE is left as it was found.
    The images come back in float32 (the colour loss and PNG rounding work on them).
    """
    import torch

    def run(z: torch.Tensor) -> torch.Tensor:
        return vae.decode(z / vae.config.scaling_factor, return_dict=False)[0].float()

    z = latents.to(vae.dtype)
    if not (checkpoint and torch.is_grad_enabled()):
        return run(z)
    with _block_checkpointing(vae.decoder):
        return run(z)


def encode_latents(vae: Any, pixels: torch.Tensor, *, generator: torch.Generator | None = None,
                   sample: bool = True) -> torch.Tensor:
    """Scaled VAE latents of images in [-1, 1] (no grad): a posterior sample drawn from ``generator`` (as
    training does), or the posterior mean with ``sample=False``."""
    import torch

    px = pixels.to(vae.device, vae.dtype)
    with torch.no_grad():
        dist = vae.encode(px).latent_dist
        z = dist.mean if not sample else dist.mean + dist.std * randn_like_on(generator, dist.mean)
    return z * vae.config.scaling_factor


def randn_like_on(generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise shaped like ``like``, drawn on the generator's device and then moved: the same
    seed gives the same noise on CPU and GPU."""
    import torch

    gdev = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(tuple(like.shape), generator=generator, device=gdev,
                       dtype=torch.float32).to(like.device, like.dtype)


def to_pil(images: torch.Tensor) -> list[Any]:
    """[B, 3, H, W] images in [-1, 1] as 8-bit RGB PIL images (the pipeline's rounding)."""
    import torch
    from PIL import Image

    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def _checkpoint_call(module: Any, *args: Any) -> Any:
    from torch.utils.checkpoint import checkpoint as ckpt

    return ckpt(module.__call__, *args, use_reentrant=False)


class _block_checkpointing:
    """Turn on diffusers' per-block checkpointing of a VAE decoder for one call, then restore its flags."""

    def __init__(self, module: Any):
        self.module = module

    def __enter__(self) -> None:
        m = self.module
        self.saved = (m.gradient_checkpointing, m.__dict__.get("_gradient_checkpointing_func"))
        m.gradient_checkpointing = True
        m._gradient_checkpointing_func = _checkpoint_call

    def __exit__(self, *exc: object) -> None:
        m = self.module
        m.gradient_checkpointing = self.saved[0]
        if self.saved[1] is None:
            m.__dict__.pop("_gradient_checkpointing_func", None)
        else:
            m._gradient_checkpointing_func = self.saved[1]


__all__ = [
    "vae_scale_factor", "latent_shape", "size_conditions", "tokenize_prompts", "trim_text_padding",
    "run_text_encoder", "t5_is_trainable", "encode_prompts", "encode_text", "encode_negative", "dit_eps",
    "guided_denoiser", "initial_noise", "sample_latents", "decode", "encode_latents", "randn_like_on", "to_pil",
]
