"""Hybrid-Level Diffusion Fine-tuning (HLDF, Med-Art §2.3): the losses and the hybrid training step.

    L = L_latent + w · L_color     on pixel steps (every N-th step), else L = L_latent

``L_latent`` is PixArt's ε-prediction MSE at a uniform DDPM timestep. ``L_color`` generates one image per
real image from pure noise with M steps of DPM-Solver++(2M) and classifier-free guidance, decodes it with
the VAE and compares per-channel colour moments with the real image; w defaults to 1/M (the paper).
Gradients flow through the sampler (all M steps, or the last K), the VAE decoder and T5 (when it has
trainable LoRA weights), with activation checkpointing so memory stays that of ~one step.

Every random draw takes the caller's ``torch.Generator``: a step is reproducible from (seed, step).
torch is imported inside functions: the CLI imports this module at start-up.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from .config import JsonConfig
from .errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

ColorVariant = Literal["paper", "reference"]
GradPath = Literal["full", "truncated"]
# "auto": the run asks the memory estimate (estimate.choose_checkpointing) and checkpoints only when the
# un-checkpointed pixel step would not fit; a library call that was not resolved checkpoints (the safe side).
Checkpointing = Literal["auto", "on", "off"]
CHECKPOINTING = ("auto", "on", "off")
_CHECKPOINTING_ALIASES = {True: "on", False: "off", "true": "on", "false": "off", "yes": "on", "no": "off",
                          "1": "on", "0": "off"}

# PixArt-α's DDPM training schedule; used when the caller does not pass the backbone's scheduler config.
PIXART_DDPM = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}


@dataclass
class HLDFConfig(JsonConfig):
    """HLDF hyper-parameters (defaults = the paper). Round-trips through JSON (``to_json``/``from_json``).

    pixel_every: N, a pixel-level step every N optimiser steps (see :func:`is_pixel_step`).
    sample_steps: M, DPM-Solver++ steps used to generate the image for the colour loss.
    guidance: classifier-free guidance scale of that generation; negative_prompt is its unconditional text.
    color_weight: w in ``L_latent + w·L_color``; None means 1/M as in the paper.
    color_variant: "paper" sums the squared moment gaps over the 3 channels; "reference" averages them
        (the public reference code, i.e. 1/3 of the paper's value).
    grad_path: "full" backpropagates through all M steps; "truncated" only through the last truncated_k.
    checkpointing: "on" recomputes each sampling step and the VAE decoder in the backward pass (same
        gradients, memory of ~one step instead of M, ≈ +45 % time per pixel step); "off" keeps every step's
        activations; "auto" (default) lets the run decide from the memory estimate and the device's free
        memory (see ``estimate.choose_checkpointing``). ``true``/``false`` of older configs mean on/off.
    """

    CONFIG_NAME: ClassVar[str] = "HLDF config"

    pixel_every: int = 500
    sample_steps: int = 20
    guidance: float = 4.5
    color_weight: float | None = None
    color_variant: ColorVariant = "paper"
    grad_path: GradPath = "full"
    truncated_k: int = 2
    checkpointing: Checkpointing = "auto"
    negative_prompt: str = ""

    def __post_init__(self) -> None:
        key = self.checkpointing.strip().lower() if isinstance(self.checkpointing, str) else self.checkpointing
        self.checkpointing = _CHECKPOINTING_ALIASES.get(key, key)  # type: ignore[arg-type]
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field."""
        if int(self.pixel_every) < 1:
            raise ConfigError(f"pixel_every must be >= 1 (the paper uses 500), got {self.pixel_every}.")
        if int(self.sample_steps) < 1:
            raise ConfigError(f"sample_steps must be >= 1 (the paper uses 20), got {self.sample_steps}.")
        if self.color_variant not in ("paper", "reference"):
            raise ConfigError(f"color_variant must be 'paper' or 'reference', got {self.color_variant!r}.")
        if self.grad_path not in ("full", "truncated"):
            raise ConfigError(f"grad_path must be 'full' or 'truncated', got {self.grad_path!r}.")
        if int(self.truncated_k) < 1:
            raise ConfigError(f"truncated_k must be >= 1, got {self.truncated_k}.")
        if self.checkpointing not in CHECKPOINTING:
            raise ConfigError(f"checkpointing must be 'auto', 'on' or 'off', got {self.checkpointing!r}.")
        if self.color_weight is not None and float(self.color_weight) < 0:
            raise ConfigError(f"color_weight must be >= 0 or null (= 1/sample_steps), got {self.color_weight}.")

    @property
    def use_checkpointing(self) -> bool:
        """Whether the pixel step checkpoints: "on", or "auto" not resolved by a run (the memory-safe side)."""
        return self.checkpointing != "off"

    @property
    def weight(self) -> float:
        """The colour-loss weight actually used: ``color_weight`` or 1/M."""
        return float(self.color_weight) if self.color_weight is not None else 1.0 / self.sample_steps


def is_pixel_step(step: int, cfg: HLDFConfig) -> bool:
    """Whether 0-based optimiser step ``step`` adds the pixel-level loss: ``(step + 1) % N == 0``.

    Why not ``step % N == 0``: counting completed steps makes "every N steps" mean the N-th, 2N-th, …
    step, so a run of S steps has exactly ⌊S/N⌋ pixel steps (the paper's ratio), and step 0 does not spend
    M sampler passes on the untouched base model. The trainer should run one pixel step as a pre-flight
    if it wants to surface out-of-memory early.
    """
    return (int(step) + 1) % int(cfg.pixel_every) == 0


def latent_loss(transformer: Any, latents: torch.Tensor, prompt_embeds: torch.Tensor,
                prompt_mask: torch.Tensor, *, generator: torch.Generator | None,
                scheduler_config: Any = None, trim_padding: bool = True, snr_gamma: float | None = None,
                per_sample: bool = False) -> torch.Tensor:
    """ε-prediction MSE (PixArt's training loss) on scaled VAE latents.

    t ~ U{0..T-1} per sample, ``x_t = sqrt(ᾱ_t)·x_0 + sqrt(1-ᾱ_t)·ε`` with the DDPM ᾱ of
    ``scheduler_config`` (default PixArt's linear 1e-4..0.02, T=1000); the loss is the MSE between ε and
    the first 4 output channels (the learned-variance channels are not trained, as in the paper).

    ``snr_gamma``: min-SNR-γ weighting (``loss_weighting.min_snr_weights``): each sample's MSE times its
    timestep's weight, then the batch mean. None (the default) is the plain MSE, computed exactly as before.
    ``per_sample`` returns the unweighted MSE of each sample ([B]) instead of a scalar.
    """
    import torch

    from .pixart import dit_eps, randn_like_on
    from .sampling import alphas_cumprod

    acp = alphas_cumprod(scheduler_config if scheduler_config is not None else PIXART_DDPM)
    b = latents.shape[0]
    gdev = generator.device if generator is not None else torch.device("cpu")
    t = torch.randint(0, acp.shape[0], (b,), generator=generator, device=gdev).to(latents.device)
    noise = randn_like_on(generator, latents)
    a = acp.to(latents.device)[t].to(torch.float32).view(b, 1, 1, 1)
    noisy = (a.sqrt() * latents.float() + (1 - a).sqrt() * noise.float()).to(latents.dtype)
    pred = dit_eps(transformer, noisy, t, prompt_embeds, prompt_mask, trim_padding=trim_padding)
    if snr_gamma is None and not per_sample:
        return torch.nn.functional.mse_loss(pred.float(), noise.float())
    per = ((pred.float() - noise.float()) ** 2).flatten(1).mean(dim=1)
    if per_sample:
        return per
    from .loss_weighting import min_snr_weights

    return (per * min_snr_weights(t, acp, float(snr_gamma)).to(per.device)).mean()


def color_moments(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-channel mean and standard deviation over the pixels (population std, [B, C] each)."""
    import torch

    x = images.float().flatten(2)
    mu = x.mean(dim=2)
    var = x.var(dim=2, correction=0)
    # The tiny floor keeps d sigma / d x finite for a flat channel (sqrt'(0) is infinite).
    return mu, torch.sqrt(var + 1e-12)


def color_moment_loss(fake: torch.Tensor, real: torch.Tensor, variant: ColorVariant = "paper") -> torch.Tensor:
    """Colour-moment loss of Med-Art: ``Σ_c (μ_c(x̃) − μ_c(x))² + (σ_c(x̃) − σ_c(x))²`` per image, mean over
    the batch. ``variant="reference"`` takes the mean over channels instead of the sum (1/3 of "paper").

    ``fake`` and ``real`` are [B, 3, H, W] in the same range ([-1, 1]); image sizes may differ since only
    moments are compared, but image i of ``fake`` is compared with image i of ``real``.
    """
    if fake.shape[:2] != real.shape[:2]:
        raise ConfigError(f"colour loss needs one generated image per real image with the same channels; "
                          f"got {tuple(fake.shape)} vs {tuple(real.shape)}.")
    mu_f, sd_f = color_moments(fake)
    mu_r, sd_r = color_moments(real.to(fake.device))
    per_channel = (mu_f - mu_r) ** 2 + (sd_f - sd_r) ** 2  # [B, C]
    if variant == "paper":
        per_image = per_channel.sum(dim=1)
    elif variant == "reference":
        per_image = per_channel.mean(dim=1)
    else:
        raise ConfigError(f"color_variant must be 'paper' or 'reference', got {variant!r}.")
    return per_image.mean()


def generate_for_loss(backbone: Any, prompt_embeds: torch.Tensor, prompt_mask: torch.Tensor,
                      cfg: HLDFConfig, *, generator: torch.Generator | None,
                      noise: torch.Tensor | None = None, neg_embeds: torch.Tensor | None = None,
                      neg_mask: torch.Tensor | None = None, trim_padding: bool = True) -> torch.Tensor:
    """Differentiably generate and decode one image per prompt for the pixel loss (images in ~[-1, 1]).

    Pure noise (drawn from ``generator`` unless ``noise`` is given), M steps DPM-Solver++(2M) with CFG and
    the negative prompt, then the VAE decoder on ``latents / scaling_factor``. The decoded image is not
    clamped: clamping would zero the gradient of exactly the saturated pixels the colour loss should move.
    """
    import torch

    from .pixart import decode, encode_negative, latent_shape, randn_like_on, sample_latents

    b = prompt_embeds.shape[0]
    if neg_embeds is None and cfg.guidance > 1.0:
        neg_embeds, neg_mask = encode_negative(backbone, b, text=cfg.negative_prompt,
                                               max_length=prompt_embeds.shape[1], trim_padding=trim_padding)
    if noise is None:
        # float32 noise whatever the embeddings' dtype: the sampler's state is float32.
        noise = randn_like_on(generator, prompt_embeds.new_empty(latent_shape(backbone, b), dtype=torch.float32))
    latents = sample_latents(backbone, prompt_embeds, prompt_mask, neg_embeds, neg_mask, steps=int(cfg.sample_steps),
                             guidance=cfg.guidance, latents=noise,
                             grad_mode="truncated" if cfg.grad_path == "truncated" else "full",
                             truncated_k=int(cfg.truncated_k), checkpoint=cfg.use_checkpointing,
                             trim_padding=trim_padding)
    return decode(backbone.vae, latents, checkpoint=cfg.use_checkpointing)


def pixel_loss(backbone: Any, prompt_embeds: torch.Tensor, prompt_mask: torch.Tensor,
               real_images: torch.Tensor, cfg: HLDFConfig, *, generator: torch.Generator | None,
               noise: torch.Tensor | None = None, neg_embeds: torch.Tensor | None = None,
               neg_mask: torch.Tensor | None = None, trim_padding: bool = True) -> torch.Tensor:
    """HLDF's pixel-level colour loss (unweighted): generate x̃_i for prompt i, compare with real x_i.

    Works at any batch size (image i is generated from prompt i and compared with real image i); the
    result is the batch mean of the per-image loss. ``real_images`` are [B, 3, H, W] in [-1, 1].
    Gradient path and checkpointing follow ``cfg`` (see :class:`HLDFConfig`).
    """
    if real_images.shape[0] != prompt_embeds.shape[0]:
        raise ConfigError(f"pixel loss needs one prompt per real image: {prompt_embeds.shape[0]} prompts, "
                          f"{real_images.shape[0]} images.")
    fake = generate_for_loss(backbone, prompt_embeds, prompt_mask, cfg, generator=generator, noise=noise,
                             neg_embeds=neg_embeds, neg_mask=neg_mask, trim_padding=trim_padding)
    return color_moment_loss(fake, real_images, cfg.color_variant)


def _batch_latents(backbone: Any, batch: Mapping[str, Any], generator: torch.Generator | None) -> torch.Tensor:
    from .pixart import encode_latents

    if batch.get("latents") is not None:
        return batch["latents"]
    if batch.get("pixel_values") is None:
        raise ConfigError("A training batch needs 'latents' (scaled VAE latents) or 'pixel_values' in [-1, 1].")
    return encode_latents(backbone.vae, batch["pixel_values"], generator=generator)


def _batch_prompts(backbone: Any, batch: Mapping[str, Any], trim_padding: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from .pixart import encode_prompts

    if batch.get("prompt_embeds") is not None:
        return batch["prompt_embeds"], batch["prompt_mask"]
    if batch.get("input_ids") is None:
        raise ConfigError("A training batch needs 'input_ids' + 'attention_mask' or cached "
                          "'prompt_embeds' + 'prompt_mask'.")
    return encode_prompts(backbone, batch["input_ids"], batch["attention_mask"], trim_padding=trim_padding)


def hybrid_loss(step: int, backbone: Any, batch: Mapping[str, Any], cfg: HLDFConfig, *,
                generator: torch.Generator | None, trim_padding: bool = True, snr_gamma: float | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """One HLDF training objective: ``L_latent`` plus ``w·L_color`` when :func:`is_pixel_step` (step is
    the 0-based optimiser step).

    ``batch`` keys: ``latents`` (scaled VAE latents) or ``pixel_values`` (encoded here, no grad);
    ``input_ids`` + ``attention_mask`` (T5 run here, with grad if it has LoRA) or cached
    ``prompt_embeds`` + ``prompt_mask``; ``pixel_values`` ([-1, 1]) are required on pixel steps. Optional
    ``neg_embeds`` + ``neg_mask`` reuse a cached negative prompt when T5 is frozen.
    ``trim_padding`` computes text work on the non-padding tokens only (same result, see ``pixart``).
    ``snr_gamma`` weights the latent loss by min-SNR-γ (None: off); the colour loss is never weighted.
    Returns the loss tensor and float logs: loss, loss_latent, and on pixel steps loss_color, color_weight.
    """
    embeds, mask = _batch_prompts(backbone, batch, trim_padding)
    tr = backbone.transformer
    # Latents stay float32 (the noising is float32 maths); dit_eps casts the noisy input to the DiT's dtype.
    latents = _batch_latents(backbone, batch, generator).to(tr.device).float()
    l_lat = latent_loss(tr, latents, embeds.to(tr.dtype), mask, generator=generator,
                        scheduler_config=backbone.scheduler.config, trim_padding=trim_padding,
                        snr_gamma=snr_gamma)
    logs: dict[str, float] = {"loss_latent": float(l_lat.detach())}
    loss = l_lat
    if is_pixel_step(step, cfg):
        real = batch.get("pixel_values")
        if real is None:
            raise ConfigError(f"Step {step} is a pixel-level HLDF step but the batch has no 'pixel_values'; "
                              "keep images in the batch (or cache them) when pixel_every is set.")
        l_col = pixel_loss(backbone, embeds.to(tr.dtype), mask, real.to(tr.device), cfg, generator=generator,
                           neg_embeds=batch.get("neg_embeds"), neg_mask=batch.get("neg_mask"),
                           trim_padding=trim_padding)
        loss = loss + cfg.weight * l_col
        logs["loss_color"] = float(l_col.detach())
        logs["color_weight"] = cfg.weight
    logs["loss"] = float(loss.detach())
    return loss, logs
