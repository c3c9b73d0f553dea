"""Validation of a training run: an image grid at fixed prompts and seeds, and a deterministic latent loss
on held-out images, so curves compare across steps and runs. Images from a random-weight backbone are
labelled on the grid.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .constants import MAX_TOKENS, RANDOM_LABEL
from .fileio import atomic_write
from .seeds import derive_seed
from .workspace import RunLayout

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .examples import Example
    from .train_config import TrainConfig

# Fixed DDPM timesteps of the deterministic validation loss: spread over the schedule so the number moves
# when either coarse structure (high t) or detail (low t) changes.
VALIDATION_TIMESTEPS = (50, 250, 500, 750, 950)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without the sized default font
        return ImageFont.load_default()


def render_grid(rows: list[list[Any]], *, title: str, row_labels: list[str], is_random: bool) -> Any:
    """Rows of PIL tiles under a title; a random-weight backbone gets a red "random-weight demo backbone"."""
    from PIL import Image, ImageDraw

    tile = rows[0][0].size[0]
    cols = max(len(r) for r in rows)
    head_h = 32 if is_random else 18
    row_h = tile + 14
    grid = Image.new("RGB", (max(cols * tile, 300), head_h + row_h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((4, 2), title, fill=(0, 0, 0), font=_font(12))
    if is_random:
        draw.text((4, 16), RANDOM_LABEL, fill=(200, 0, 0), font=_font(12))
    for r, row in enumerate(rows):
        y = head_h + r * row_h
        draw.text((2, y), row_labels[r][:70], fill=(60, 60, 60), font=_font(10))
        for c, im in enumerate(row):
            grid.paste(im, (c * tile, y + 13))
    return grid


def sample_validation_images(backbone: Any, embeds: "torch.Tensor", mask: "torch.Tensor", neg_embeds: "torch.Tensor",
                             neg_mask: "torch.Tensor", seeds: Sequence[int], *, steps: int, guidance: float,
                             autocast: Callable[[], Any], trim_padding: bool = True) -> list["torch.Tensor"]:
    """One [P, 3, R, R] image batch (in [-1, 1]) per seed: DPM-Solver++ from noise seeded by that seed."""
    import torch

    from .pixart import decode, sample_latents

    p = embeds.shape[0]
    out = []
    with torch.no_grad(), autocast():
        for seed in seeds:
            gen = torch.Generator(device="cpu").manual_seed(int(seed))
            lat = sample_latents(backbone, embeds, mask, neg_embeds.expand(p, -1, -1), neg_mask.expand(p, -1),
                                 steps=steps, guidance=guidance, generator=gen, grad_mode="none",
                                 trim_padding=trim_padding)
            out.append(decode(backbone.vae, lat).float())
    return out


def validation_loss(backbone: Any, latents: "torch.Tensor", embeds: "torch.Tensor", mask: "torch.Tensor",
                    *, seed: int, autocast: Callable[[], Any], trim_padding: bool = True) -> float:
    """Mean ε-MSE of the held-out images at the fixed VALIDATION_TIMESTEPS with fixed noise: the same
    weights always give the same number, so curves compare across steps and runs."""
    import torch

    from .pixart import dit_eps, vae_scale_factor
    from .sampling import alphas_cumprod

    acp = alphas_cumprod(backbone.scheduler.config)
    tr = backbone.transformer
    gen = torch.Generator().manual_seed(derive_seed(seed, "validation-noise"))
    noise = torch.randn((len(VALIDATION_TIMESTEPS),) + tuple(latents.shape), generator=gen)
    total = 0.0
    with torch.no_grad(), autocast():
        for k, t_int in enumerate(VALIDATION_TIMESTEPS):
            t_int = min(t_int, acp.shape[0] - 1)
            a = float(acp[t_int])
            eps = noise[k].to(latents.device)
            noisy = math.sqrt(a) * latents.float() + math.sqrt(1 - a) * eps
            t = torch.full((latents.shape[0],), t_int, dtype=torch.int64, device=latents.device)
            out = dit_eps(tr, noisy.to(latents.dtype), t, embeds, mask,
                          latent_scale=vae_scale_factor(backbone.vae), trim_padding=trim_padding)
            total += float(torch.nn.functional.mse_loss(out.float(), eps.float()))
    return total / len(VALIDATION_TIMESTEPS)


@dataclass
class ValidationResult:
    grid: Path | None        # written only when the images passed the checks
    loss: float | None       # None without held-out images
    problem: str | None      # what is wrong (NaN pixels, a flat image, a NaN loss), or None


class Validator:
    """The validation of one run: fixed prompts and seeds for the grid, the held-out latents and captions for
    the loss; ``run(step)`` samples, checks and writes ``validation/step_XXXXXX.png``.

    With the feature cache the prompts' and held-out images' embeddings/latents are computed once up front
    (T5 is moved off the accelerator); otherwise they are re-encoded at every validation (T5 may be training).
    """

    def __init__(self, backbone: Any, cfg: "TrainConfig", *, layout: RunLayout, run_name: str,
                 prompts: list[str], val_set: Sequence["Example"], cache: Any, device: Any, weight_dtype: Any,
                 autocast: Callable[[], Any]):
        import torch

        from .cache import cache_item
        from .examples import load_pixels, tokenize
        from .pixart import encode_latents, encode_negative, encode_prompts, tokenize_prompts

        self.backbone, self.cfg, self.layout, self.run_name = backbone, cfg, layout, run_name
        self.prompts, self.device, self.dtype, self.autocast = prompts, device, weight_dtype, autocast
        self.trim = bool(cfg.trim_text_padding)
        self.cached = cache is not None
        self.latents = None
        self._prompt_ids = tokenize_prompts(backbone.tokenizer, prompts, max_length=MAX_TOKENS)
        if self.cached:
            with torch.no_grad():
                self.fixed_prompts = encode_prompts(backbone, *self._prompt_ids, trim_padding=self.trim)
                self.fixed_negative = encode_negative(backbone, 1, text=cfg.hldf.negative_prompt,
                                                      trim_padding=self.trim)
        if not val_set:
            return
        if self.cached:
            feats = [cache.load(cache_item(e)) for e in val_set]
            scale = float(backbone.vae.config.scaling_factor)
            self.latents = torch.stack([f["latent_mean"] for f in feats]).to(device, torch.float32) * scale
            self.val_text = (torch.stack([f["prompt_embeds"] for f in feats]).to(device, weight_dtype),
                             torch.stack([f["prompt_mask"] for f in feats]).to(device))
        else:
            px = torch.stack([load_pixels(e.path, int(backbone.resolution), crop="center") for e in val_set])
            self.latents = encode_latents(backbone.vae, px.to(device, weight_dtype), sample=False).float()
            self.val_ids = tokenize(backbone.tokenizer, [e.text for e in val_set])[:2]

    def _text(self) -> tuple[Any, Any, Any]:
        """(prompt embeddings+mask, negative embeddings+mask, held-out caption embeddings+mask or None)."""
        from .pixart import encode_negative, encode_prompts

        if self.cached:
            return self.fixed_prompts, self.fixed_negative, (self.val_text if self.latents is not None else None)
        b, trim = self.backbone, self.trim
        return (encode_prompts(b, *self._prompt_ids, trim_padding=trim),
                encode_negative(b, 1, text=self.cfg.hldf.negative_prompt, trim_padding=trim),
                encode_prompts(b, *self.val_ids, trim_padding=trim) if self.latents is not None else None)

    def run(self, step: int) -> ValidationResult:
        import torch

        from .pixart import t5_is_trainable, to_pil

        bb, cfg, dev = self.backbone, self.cfg, self.device
        bb.transformer.eval()
        bb.text_encoder.eval()
        try:
            with torch.no_grad():
                (p_emb, p_mask), (n_emb, n_mask), v_text = self._text()
                images = sample_validation_images(
                    bb, p_emb.to(dev, self.dtype), p_mask.to(dev), n_emb.to(dev, self.dtype), n_mask.to(dev),
                    cfg.validation_seeds, steps=cfg.validation_steps, guidance=cfg.validation_guidance,
                    autocast=self.autocast, trim_padding=self.trim)
                loss = None
                if self.latents is not None:
                    loss = validation_loss(bb, self.latents.to(self.dtype), v_text[0].to(dev, self.dtype),
                                           v_text[1].to(dev), seed=cfg.seed, autocast=self.autocast,
                                           trim_padding=self.trim)
        finally:
            bb.transformer.train()
            if t5_is_trainable(bb):
                bb.text_encoder.train()
        problem = image_problem(images, cfg.validation_seeds)
        if problem is None and loss is not None and not math.isfinite(loss):
            problem = f"the validation loss is {loss}"
        if problem is not None:
            return ValidationResult(grid=None, loss=loss, problem=problem)
        rows = [[to_pil(batch[i:i + 1])[0] for batch in images] for i in range(len(self.prompts))]
        grid = render_grid(rows, title=f"{self.run_name} step {step} seeds {list(cfg.validation_seeds)}",
                           row_labels=self.prompts, is_random=bb.is_random)
        path = self.layout.validation_grid(step)
        atomic_write(path, lambda f: grid.save(f, format="PNG"), binary=True)
        return ValidationResult(grid=path, loss=loss, problem=None)


def image_problem(images: Sequence["torch.Tensor"], seeds: Sequence[int]) -> str | None:
    """Why a set of validation images shows the run has diverged (NaN/Inf pixels, a flat image), or None."""
    import torch

    for s_i, batch in enumerate(images):
        if not torch.isfinite(batch).all():
            return f"the validation image for seed {seeds[s_i]} has NaN/Inf pixels"
        flat = batch.flatten(1)
        if ((flat.max(dim=1).values - flat.min(dim=1).values) < 1e-6).any():
            return f"a validation image for seed {seeds[s_i]} is one flat colour"
    return None
