"""Samplers as pure functions: the maths visible, no state kept between calls, no scheduler mutated.

The one sampler PixArt-α needs is DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095), written here to
reproduce diffusers' ``DPMSolverMultistepScheduler`` with PixArt's config step for step (dpmsolver++,
order 2, midpoint, lower_order_final, final sigma 0, ε-prediction). Unlike the scheduler object it is
differentiable end to end, which HLDF's pixel-level loss needs (gradients through all sampling steps).

Notation follows the scheduler: for a DDPM step t with cumulative ᾱ_t, ``sigma = sqrt((1-ᾱ)/ᾱ)`` (the
variance-exploding sigma), ``alpha_t = 1/sqrt(1+sigma²)``, ``sigma_t = sigma·alpha_t`` and the half
log-SNR ``lambda = log(alpha_t) - log(sigma_t)``.

torch / diffusers are imported inside functions: the CLI imports this module at start-up.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

GradMode = Literal["none", "full", "truncated"]
Denoiser = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]

# The only variant implemented; anything else in a scheduler config is refused rather than silently mis-sampled.
_REQUIRED = {
    "algorithm_type": "dpmsolver++",
    "solver_order": 2,
    "solver_type": "midpoint",
    "prediction_type": "epsilon",
}


@dataclass(frozen=True)
class Schedule:
    """A DPM-Solver++ discretisation: ``timesteps[i]`` (DDPM indices fed to the model) and ``sigmas[i]``.

    ``sigmas`` has one more entry than ``timesteps``: the final sigma (0, i.e. the clean sample).
    """

    timesteps: torch.Tensor  # int64 [M]
    sigmas: torch.Tensor  # float32 [M+1]

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])


def _cfg_get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def alphas_cumprod(config: Any) -> torch.Tensor:
    """ᾱ_t of the DDPM training schedule described by a scheduler config (float32, as diffusers builds it)."""
    import torch

    n = int(_cfg_get(config, "num_train_timesteps", 1000))
    b0, b1 = float(_cfg_get(config, "beta_start", 1e-4)), float(_cfg_get(config, "beta_end", 0.02))
    kind = _cfg_get(config, "beta_schedule", "linear")
    if _cfg_get(config, "trained_betas") is not None:
        betas = torch.tensor(_cfg_get(config, "trained_betas"), dtype=torch.float32)
    elif kind == "linear":
        betas = torch.linspace(b0, b1, n, dtype=torch.float32)
    elif kind == "scaled_linear":
        betas = torch.linspace(b0**0.5, b1**0.5, n, dtype=torch.float32) ** 2
    else:
        raise ConfigError(f"beta_schedule {kind!r} is not supported; use 'linear' (PixArt-α) or 'scaled_linear'.")
    if _cfg_get(config, "rescale_betas_zero_snr", False):
        raise ConfigError("rescale_betas_zero_snr is not supported by the differentiable sampler; turn it off.")
    return torch.cumprod(1.0 - betas, dim=0)


def dpm_schedule(config: Any, steps: int) -> Schedule:
    """Timesteps and sigmas for ``steps`` DPM-Solver++ steps, identical to ``scheduler.set_timesteps(steps)``.

    ``config`` is a scheduler config (``scheduler.config`` or a dict). Karras/Lu/exponential/beta sigmas,
    flow sigmas and lambda clipping are refused with a ConfigError: PixArt-α uses none of them.
    """
    import numpy as np
    import torch

    if steps < 1:
        raise ConfigError(f"sampling steps must be >= 1, got {steps}.")
    for key, want in _REQUIRED.items():
        got = _cfg_get(config, key, want)
        if got != want:
            raise ConfigError(f"scheduler {key}={got!r} is not supported by the differentiable sampler "
                              f"(needs {want!r}, the PixArt-α setting).")
    for flag in ("use_karras_sigmas", "use_lu_lambdas", "use_exponential_sigmas", "use_beta_sigmas",
                 "use_flow_sigmas", "thresholding", "use_dynamic_shifting"):
        if _cfg_get(config, flag, False):
            raise ConfigError(f"scheduler option {flag}=True is not supported by the differentiable sampler.")
    lmc = _cfg_get(config, "lambda_min_clipped", -math.inf)
    if lmc is not None and lmc != -math.inf:
        raise ConfigError("lambda_min_clipped is not supported by the differentiable sampler; leave it at -inf.")
    final = _cfg_get(config, "final_sigmas_type", "zero")

    acp = alphas_cumprod(config)
    n = acp.shape[0]
    spacing = _cfg_get(config, "timestep_spacing", "linspace")
    offset = int(_cfg_get(config, "steps_offset", 0) or 0)
    # The three spacings of Lin et al. 2023 (arXiv 2305.08891, Table 2), same rounding as diffusers.
    if spacing == "linspace":
        ts = np.linspace(0, n - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
    elif spacing == "leading":
        ratio = n // (steps + 1)
        ts = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + offset
    elif spacing == "trailing":
        ts = np.arange(n, 0, -n / steps).round().copy().astype(np.int64) - 1
    else:
        raise ConfigError(f"timestep_spacing {spacing!r} is not supported; use 'linspace'.")

    all_sigmas = np.array(((1 - acp) / acp) ** 0.5)
    sig = np.interp(ts, np.arange(0, len(all_sigmas)), all_sigmas)
    if final == "zero":
        last = 0.0
    elif final == "sigma_min":
        last = float(((1 - acp[0]) / acp[0]) ** 0.5)
    else:
        raise ConfigError(f"final_sigmas_type {final!r} is not supported; use 'zero'.")
    sig = np.concatenate([sig, [last]]).astype(np.float32)
    return Schedule(timesteps=torch.from_numpy(ts).to(torch.int64), sigmas=torch.from_numpy(sig))


def final_step_first_order(config: Any, steps: int) -> bool:
    """Whether the scheduler takes its last step at first order (diffusers' ``lower_order_final`` rule)."""
    return bool(_cfg_get(config, "euler_at_final", False)
                or (_cfg_get(config, "lower_order_final", True) and steps < 15)
                or _cfg_get(config, "final_sigmas_type", "zero") == "zero")


def _alpha_sigma_lambda(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    import torch

    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    sigma_t = sigma * alpha_t
    return alpha_t, sigma_t, torch.log(alpha_t) - torch.log(sigma_t)


def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: Schedule,
    *,
    grad_from_step: int = 0,
    checkpoint: bool = False,
    final_first_order: bool = True,
) -> torch.Tensor:
    """DPM-Solver++(2M), multistep second order, midpoint (Lu et al. 2022, arXiv 2211.01095, Alg. 2).

    ``denoiser(x, t) -> eps`` returns the (already guided) ε prediction for the current latents at DDPM
    timestep tensor ``t``. Steps ``i < grad_from_step`` run under ``torch.no_grad`` (truncated backprop);
    ``checkpoint`` wraps each model call in non-reentrant activation checkpointing so only the step
    inputs are kept for the backward pass. ``final_first_order`` makes the last step first order (always
    the case when the final sigma is 0, see :func:`final_step_first_order`). Pure: nothing outside the
    returned tensor is changed.
    """
    import torch
    from torch.utils.checkpoint import checkpoint as ckpt

    n = len(schedule)
    sigmas = schedule.sigmas.to("cpu", torch.float32)
    prev_x0: torch.Tensor | None = None
    out_dtype = x.dtype
    for i in range(n):
        t = schedule.timesteps[i]
        with torch.set_grad_enabled(torch.is_grad_enabled() and i >= grad_from_step):
            if i == grad_from_step and i > 0:
                # Gradients stop here: the early trajectory (and its model outputs) are constants.
                x = x.detach()
                prev_x0 = prev_x0.detach() if prev_x0 is not None else None
            if checkpoint and torch.is_grad_enabled():
                eps = ckpt(denoiser, x, t, use_reentrant=False)
            else:
                eps = denoiser(x, t)
            alpha_s0, sigma_s0, lambda_s0 = _alpha_sigma_lambda(sigmas[i])
            alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(sigmas[i + 1])
            # Data prediction x0 = (x - σ ε)/α: DPM-Solver++ integrates the data model, not the noise model.
            x0 = (x - sigma_s0.to(x.device) * eps) / alpha_s0.to(x.device)
            x32 = x.to(torch.float32)  # diffusers upcasts the sample for the update
            h = lambda_t - lambda_s0
            first_order = prev_x0 is None or (i == n - 1 and final_first_order)
            c_x = (sigma_t / sigma_s0).to(x.device)
            c_d = (alpha_t * (torch.exp(-h) - 1.0)).to(x.device)
            if first_order:
                x_next = c_x * x32 - c_d * x0  # DPM-Solver++(1) == DDIM
            else:
                h_0 = lambda_s0 - _alpha_sigma_lambda(sigmas[i - 1])[2]
                r0 = (h_0 / h).to(x.device)
                d1 = (1.0 / r0) * (x0 - prev_x0)
                x_next = c_x * x32 - c_d * x0 - 0.5 * c_d * d1
            x = x_next.to(out_dtype)
            prev_x0 = x0
    return x


def vae_scale_factor(vae: Any) -> int:
    """Pixels per latent cell, computed as the pipeline does (8 for the SD VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


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


def pixart_denoiser(
    transformer: Any,
    prompt_embeds: torch.Tensor,
    prompt_mask: torch.Tensor,
    neg_embeds: torch.Tensor | None = None,
    neg_mask: torch.Tensor | None = None,
    guidance: float = 4.5,
    latent_scale: int = 8,
) -> Denoiser:
    """ε-denoiser over a PixArt DiT with classifier-free guidance, as ``PixArtAlphaPipeline`` runs it.

    One DiT call per step on the concatenated batch ``[uncond; cond]``; ``eps = u + g·(c − u)``; only the
    first ``in_channels`` output channels (ε) are used, the learned-variance half is ignored. With
    ``guidance <= 1`` or no negative embeddings the conditional prediction alone is used. The returned
    closure only reads its captured tensors, so it is safe to recompute under activation checkpointing.
    ``latent_scale`` (pixels per latent cell) only matters for the 1024 px model's size conditions.
    """
    import torch

    cfg = guidance > 1.0 and neg_embeds is not None
    if cfg:
        embeds = torch.cat([neg_embeds, prompt_embeds], dim=0)
        mask = torch.cat([neg_mask, prompt_mask], dim=0)
    else:
        embeds, mask = prompt_embeds, prompt_mask
    embeds, mask = trim_text_padding(embeds, mask)
    in_ch = int(transformer.config.in_channels)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        xin = torch.cat([x, x], dim=0) if cfg else x
        b = xin.shape[0]
        tt = t.reshape(1).to(device=x.device, dtype=torch.int64).expand(b)
        out = transformer(xin, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=tt,
                          added_cond_kwargs=size_conditions(transformer, xin, latent_scale, embeds.dtype),
                          return_dict=False)[0]
        out = out[:, :in_ch]
        if not cfg:
            return out
        uncond, cond = out.chunk(2)
        return uncond + guidance * (cond - uncond)

    return denoise


def tokenize_prompts(tokenizer: Any, prompts: list[str], *, max_length: int = 120,
                     lowercase: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask the way ``PixArtAlphaPipeline.encode_prompt`` makes them.

    Padding to ``max_length`` (120 for PixArt-α), truncation, ``</s>`` appended; the pipeline lower-cases
    and strips prompts when ``clean_caption`` is off, so ``lowercase=True`` matches it.
    """
    texts = [p.lower().strip() if lowercase else p for p in prompts]
    enc = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                    add_special_tokens=True, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


_TRIM_TEXT = contextvars.ContextVar("medart_trim_text_padding", default=True)


@contextlib.contextmanager
def text_padding_trimming(enabled: bool):
    """Turn :func:`trim_text_padding` on or off for the code run inside (e.g. to time the reference
    approach, which always computes all 120 text positions)."""
    token = _TRIM_TEXT.set(bool(enabled))
    try:
        yield
    finally:
        _TRIM_TEXT.reset(token)


def trim_text_padding(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the tail of text positions that are padding in every row (right padding, as PixArt pads).

    Padding keys are masked out of T5 self-attention and of the DiT's cross-attention (a -1e4 bias, so
    exactly zero weight), so the result is the same computed over fewer tokens: a 12-token caption padded
    to 120 costs a tenth of the text work. Works on token ids as well as embeddings.
    """
    if not _TRIM_TEXT.get():
        return embeds, mask
    keep = max(int(mask.sum(1).max()), 1) if mask.numel() else mask.shape[-1]
    if keep >= mask.shape[1] or bool(mask[:, keep:].any()):
        return embeds, mask
    return embeds[:, :keep], mask[:, :keep]


def run_text_encoder(text_encoder: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """T5 hidden states for padded ``ids``, computed on the non-padding length only.

    The returned tensor keeps the padded length (zeros at all-padding positions, which every consumer
    masks), so shapes and cache entries are those of the pipeline's 120-token encoding.
    """
    import torch.nn.functional as F

    ids_t, mask_t = trim_text_padding(ids, mask)
    emb = text_encoder(ids_t, attention_mask=mask_t)[0]
    if emb.shape[1] < ids.shape[1]:
        emb = F.pad(emb, (0, 0, 0, ids.shape[1] - emb.shape[1]))
    return emb


def encode_text(backbone: Any, prompts: list[str], *, max_length: int = 120,
                lowercase: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 embeddings and mask for ``prompts`` (no grad), matching the pipeline's own prompt encoding."""
    import torch

    ids, mask = tokenize_prompts(backbone.tokenizer, prompts, max_length=max_length, lowercase=lowercase)
    te = backbone.text_encoder
    with torch.no_grad():
        emb = run_text_encoder(te, ids.to(te.device), mask.to(te.device))
    return emb, mask.to(te.device)


def initial_noise(shape: tuple[int, ...], generator: torch.Generator | None, *, device: Any = "cpu",
                  dtype: Any = None) -> torch.Tensor:
    """Pure-noise latents drawn exactly as the pipeline draws them (``randn_tensor``; init sigma is 1)."""
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(shape, generator=generator, device=torch.device(device), dtype=dtype or torch.float32)


def sample_pixart(
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
) -> torch.Tensor:
    """Generate PixArt latents (scaled, as the DiT sees them) from pure noise with DPM-Solver++(2M) + CFG.

    ``grad_mode``: ``"none"`` (inference, no graph), ``"full"`` (backprop through every step) or
    ``"truncated"`` (only the last ``truncated_k`` steps build a graph). The noise is drawn from
    ``generator`` with the pipeline's shape rule unless ``latents`` is given. With ``neg_embeds=None``
    and ``guidance > 1`` the negative prompt "" is encoded on the fly (no grad).
    """
    import contextlib

    import torch

    if grad_mode not in ("none", "full", "truncated"):
        raise ConfigError(f"grad_mode must be 'none', 'full' or 'truncated', got {grad_mode!r}.")
    tr = backbone.transformer
    b = prompt_embeds.shape[0]
    if guidance > 1.0 and neg_embeds is None:
        neg_embeds, neg_mask = encode_text(backbone, [""] * b, max_length=prompt_embeds.shape[1])
        neg_embeds = neg_embeds.to(prompt_embeds.dtype)
    if latents is None:
        lat = backbone.resolution // vae_scale_factor(backbone.vae)
        latents = initial_noise((b, int(tr.config.in_channels), lat, lat), generator,
                                device=prompt_embeds.device, dtype=prompt_embeds.dtype)
    schedule = dpm_schedule(backbone.scheduler.config, steps)
    if grad_mode == "truncated":
        if truncated_k < 1:
            raise ConfigError(f"truncated_k must be >= 1, got {truncated_k}.")
        grad_from = max(0, steps - truncated_k)
    else:
        grad_from = 0
    den = pixart_denoiser(tr, prompt_embeds, prompt_mask, neg_embeds, neg_mask, guidance,
                          latent_scale=vae_scale_factor(backbone.vae))
    ctx = torch.no_grad() if grad_mode == "none" else contextlib.nullcontext()
    with ctx:
        return sample_dpmpp_2m(den, latents, schedule, grad_from_step=grad_from,
                               checkpoint=checkpoint and grad_mode != "none",
                               final_first_order=final_step_first_order(backbone.scheduler.config, steps))


def decode(vae: Any, latents: torch.Tensor, *, checkpoint: bool = False) -> torch.Tensor:
    """VAE-decode scaled latents to images in [-1, 1] (unclamped, like the pipeline before post-processing).

    ``checkpoint`` recomputes the decoder's mid and up blocks one at a time in the backward pass, so the
    peak holds one block's activations instead of the whole decoder's. (Checkpointing the decoder as one
    unit would save nothing: its backward comes right after its forward.) The VAE is left as it was found.
    """
    import torch

    def run(z: torch.Tensor) -> torch.Tensor:
        return vae.decode(z / vae.config.scaling_factor, return_dict=False)[0]

    z = latents.to(vae.dtype)
    dec = getattr(vae, "decoder", None)
    if not (checkpoint and torch.is_grad_enabled() and hasattr(dec, "gradient_checkpointing")):
        return run(z)
    with _block_checkpointing(dec):
        return run(z)


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
