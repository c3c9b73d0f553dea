"""A privacy gauge per checkpoint: does it copy its training images, and does it reveal who was in them?

Dar et al. (arXiv 2402.01054) found on average 37 % of the patient training images memorised by medical
diffusion models, and almost no paper checks. Two measures, both reproducible from one seed:

* **Copy detection.** For each generated image (``per_member`` seeds per member caption) its nearest
  training (member) image, in a feature space (the offline ``domain`` classifier; DINOv2 as well when its
  weights are present) and in pixels (RMS distance of S×S downsized images). The threshold is *calibrated*:
  the ``quantile`` (default 1st percentile) of the nearest-training distances of held-out real images of
  the same distribution, so a generated image is a copy when it lies closer to a training image than real
  unseen images almost ever do (Somepalli et al. 2023, Carlini et al. 2023 measure copies the same way, with
  a fixed threshold). The copy rate comes with a 95 % Wilson interval and the top-k closest pairs. The
  headline space (``primary="auto"``) is DINOv2 when measured, else pixels: the domain classifier was
  trained to ignore within-class differences, so its features say "same class" rather than "same image"
  (bench/RESULTS.md: 0.995 feature similarity at 16.6 dB pixel PSNR); it is reported beside them.
* **Membership inference.** A loss attack (Matsumoto et al. 2023; Carlini et al. 2023 §5): the denoising
  loss of each real image at FIXED timesteps and noise (seeded, identical for every image and checkpoint),
  lower loss ⇒ member. AUC of members (training images) against non-members (held-out images) with a
  stratified bootstrap interval; 0.5 means the checkpoint does not reveal who was in its training set.

``privacy_report`` measures one checkpoint and saves JSON (and a picture of the closest pairs) under
``W/privacy/``; ``privacy_curve`` does it for every checkpoint of a run. ``validation_copy_rate`` is the
number a trainer can stop on (``--stop-if-copy-rate``), from a backbone in memory. ``cmd_privacy``
runs ``python -m medart_core privacy`` (its arguments: :mod:`medart_core.commands.privacy`).

torch is imported inside functions: the CLI imports this module at start-up.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .config import JsonConfig
from .errors import ConfigError, MedArtError, NotFoundError
from .examples import Example
from .fileio import atomic_write, atomic_write_text
from .seeds import derive_seed
from .workspace import Workspace, validate_name

if TYPE_CHECKING:  # pragma: no cover
    import torch

PRIVACY_FORMAT = 1
SPACES = ("domain", "dinov2", "pixel")
DINOV2_DEFAULT = "facebook/dinov2-large"


@dataclass
class PrivacySpec(JsonConfig):
    """How a checkpoint's privacy is measured; recorded in every report."""

    seed: int = 0
    per_member: int = 2                     # generated images per member caption (each its own seed)
    steps: int = 20                         # DPM-Solver++(2M) steps of the generated images
    guidance: float = 4.5
    size: int = 64                          # preparation size S of the feature extractors
    pixel_size: int = 32                    # pixels are compared downsized to this (RMS distance in [0, 1])
    quantile: float = 0.01                  # of the held-out images' nearest-training distances: the threshold
    top_k: int = 8                          # closest pairs kept for display
    extractor: str = "domain"               # "domain" | "none"
    extractor_dataset: str | None = None    # labelled dataset the domain classifier learns (required for domain)
    extractor_epochs: int = 15
    dinov2: str | None = "auto"             # "auto": $MEDART_DINOV2 or the Hub cache when present; an id/folder; None
    primary: str = "auto"                   # headline space: "auto" (dinov2 if measured, else pixel) | a space
    timesteps: tuple[int, ...] = (50, 100, 200, 300, 400)   # of the loss attack
    noise_draws: int = 2                    # fixed noise draws per timestep
    n_boot: int = 1000
    batch_size: int = 16
    precision: str | None = None            # generation/loss precision (None: the device default)
    round_trip: bool = True                 # compare in the decoder's image space (see real_set)

    def __post_init__(self) -> None:
        self.timesteps = tuple(int(t) for t in self.timesteps)
        if not 0.0 < float(self.quantile) < 1.0:
            raise ConfigError(f"quantile must be in (0, 1) (0.01 is the 1st percentile), got {self.quantile}.")
        for k in ("per_member", "steps", "size", "pixel_size", "noise_draws", "batch_size", "extractor_epochs"):
            if int(getattr(self, k)) < 1:
                raise ConfigError(f"privacy {k} must be >= 1, got {getattr(self, k)}.")
        if not self.timesteps or min(self.timesteps) < 0:
            raise ConfigError(f"timesteps must be non-empty DDPM timesteps >= 0, got {self.timesteps}.")
        if self.extractor not in ("domain", "none"):
            raise ConfigError(f"extractor must be 'domain' or 'none', got {self.extractor!r}.")
        if self.primary not in ("auto",) + SPACES:
            raise ConfigError(f"primary must be 'auto' or one of {list(SPACES)}, got {self.primary!r}.")


# =========================================================================================================
# Copy detection: nearest training image, calibrated threshold
# =========================================================================================================
def nearest(query: "torch.Tensor", reference: "torch.Tensor", metric: str) -> tuple["torch.Tensor", "torch.Tensor"]:
    """For each row of ``query`` its nearest row of ``reference``: (distance [Q], index [Q]). ``cosine``:
    1 − cosine similarity (features); ``rms``: root-mean-square difference per coordinate (pixels in [0, 1])."""
    import torch

    q, r = query.double().flatten(1), reference.double().flatten(1)
    if metric == "cosine":
        d = 1.0 - torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(r, dim=1).T
    elif metric == "rms":
        d = torch.cdist(q, r) / math.sqrt(q.shape[1])
    else:
        raise ConfigError(f"metric must be 'cosine' or 'rms', got {metric!r}.")
    best, idx = d.clamp(min=0).min(dim=1)
    return best, idx


def calibrated_threshold(held_out_distances: "torch.Tensor", quantile: float = 0.01) -> float:
    """The ``quantile`` of held-out real images' nearest-training distances (linear interpolation)."""
    import torch

    d = torch.as_tensor(held_out_distances, dtype=torch.float64).flatten()
    if d.numel() == 0:
        raise ConfigError("Calibrating the copy threshold needs held-out real images; none were given.")
    return float(torch.quantile(d, float(quantile)))


def copy_detection(generated: "torch.Tensor", training: "torch.Tensor", held_out: "torch.Tensor", *,
                   metric: str, quantile: float = 0.01, top_k: int = 8) -> dict[str, Any]:
    """Copy rate of ``generated`` against ``training`` in one space, the threshold calibrated on ``held_out``
    (real images the model never saw): copies are strictly closer than the threshold."""
    from . import metrics as M

    d_gen, i_gen = nearest(generated, training, metric)
    d_held, _ = nearest(held_out, training, metric)
    thr = calibrated_threshold(d_held, quantile)
    flags = (d_gen < thr).tolist()
    n, k = len(flags), int(sum(flags))
    order = sorted(range(n), key=lambda j: (float(d_gen[j]), j))[: max(0, int(top_k))]
    return {"metric": metric, "quantile": float(quantile), "threshold": thr, "n_generated": n,
            "n_held_out": int(d_held.numel()), "n_training": int(training.shape[0]), "n_copies": k,
            "copy_rate": k / n if n else 0.0, "copy_rate_ci": list(M.proportion_ci(k, n)),
            "distance_median": float(d_gen.median()) if n else None,
            "held_out_distance_median": float(d_held.median()),
            "distances": [float(x) for x in d_gen], "nearest": [int(x) for x in i_gen],
            "top_pairs": [{"generated": j, "training": int(i_gen[j]), "distance": float(d_gen[j]),
                           "copy": bool(flags[j])} for j in order]}


# =========================================================================================================
# Membership inference: loss attack
# =========================================================================================================
def membership_auc(member_losses: Sequence[float], non_member_losses: Sequence[float], *, n_boot: int = 1000,
                   seed: int = 0, alpha: float = 0.05) -> dict[str, Any]:
    """AUC of the loss attack (lower loss ⇒ member) with a stratified percentile-bootstrap interval."""
    import numpy as np
    from sklearn.metrics import roc_auc_score, roc_curve

    m, nm = np.asarray(member_losses, dtype=np.float64), np.asarray(non_member_losses, dtype=np.float64)
    if m.size < 1 or nm.size < 1:
        raise ConfigError(f"The membership attack needs members and non-members; got {m.size} and {nm.size}.")
    y = np.r_[np.ones(m.size), np.zeros(nm.size)]
    score = -np.r_[m, nm]
    auc = float(roc_auc_score(y, score))
    rng = np.random.default_rng(derive_seed(seed, "privacy-mia-bootstrap", bits=31))
    boots = []
    for _ in range(int(n_boot)):
        # Each class resampled on its own: every replicate keeps both classes and their sizes.
        bm, bn = m[rng.integers(0, m.size, m.size)], nm[rng.integers(0, nm.size, nm.size)]
        boots.append(roc_auc_score(y, -np.r_[bm, bn]))
    ci = [float(x) for x in np.quantile(boots, [alpha / 2, 1 - alpha / 2])] if boots else [0.0, 1.0]
    fpr, tpr, _ = roc_curve(y, score)
    return {"auc": auc, "auc_ci": ci, "n_members": int(m.size), "n_non_members": int(nm.size),
            "member_loss_mean": float(m.mean()), "non_member_loss_mean": float(nm.mean()),
            "tpr_at_fpr_0.1": float(np.interp(0.1, fpr, tpr)), "n_boot": int(n_boot)}


def _eval_mode(backbone: Any) -> contextlib.AbstractContextManager[None]:
    """Eval mode for the measurement, the modules' training flags restored afterwards (a trainer calls this)."""
    @contextlib.contextmanager
    def ctx() -> Any:
        mods = [backbone.transformer, backbone.text_encoder, backbone.vae]
        flags = [m.training for m in mods]
        for m in mods:
            m.eval()
        try:
            yield
        finally:
            for m, f in zip(mods, flags):
                m.train(f)
    return ctx()


def denoising_losses(backbone: Any, examples: Sequence[Example], spec: PrivacySpec, *,
                     autocast: Callable[[], Any] | None = None) -> list[float]:
    """Per image, the ε-MSE at ``spec.timesteps`` × ``spec.noise_draws`` fixed noises (the same for every
    image and checkpoint), on the posterior-mean latent of its centre crop, conditioned on its caption."""
    import torch

    from .examples import load_pixels
    from .pixart import dit_eps, encode_latents, encode_text, latent_shape, vae_scale_factor
    from .sampling import alphas_cumprod

    acp = alphas_cumprod(backbone.scheduler.config)
    tr, res = backbone.transformer, int(backbone.resolution)
    shape = latent_shape(backbone, 1, res)[1:]
    noises = [(min(int(t), acp.shape[0] - 1), torch.randn(shape, generator=torch.Generator().manual_seed(
        derive_seed(spec.seed, "privacy-mia-noise", k, d)))) for k, t in enumerate(spec.timesteps)
        for d in range(int(spec.noise_draws))]
    out: list[float] = []
    with torch.no_grad(), _eval_mode(backbone), (autocast or contextlib.nullcontext)():
        for j in range(0, len(examples), int(spec.batch_size)):
            chunk = list(examples[j:j + int(spec.batch_size)])
            px = torch.stack([load_pixels(e.path, res, crop="center") for e in chunk])
            lat = encode_latents(backbone.vae, px, sample=False).float().to(tr.device)
            emb, mask = encode_text(backbone, [e.text for e in chunk])
            total = torch.zeros(len(chunk), dtype=torch.float64)
            for t_int, eps in noises:
                a = float(acp[t_int])
                eps_b = eps.to(lat.device).expand_as(lat)
                noisy = math.sqrt(a) * lat + math.sqrt(1 - a) * eps_b
                t = torch.full((len(chunk),), t_int, dtype=torch.int64, device=lat.device)
                pred = dit_eps(tr, noisy, t, emb.to(tr.dtype), mask, latent_scale=vae_scale_factor(backbone.vae))
                total += (pred.float() - eps_b.float()).square().flatten(1).mean(1).double().cpu()
            out += (total / len(noises)).tolist()
    return out


# =========================================================================================================
# Images and features
# =========================================================================================================
def generation_jobs(members: Sequence[Example], spec: PrivacySpec) -> list[tuple[int, int]]:
    """(member index, seed) of every generated image: ``per_member`` seeds per member, from its pixel hash."""
    return [(i, derive_seed(spec.seed, "privacy-gen", e.pixel_hash, k, bits=31))
            for i, e in enumerate(members) for k in range(int(spec.per_member))]


def sample_images(backbone: Any, prompts: Sequence[str], seeds: Sequence[int], *, steps: int, guidance: float,
                  batch_size: int = 16, autocast: Callable[[], Any] | None = None) -> "torch.Tensor":
    """Images in [-1, 1] ([N, 3, R, R]) from the backbone as it is (adapters active or not), each from its own
    seed's noise as the generator draws it, DPM-Solver++(2M) with CFG against the "" prompt."""
    import torch

    from .pixart import decode, encode_text, initial_noise, latent_shape, sample_latents

    bb = backbone
    shape = (1,) + latent_shape(bb, 1, int(bb.resolution))[1:]
    dev, out = bb.transformer.device, []
    with torch.no_grad(), _eval_mode(bb), (autocast or contextlib.nullcontext)():
        for j in range(0, len(prompts), int(batch_size)):
            ps, ss = list(prompts[j:j + batch_size]), list(seeds[j:j + batch_size])
            emb, mask = encode_text(bb, ps)
            neg, nmask = encode_text(bb, [""] * len(ps))
            noise = torch.cat([initial_noise(shape, torch.Generator("cpu").manual_seed(int(s))) for s in ss])
            lat = sample_latents(bb, emb.to(bb.transformer.dtype), mask, neg.to(bb.transformer.dtype), nmask,
                                 steps=int(steps), guidance=float(guidance), latents=noise.to(dev))
            out.append(decode(bb.vae, lat).float().clamp(-1, 1).cpu())
    return torch.cat(out) if out else torch.zeros(0, 3, int(bb.resolution), int(bb.resolution))


def to_uint8_images(images: "torch.Tensor", size: int) -> "torch.Tensor":
    """[-1, 1] images through the one preparation real images go through (PNG rounding, then S×S)."""
    from .extractors import images_to_uint8
    from .pixart import to_pil

    return images_to_uint8(to_pil(images), size)


def real_uint8(examples: Sequence[Example], size: int) -> "torch.Tensor":
    from .evaluate import load_images
    from .extractors import images_to_uint8

    return images_to_uint8(load_images([e.path for e in examples]), size)


def make_extractors(ws: Workspace, store: Any, spec: PrivacySpec, *, log: Callable[[str], None] = lambda m: None
                    ) -> tuple[dict[str, Any], dict[str, str]]:
    """The feature extractors of ``spec`` ({space: Extractor}) and the ones not used, with why."""
    extractors: dict[str, Any] = {}
    absent: dict[str, str] = {}
    if spec.extractor == "domain":
        if not spec.extractor_dataset:
            raise ConfigError("The domain extractor needs a labelled dataset to learn (extractor_dataset, "
                              "--extractor-dataset); or use extractor 'none' (pixels only).")
        from .evaluate import domain_extractor

        extractors["domain"] = domain_extractor(ws, store, spec.extractor_dataset, size=spec.size, seed=spec.seed,
                                                epochs=spec.extractor_epochs)
    if spec.dinov2:
        from .extractors import Dinov2Extractor

        source = _dinov2_source(spec.dinov2)
        try:
            if source is None:
                raise NotFoundError(f"No DINOv2 weights: set $MEDART_DINOV2 (a Hub id or folder) or put "
                                    f"{DINOV2_DEFAULT} in the Hugging Face cache.")
            extractors["dinov2"] = Dinov2Extractor(source)
        except MedArtError as e:
            absent["dinov2"] = str(e).split(". ")[0].rstrip(".") + "."
            log(f"dinov2: not used ({absent['dinov2']})")
    return extractors, absent


def _dinov2_source(setting: str | None) -> str | None:
    """The DINOv2 weights ``setting`` names; "auto" only what is already here ($MEDART_DINOV2, else the Hub
    cache's copy of the default model), so a privacy report never starts a download."""
    if setting != "auto":
        return setting
    if os.environ.get("MEDART_DINOV2"):
        return os.environ["MEDART_DINOV2"]
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(DINOV2_DEFAULT, "config.json")
    except Exception:  # noqa: BLE001 - an unreadable cache means "not here"
        return None
    return DINOV2_DEFAULT if isinstance(hit, str) else None


@dataclass
class RealSet:
    """Members and held-out images, in every space, computed once per report or curve."""

    members: list[Example]
    held_out: list[Example]
    spaces: dict[str, tuple["torch.Tensor", "torch.Tensor"]]    # space -> (members, held-out) features/pixels
    member_u8: "torch.Tensor"                                     # [M, 3, S, S] for the pairs picture


def real_set(members: Sequence[Example], held_out: Sequence[Example], extractors: dict[str, Any],
             spec: PrivacySpec, *, backbone: Any = None) -> RealSet:
    """Members and held-out images in every space. With ``spec.round_trip`` and a ``backbone``, each real image
    is first passed through its VAE (encode, decode): a generated image can only be as close to a training
    image as the decoder reproduces it (the demo VAE alone costs 0.05-0.13 RMS at 32 px, while near-duplicate
    photographs lie 0.03 apart), so a threshold calibrated on raw pixels would be out of reach of even a
    perfect copy. In the decoder's space a perfect copy lies at ~0 and held-out images keep their distances."""
    if not members or not held_out:
        raise ConfigError(f"A privacy report needs members (training images) and held-out images; got "
                          f"{len(members)} and {len(held_out)}.")
    if spec.round_trip and backbone is not None:
        m_img, h_img = _round_trip(backbone, members, spec), _round_trip(backbone, held_out, spec)
        m_u8, h_u8 = to_uint8_images(m_img, spec.size), to_uint8_images(h_img, spec.size)
        pix = (_pixels(to_uint8_images(m_img, spec.pixel_size)), _pixels(to_uint8_images(h_img, spec.pixel_size)))
    else:
        m_u8, h_u8 = real_uint8(members, spec.size), real_uint8(held_out, spec.size)
        pix = (_pixels(real_uint8(members, spec.pixel_size)), _pixels(real_uint8(held_out, spec.pixel_size)))
    spaces = {name: (ex.features(m_u8), ex.features(h_u8)) for name, ex in extractors.items()}
    spaces["pixel"] = pix
    # The pairs picture shows the training images themselves, not their reconstructions.
    return RealSet(list(members), list(held_out), spaces, real_uint8(members, spec.size))


def _round_trip(backbone: Any, examples: Sequence[Example], spec: PrivacySpec) -> "torch.Tensor":
    """[-1, 1] images of the examples' centre crops after the backbone's VAE (posterior mean, decoded)."""
    import torch

    from .examples import load_pixels
    from .pixart import decode, encode_latents

    res, out = int(backbone.resolution), []
    with torch.no_grad(), _eval_mode(backbone):
        for j in range(0, len(examples), int(spec.batch_size)):
            px = torch.stack([load_pixels(e.path, res, crop="center") for e in examples[j:j + int(spec.batch_size)]])
            out.append(decode(backbone.vae, encode_latents(backbone.vae, px, sample=False)).float().clamp(-1, 1).cpu())
    return torch.cat(out)


def _pixels(u8: "torch.Tensor") -> "torch.Tensor":
    return u8.double().flatten(1) / 255.0


def primary_space(spec: PrivacySpec, spaces: Sequence[str]) -> str:
    if spec.primary != "auto":
        if spec.primary not in spaces:
            raise ConfigError(f"primary space {spec.primary!r} was not measured (measured: {list(spaces)}).")
        return spec.primary
    return "dinov2" if "dinov2" in spaces else "pixel"


# =========================================================================================================
# The gauge on a backbone in memory (what a report and a trainer both call)
# =========================================================================================================
def copy_gauge(backbone: Any, real: RealSet, extractors: dict[str, Any], spec: PrivacySpec, *,
               autocast: Callable[[], Any] | None = None) -> tuple[dict[str, Any], "torch.Tensor"]:
    """Generate ``per_member`` images per member caption and detect copies in every space; returns the copy
    section of a report and the generated images as uint8 [N, 3, S, S]."""
    jobs = generation_jobs(real.members, spec)
    fake = sample_images(backbone, [real.members[i].text for i, _ in jobs], [s for _, s in jobs],
                         steps=spec.steps, guidance=spec.guidance, batch_size=spec.batch_size, autocast=autocast)
    f_u8 = to_uint8_images(fake, spec.size)
    spaces: dict[str, Any] = {}
    for name, ex in extractors.items():
        spaces[name] = copy_detection(ex.features(f_u8), *real.spaces[name], metric="cosine",
                                      quantile=spec.quantile, top_k=spec.top_k)
    spaces["pixel"] = copy_detection(_pixels(to_uint8_images(fake, spec.pixel_size)), *real.spaces["pixel"],
                                     metric="rms", quantile=spec.quantile, top_k=spec.top_k)
    primary = primary_space(spec, list(spaces))
    head = spaces[primary]
    section = {"primary": primary, "copy_rate": head["copy_rate"], "copy_rate_ci": head["copy_rate_ci"],
               "threshold": head["threshold"], "n_generated": len(jobs),
               "generated": [{"member": real.members[i].key, "seed": s} for i, s in jobs], "spaces": spaces}
    return section, f_u8


def membership_gauge(backbone: Any, members: Sequence[Example], non_members: Sequence[Example], spec: PrivacySpec,
                     *, autocast: Callable[[], Any] | None = None) -> dict[str, Any]:
    """The loss attack's section of a report: AUC with its interval and every image's loss."""
    lm = denoising_losses(backbone, members, spec, autocast=autocast)
    ln = denoising_losses(backbone, non_members, spec, autocast=autocast)
    return {**membership_auc(lm, ln, n_boot=spec.n_boot, seed=spec.seed),
            "timesteps": list(spec.timesteps), "noise_draws": spec.noise_draws,
            "noise": f"derive_seed({spec.seed}, 'privacy-mia-noise', timestep index, draw)",
            "member_losses": lm, "non_member_losses": ln}


def validation_copy_rate(backbone: Any, members: Sequence[Example], held_out: Sequence[Example], *,
                         spec: PrivacySpec | None = None, extractors: dict[str, Any] | None = None,
                         autocast: Callable[[], Any] | None = None) -> float:
    """The copy rate (headline space) of a backbone in memory, e.g. a run's at validation, so a trainer can
    stop when it exceeds ``--stop-if-copy-rate``. Pixels only unless ``extractors`` are given; the modules'
    training flags are left as they were."""
    spec = spec or PrivacySpec(extractor="none", dinov2=None)
    exs = extractors or {}
    real = real_set(members, held_out, exs, spec, backbone=backbone)
    section, _ = copy_gauge(backbone, real, exs, spec, autocast=autocast)
    return float(section["copy_rate"])


# =========================================================================================================
# Reports of checkpoints, saved under W/privacy/
# =========================================================================================================
def privacy_dir(ws: Workspace) -> Path:
    return ws.root / "privacy"


def _digest(items: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for e in items:
        h.update(f"{e.key}\t{e.pixel_hash}\t{e.text}\n".encode())
    return h.hexdigest()


def pairs_image(generated_u8: "torch.Tensor", training_u8: "torch.Tensor", pairs: Sequence[dict[str, Any]], *,
                cell: int = 96, title: str = "") -> Any:
    """The closest pairs as one picture: per row the generated image | its nearest training image, labelled
    with the distance (red when flagged as a copy)."""
    from PIL import Image, ImageDraw

    from .extractors import prepare_image
    from .pixart import to_pil

    def pil(u8: "torch.Tensor") -> Any:
        return prepare_image(to_pil(u8[None].float() / 127.5 - 1.0)[0], cell)

    head, label_w = 18, 150
    canvas = Image.new("RGB", (label_w + 2 * cell + 8, head + len(pairs) * (cell + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 3), title or "generated | nearest training image", fill="black")
    for r, p in enumerate(pairs):
        y = head + r * (cell + 4)
        canvas.paste(pil(generated_u8[p["generated"]]), (label_w, y))
        canvas.paste(pil(training_u8[p["training"]]), (label_w + cell + 8, y))
        draw.text((4, y + 4), f"gen {p['generated']} / train {p['training']}\nd = {p['distance']:.4f}"
                  + ("\nCOPY" if p.get("copy") else ""), fill=(200, 0, 0) if p.get("copy") else (0, 0, 0))
    return canvas


def measure_backbone(backbone: Any, real: RealSet, non_members: Sequence[Example], extractors: dict[str, Any],
                     spec: PrivacySpec, *, autocast: Callable[[], Any] | None = None
                     ) -> tuple[dict[str, Any], "torch.Tensor"]:
    """Both sections (copies and membership) of one backbone state, and the generated uint8 images."""
    t0 = time.perf_counter()
    copies, fake_u8 = copy_gauge(backbone, real, extractors, spec, autocast=autocast)
    t1 = time.perf_counter()
    mia = membership_gauge(backbone, real.members, non_members, spec, autocast=autocast)
    return {"copy": copies, "membership": mia,
            "timings": {"copy_s": round(t1 - t0, 3), "membership_s": round(time.perf_counter() - t1, 3)}}, fake_u8


def privacy_report(ws: Workspace, store: Any, checkpoint_ref: str, members: Sequence[Example],
                   non_members: Sequence[Example], *, spec: PrivacySpec | None = None, backbone: str | None = None,
                   extractors: tuple[dict[str, Any], dict[str, str]] | None = None, real: RealSet | None = None,
                   save: bool = True, log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """The privacy report of one checkpoint ("base", "RUN" or "RUN@STEP"): copies of ``members`` among images
    generated from their captions (threshold calibrated on ``non_members``) and the loss attack's AUC of
    ``members`` against ``non_members``. Saved as ``W/privacy/<id>.json`` with ``<id>-pairs.png``."""
    from .evaluate import checkpoint_sha256
    from .generate import default_backbone, get_generator

    spec = spec or PrivacySpec()
    exs, absent = extractors if extractors is not None else make_extractors(ws, store, spec, log=log)
    spec_bb = backbone or default_backbone(ws, checkpoint_ref)
    gen = get_generator(ws, spec_bb, spec.precision)
    with gen.lock:
        ck = gen.use(checkpoint_ref)
        # The VAE carries no adapters: one reconstruction of the real images serves every checkpoint.
        real = real or real_set(members, non_members, exs, spec, backbone=gen.backbone)
        ref = ck.ref if ck is not None else "base"
        body, fake_u8 = measure_backbone(gen.backbone, real, non_members, exs, spec, autocast=gen.autocast)
    report = {
        "format": PRIVACY_FORMAT, "checkpoint": ref, "checkpoint_sha256": checkpoint_sha256(ws, ref),
        "step": _ref_step(ref), "weights": ref.partition(":")[2] or "raw", "backbone": spec_bb,
        "random_weights": bool(gen.is_random), "precision": gen.precision, "spec": spec.to_dict(),
        "members": {"n": len(real.members), "sha256": _digest(real.members), "keys": [e.key for e in real.members]},
        "non_members": {"n": len(non_members), "sha256": _digest(non_members), "keys": [e.key for e in non_members]},
        "extractors": {n: ex.describe() for n, ex in exs.items()}, "extractors_absent": absent,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **body,
    }
    c, m = report["copy"], report["membership"]
    log(f"{ref}: copy rate {c['copy_rate']:.3f} {_ci(c['copy_rate_ci'])} ({c['primary']}), "
        f"attack AUC {m['auc']:.3f} {_ci(m['auc_ci'])}")
    if save:
        save_report(ws, report, pairs_picture=pairs_image(fake_u8, real.member_u8, c["spaces"][c["primary"]]["top_pairs"],
                                                          title=f"{ref}: generated | nearest training image"))
    return report


def _ci(ci: Sequence[float]) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def save_report(ws: Workspace, report: dict[str, Any], *, pairs_picture: Any = None) -> Path:
    """``W/privacy/<id>.json`` (atomic), and its pairs picture beside it; the id is set in the report."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    tag = hashlib.sha256(json.dumps([report["checkpoint"], report["created_at"], time.perf_counter()]).encode())
    rid = report.get("id") or f"{stamp}-{report['checkpoint'].replace('@', '-')}-{tag.hexdigest()[:6]}"
    validate_name(rid, "privacy report id")
    folder = privacy_dir(ws)
    folder.mkdir(parents=True, exist_ok=True)
    report["id"] = rid
    if pairs_picture is not None:
        png = folder / f"{rid}-pairs.png"
        atomic_write(png, lambda f: pairs_picture.save(f, format="PNG"), binary=True)
        report["pairs_image"] = str(png)
    path = folder / f"{rid}.json"
    atomic_write_text(path, json.dumps(report, indent=1, sort_keys=True))
    return path


def load_reports(ws: Workspace) -> list[dict[str, Any]]:
    """Every saved report (curves excluded), oldest first."""
    out = []
    d = privacy_dir(ws)
    for p in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            r = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(r, dict) and "checkpoint" in r:
            out.append(r)
    return out


def privacy_curve(ws: Workspace, store: Any, run: str, members: Sequence[Example], non_members: Sequence[Example],
                  *, spec: PrivacySpec | None = None, include_base: bool = True, backbone: str | None = None,
                  log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """One report per checkpoint step of ``run`` (the base first when ``include_base``): how copying and
    membership leakage grow with training. Saved as ``W/privacy/curve-<run>-<time>.json``."""
    from .checkpoint import checkpoint_step, list_checkpoints

    validate_name(run, "run name")
    if not ws.run_dir(run).is_dir():
        raise NotFoundError(f"No run {run!r} in {ws.runs_dir}.")
    steps = [checkpoint_step(p) for p in list_checkpoints(ws.run_dir(run))]
    if not steps:
        raise NotFoundError(f"Run {run!r} has no complete checkpoint yet.")
    spec = spec or PrivacySpec()
    exs = make_extractors(ws, store, spec, log=log)
    bb = backbone or _run_backbone(ws, run)
    real = real_set(members, non_members, exs[0], spec, backbone=reference_backbone(ws, bb, spec))
    refs = (["base"] if include_base else []) + [f"{run}@{s}" for s in steps]
    points = [privacy_report(ws, store, r, members, non_members, spec=spec, backbone=bb, extractors=exs,
                             real=real, log=log) for r in refs]
    curve = {"format": PRIVACY_FORMAT, "run": run, "backbone": bb, "spec": spec.to_dict(),
             "points": [{"checkpoint": p["checkpoint"], "step": p["step"], "report": p["id"],
                         "copy_rate": p["copy"]["copy_rate"], "copy_rate_ci": p["copy"]["copy_rate_ci"],
                         "auc": p["membership"]["auc"], "auc_ci": p["membership"]["auc_ci"]} for p in points],
             "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = privacy_dir(ws) / f"curve-{run}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"
    atomic_write_text(path, json.dumps(curve, indent=1, sort_keys=True))
    curve["path"] = str(path)
    return curve


def reference_backbone(ws: Workspace, backbone: str, spec: PrivacySpec) -> Any:
    """The shared generator's backbone of ``backbone`` (its VAE makes the round trip of real images)."""
    from .generate import get_generator

    return get_generator(ws, backbone, spec.precision).backbone


def _run_backbone(ws: Workspace, run: str) -> str:
    from .generate import default_backbone

    return default_backbone(ws, run)


# =========================================================================================================
# Who is a member: a dataset's images, a seeded split, a run's own training set
# =========================================================================================================
def dataset_examples(ws: Workspace, store: Any, dataset: str, *, captions: str = "latest") -> list[Example]:
    """The captioned images of ``dataset`` as examples (``captions``: "approved" or "latest"), by image id."""
    validate_name(dataset, "dataset name")
    if not store.has_dataset(dataset):
        raise NotFoundError(f"No dataset {dataset!r} in this workspace.")
    states = {s.image_id: s for s in store.states(dataset, status="approved" if captions == "approved" else None)
              if s.text and s.text.strip()}
    return [Example(key=f"img-{r.id}", path=ws.image_path(dataset, r.file_name), text=states[r.id].text,
                    caption_version=str(states[r.id].caption_version), pixel_hash=r.pixel_hash, label=r.label)
            for r in sorted(store.list_images(dataset), key=lambda r: r.id) if r.id in states]


def split_members(examples: Sequence[Example], n_members: int, *, seed: int = 0
                  ) -> tuple[list[Example], list[Example]]:
    """A seeded split into ``n_members`` members and the rest, stratified by class (members and non-members
    from one distribution, as the attack's 0.5 baseline needs)."""
    import torch

    if not 0 < n_members < len(examples):
        raise ConfigError(f"n_members must be in 1..{len(examples) - 1}, got {n_members}.")
    by_label: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        by_label.setdefault(e.label, []).append(i)
    ranked: list[tuple[float, str, int]] = []
    for label, idx in sorted(by_label.items()):
        perm = torch.randperm(len(idx), generator=torch.Generator().manual_seed(
            derive_seed(seed, "privacy-split", label))).tolist()
        # Rank within the class as a fraction, so taking the first n interleaves the classes proportionally.
        ranked += [((rank + 0.5) / len(idx), examples[idx[i]].key, idx[i]) for rank, i in enumerate(perm)]
    chosen = {i for _, _, i in sorted(ranked)[:n_members]}
    return ([e for i, e in enumerate(examples) if i in chosen], [e for i, e in enumerate(examples) if i not in chosen])


def run_split(ws: Workspace, store: Any, run: str) -> tuple[list[Example], list[Example]]:
    """The images run ``run`` trained on (members) and the ones it held out for validation, rebuilt from its
    saved config exactly as the trainer split them (with the captions it trained with)."""
    from .examples import collect_examples, split_holdout
    from .train_config import load_run_config

    cfg = load_run_config(ws.run_layout(run).config)
    pool, explicit = collect_examples(ws, store, cfg)
    return split_holdout(pool, explicit, int(cfg.val_images), cfg.seed)


# =========================================================================================================
# CLI pair (registered by the CLI's owner): python -m medart_core privacy --checkpoint REF --dataset D ...
# =========================================================================================================
def _ref_step(ref: str) -> int:
    """The step of ``RUN@STEP`` or ``RUN@STEP:ema`` (0 for the base)."""
    head = ref.partition(":")[0]
    return int(head.rpartition("@")[2]) if "@" in head else 0


def _cli_sets(ws: Workspace, store: Any, args: argparse.Namespace, run: str | None
              ) -> tuple[list[Example], list[Example], str | None]:
    if args.dataset:
        members = dataset_examples(ws, store, args.dataset, captions=args.captions)
        if args.members:
            members, rest = split_members(members, args.members, seed=args.seed)
        else:
            rest = []
        home = args.dataset
    elif run is not None:
        from .train_config import load_run_config

        members, rest = run_split(ws, store, run)
        home = load_run_config(ws.run_layout(run).config).dataset
    else:
        raise ConfigError("Name the members: --dataset D (the base model has no training set of its own).")
    held = dataset_examples(ws, store, args.held_out, captions=args.captions) if args.held_out else rest
    if not held:
        raise ConfigError("No held-out images: pass --held-out H (a dataset never trained on) or --members N.")
    return members, held, home


def cmd_privacy(args: argparse.Namespace) -> int:
    """``python -m medart_core privacy``: a report of one checkpoint, or with --curve of a run's checkpoints."""
    from .captions import CaptionStore

    ws = Workspace.open(args.workspace)
    store = CaptionStore.for_workspace(ws)
    run = None if args.checkpoint == "base" else args.checkpoint.partition("@")[0]
    members, held, home = _cli_sets(ws, store, args, run)
    spec = PrivacySpec(seed=args.seed, per_member=args.per_member, steps=args.steps, guidance=args.guidance,
                       quantile=args.quantile, extractor="none" if args.no_features else "domain",
                       extractor_dataset=args.extractor_dataset or home)
    say = (lambda m: None) if args.json else (lambda m: print(m, flush=True))
    if args.curve:
        if run is None:
            raise ConfigError("--curve needs a run: --checkpoint RUN.")
        out = privacy_curve(ws, store, run, members, held, spec=spec, backbone=args.backbone, log=say)
        if args.json:
            print(json.dumps(out, sort_keys=True))
        return 0
    rep = privacy_report(ws, store, args.checkpoint, members, held, spec=spec, backbone=args.backbone, log=say)
    if args.json:
        print(json.dumps(rep, sort_keys=True))
    else:
        print(f"report: {privacy_dir(ws) / (rep['id'] + '.json')}; closest pairs: {rep.get('pairs_image')}")
    return 0


__all__ = ["PrivacySpec", "nearest", "calibrated_threshold", "copy_detection", "membership_auc", "denoising_losses",
           "sample_images", "make_extractors", "real_set", "copy_gauge", "membership_gauge", "validation_copy_rate",
           "privacy_report", "privacy_curve", "save_report", "load_reports", "pairs_image", "dataset_examples",
           "split_members", "run_split", "cmd_privacy"]
