"""The DPM-Solver++ schedule and solver as pure functions: the maths visible, no state kept between calls,
no scheduler mutated (k-diffusion style). PixArt's parts are plugged in by ``pixart.py``.

The one sampler PixArt-α needs is DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095), written here to
reproduce diffusers' ``DPMSolverMultistepScheduler`` with PixArt's config step for step (dpmsolver++,
order 2, midpoint, lower_order_final, final sigma 0, ε-prediction). Unlike the scheduler object it is
differentiable end to end, which HLDF's pixel-level loss needs (gradients through all sampling steps).

Notation follows the scheduler: for a DDPM step t with cumulative ᾱ_t, ``sigma = sqrt((1-ᾱ)/ᾱ)`` (the
variance-exploding sigma), ``alpha_t = 1/sqrt(1+sigma²)``, ``sigma_t = sigma·alpha_t`` and the half
log-SNR ``lambda = log(alpha_t) - log(sigma_t)``.

torch / numpy are imported inside functions: the CLI imports this module at start-up.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

GradMode = Literal["none", "full", "truncated"]
Denoiser = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]
# callback(i, n, x): called after solver step i of n with the new latents (progress bars, previews).
StepCallback = Callable[[int, int, "torch.Tensor"], None]

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


def alphas_cumprod(config: Mapping[str, Any]) -> torch.Tensor:
    """ᾱ_t of the DDPM training schedule described by a scheduler config (float32, as diffusers builds it)."""
    import torch

    n = int(config.get("num_train_timesteps", 1000))
    b0, b1 = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
    kind = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config.get("trained_betas"), dtype=torch.float32)
    elif kind == "linear":
        betas = torch.linspace(b0, b1, n, dtype=torch.float32)
    elif kind == "scaled_linear":
        betas = torch.linspace(b0**0.5, b1**0.5, n, dtype=torch.float32) ** 2
    else:
        raise ConfigError(f"beta_schedule {kind!r} is not supported; use 'linear' (PixArt-α) or 'scaled_linear'.")
    if config.get("rescale_betas_zero_snr", False):
        raise ConfigError("rescale_betas_zero_snr is not supported by the differentiable sampler; turn it off.")
    return torch.cumprod(1.0 - betas, dim=0)


def dpm_schedule(config: Mapping[str, Any], steps: int) -> Schedule:
    """Timesteps and sigmas for ``steps`` DPM-Solver++ steps, identical to ``scheduler.set_timesteps(steps)``.

    ``config`` is a scheduler config (``scheduler.config`` or a dict). Karras/Lu/exponential/beta sigmas,
    flow sigmas and lambda clipping are refused with a ConfigError: PixArt-α uses none of them.
    """
    import numpy as np
    import torch

    if steps < 1:
        raise ConfigError(f"sampling steps must be >= 1, got {steps}.")
    for key, want in _REQUIRED.items():
        got = config.get(key, want)
        if got != want:
            raise ConfigError(f"scheduler {key}={got!r} is not supported by the differentiable sampler "
                              f"(needs {want!r}, the PixArt-α setting).")
    for flag in ("use_karras_sigmas", "use_lu_lambdas", "use_exponential_sigmas", "use_beta_sigmas",
                 "use_flow_sigmas", "thresholding", "use_dynamic_shifting"):
        if config.get(flag, False):
            raise ConfigError(f"scheduler option {flag}=True is not supported by the differentiable sampler.")
    lmc = config.get("lambda_min_clipped", -math.inf)
    if lmc is not None and lmc != -math.inf:
        raise ConfigError("lambda_min_clipped is not supported by the differentiable sampler; leave it at -inf.")
    final = config.get("final_sigmas_type", "zero")

    acp = alphas_cumprod(config)
    n = acp.shape[0]
    spacing = config.get("timestep_spacing", "linspace")
    offset = int(config.get("steps_offset", 0) or 0)
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


def final_step_first_order(config: Mapping[str, Any], steps: int) -> bool:
    """Whether the scheduler takes its last step at first order (diffusers' ``lower_order_final`` rule)."""
    return bool(config.get("euler_at_final", False)
                or (config.get("lower_order_final", True) and steps < 15)
                or config.get("final_sigmas_type", "zero") == "zero")


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
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M), multistep second order, midpoint (Lu et al. 2022, arXiv 2211.01095, Alg. 2).

    ``denoiser(x, t) -> eps`` returns the (already guided) ε prediction for the current latents at DDPM
    timestep tensor ``t``. Steps ``i < grad_from_step`` run under ``torch.no_grad`` (truncated backprop);
    ``checkpoint`` wraps each model call in non-reentrant activation checkpointing so only the step
    inputs are kept for the backward pass. ``final_first_order`` makes the last step first order (always
    the case when the final sigma is 0, see :func:`final_step_first_order`). ``callback(i, n, x)`` sees the
    latents after each step (it must not change them). Pure: nothing outside the returned tensor is changed.
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
            # The solver's arithmetic is float32 even when the model computes in bf16 (diffusers upcasts the
            # sample for the update too); a float32 model output passes through unchanged.
            eps = eps.to(torch.float32)
            x32 = x.to(torch.float32)
            alpha_s0, sigma_s0, lambda_s0 = _alpha_sigma_lambda(sigmas[i])
            alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(sigmas[i + 1])
            # Data prediction x0 = (x - σ ε)/α: DPM-Solver++ integrates the data model, not the noise model.
            x0 = (x32 - sigma_s0.to(x.device) * eps) / alpha_s0.to(x.device)
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
        if callback is not None:
            callback(i, n, x)
    return x
