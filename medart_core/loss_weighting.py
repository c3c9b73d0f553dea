"""Per-timestep loss weights for the latent diffusion loss: min-SNR-γ (issue 19 §4).

Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy": with
``SNR(t) = ᾱ_t / (1 - ᾱ_t)``, the x₀-prediction loss is weighted by ``min(SNR, γ)``; for the same objective
written as an ε-prediction MSE that is ``min(SNR, γ) / SNR`` and as a v-prediction MSE
``min(SNR, γ) / (SNR + 1)`` (their §3.4, the form diffusers' training examples use). Off by default in the
trainer: the Med-Art paper trains with the plain ε MSE.

Kept apart from ``hldf.py`` because it is a property of the noise schedule, not of the HLDF objective, and
the trainer applies it to whichever latent loss it runs.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def schedule_alphas_cumprod(scheduler: Any) -> torch.Tensor:
    """``ᾱ_t`` (float32, CPU) from a diffusers scheduler (its ``alphas_cumprod``), a scheduler config
    mapping (built as ``sampling.alphas_cumprod`` builds it) or a tensor of ``ᾱ_t`` itself."""
    import torch

    if torch.is_tensor(scheduler):
        acp = scheduler
    elif getattr(scheduler, "alphas_cumprod", None) is not None:
        acp = torch.as_tensor(scheduler.alphas_cumprod)
    elif isinstance(scheduler, Mapping):
        from .sampling import alphas_cumprod

        acp = alphas_cumprod(scheduler)
    else:
        raise ConfigError(f"Cannot read alphas_cumprod from {type(scheduler).__name__}; pass a diffusers DDPM "
                          "scheduler, its config, or the alphas_cumprod tensor.")
    return acp.detach().to("cpu", torch.float32)


def snr(timesteps: torch.Tensor, scheduler: Any) -> torch.Tensor:
    """``SNR(t) = ᾱ_t / (1 - ᾱ_t)`` for integer ``timesteps`` (float32, on the timesteps' device)."""
    import torch

    acp = schedule_alphas_cumprod(scheduler)
    t = torch.as_tensor(timesteps).long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= acp.shape[0]):
        raise ConfigError(f"Timesteps must be in [0, {acp.shape[0] - 1}], got {int(t.min())}..{int(t.max())}.")
    a = acp[t.cpu()].to(torch.float64)     # 1 - ᾱ cancels near t = 0: divide in float64, return float32
    return (a / (1.0 - a)).to(device=t.device, dtype=torch.float32)


def min_snr_weights(timesteps: torch.Tensor, scheduler: Any, gamma: float,
                    prediction_type: str = "epsilon") -> torch.Tensor:
    """Min-SNR-γ weights, one per timestep (multiply the per-sample MSE by them, then average).

    ``gamma`` is the paper's γ (5 in their experiments). Where ``SNR = 0`` (a zero-terminal-SNR schedule's
    last step) the ε weight is its limit 1, not 0/0.
    """
    import torch

    if not float(gamma) > 0.0:
        raise ConfigError(f"snr_gamma must be > 0 (the paper uses 5), got {gamma}.")
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"prediction_type {prediction_type!r} is not one of {list(PREDICTION_TYPES)}.")
    s = snr(timesteps, scheduler)
    clipped = torch.clamp(s, max=float(gamma))
    if prediction_type == "sample":
        return clipped
    if prediction_type == "v_prediction":
        return clipped / (s + 1.0)
    return torch.where(s > 0, clipped / torch.where(s > 0, s, torch.ones_like(s)), torch.ones_like(s))
