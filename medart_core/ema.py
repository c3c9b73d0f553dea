"""EMA and post-hoc EMA of the trainable adapter weights (issue 19 §1), as building blocks for the trainer.

Two averages, both over a mapping ``name -> parameter`` of the trainable (LoRA/DoRA) weights, kept in fp32
and updated under ``torch.no_grad()`` after every optimiser step:

- :class:`EMA`: the classic exponential moving average with diffusers' warm-up,
  ``decay_t = min(decay, (1 + t) / (10 + t))`` for the ``t``-th update (0-based), so the first updates
  follow the weights closely and the average does not stay stuck near the random/zero initialisation.
- :class:`PostHocEMA`: Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
  Models" (EDM2), §3: two power-function EMA profiles (relative std ``σ_rel`` 0.05 and 0.10 by default)
  written as periodic snapshots, from which :func:`reconstruct` builds the EMA of any other length after
  training, by least squares over the snapshots' averaging profiles (EDM2 §3.2 and Appendix C.2).

Conventions. ``update(params, step)`` takes ``step``, the 0-based index of the optimiser step just taken
(``train.py``'s ``state.step`` before it is incremented). Snapshot files and :func:`reconstruct` count
steps *done* instead, which is the checkpoint numbering: the snapshot of ``step`` 100 averages the weights
after steps 1..100, like ``checkpoints/step_000100``.

The power-function EMA maths, for the record (EDM2 eq. 1-3). The profile with exponent ``γ`` averages
``θ(τ)`` over ``τ ∈ [0, t]`` with density ``p_t(τ) = (γ+1) τ^γ / t^(γ+1)``; its relative standard deviation
is ``σ_rel = sqrt((γ+1) / ((γ+2)² (γ+3)))``. Updated once per step with ``β_t = (1 - 1/t)^(γ+1)``, the
discrete average gives step ``s`` the weight ``(s^(γ+1) - (s-1)^(γ+1)) / t^(γ+1)``, exactly the integral of
``p_t`` over ``(s-1, s]``; so the continuous inner products used for reconstruction are exact for the
piecewise-constant trajectory of the weights, not an approximation of it.

State is safetensors-compatible tensors plus a small JSON of counters (no pickle), so a checkpoint stores
it beside the optimiser state and an exact resume restores it bitwise.
"""
from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, NotFoundError
from .fileio import atomic_path

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

EMA_FORMAT = 1
POSTHOC_SIGMA_RELS = (0.05, 0.10)     # EDM2's two tracked profiles
_SIGMA_REL_MAX = 12 ** -0.5           # γ = 0, the plain running mean: the longest profile with γ >= 0
SNAPSHOT_GLOB = "phema-*.safetensors"
_SNAPSHOT_KEY = "medart_posthoc_ema"   # safetensors metadata entry: JSON of step, gamma, sigma_rel
_PARTS = {"dit": "transformer", "t5": "text_encoder"}   # as lora.py/checkpoint.py key adapter tensors


# =========================================================================================================
# Which tensors to average
# =========================================================================================================
def trainable_named_parameters(module: Any) -> dict[str, torch.nn.Parameter]:
    """``module``'s parameters with ``requires_grad`` (the LoRA/DoRA matrices once LoRA is attached),
    keyed by their ``named_parameters`` names."""
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def adapter_parameters(backbone: Any) -> dict[str, torch.nn.Parameter]:
    """The live trainable parameters of a LoRA'd backbone, keyed as ``checkpoint.adapter_tensors`` keys
    them (``"dit::<peft key>"``, ``"t5::<peft key>"``), so an EMA of them loads with
    ``checkpoint.load_adapter_tensors(backbone, ema.averaged())``.

    peft's state-dict keys drop the adapter name in ways that differ between LoRA and DoRA
    (``lora_A.default.weight`` -> ``lora_A.weight`` but ``lora_magnitude_vector.default.weight`` ->
    ``lora_magnitude_vector``), so the keys are matched to parameters by storage, not by rewriting names.
    """
    from peft import get_peft_model_state_dict

    cfgs = backbone.extra.get("peft_configs")
    if not cfgs:
        raise ConfigError("This backbone has no LoRA attached; call attach_lora(backbone, cfg) first.")
    out: dict[str, torch.nn.Parameter] = {}
    for part in cfgs:
        model = getattr(backbone, _PARTS[part])
        live = trainable_named_parameters(model)
        by_storage = {(p.data_ptr(), tuple(p.shape)): p for p in live.values()}
        found = 0
        for key, tensor in get_peft_model_state_dict(model).items():
            p = by_storage.get((tensor.data_ptr(), tuple(tensor.shape)))
            if p is None:
                raise ConfigError(f"Adapter tensor {part}::{key} is not a trainable parameter of the "
                                  f"{_PARTS[part]}; was it frozen after attach_lora?")
            out[f"{part}::{key}"] = p
            found += 1
        if found != len(live):
            raise ConfigError(f"The {_PARTS[part]} has {len(live)} trainable parameters but {found} adapter "
                              "tensors; only LoRA weights may be trainable when averaging them.")
    return out


def _check_names(have: Mapping[str, Any], given: Mapping[str, Any], what: str) -> None:
    if set(have) != set(given):
        missing, extra = sorted(set(have) - set(given))[:3], sorted(set(given) - set(have))[:3]
        raise ConfigError(f"{what}: the tensors do not match the averaged ones (missing e.g. {missing}, "
                          f"unexpected e.g. {extra}); build the EMA from the same trainable parameters.")


def _fp32_copies(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    import torch

    return {n: p.detach().to(torch.float32).clone() for n, p in params.items()}


def _load_tensors(dest: dict[str, torch.Tensor], tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Copy ``tensors`` into ``dest`` (same names, shapes, fp32), keeping ``dest``'s devices."""
    import torch

    _check_names(dest, tensors, what)
    for n, t in tensors.items():
        if t.shape != dest[n].shape or t.dtype != torch.float32:
            raise ConfigError(f"{what}: {n} is {t.dtype} {tuple(t.shape)}, expected float32 "
                              f"{tuple(dest[n].shape)}; the LoRA config differs from the checkpoint's.")
    with torch.no_grad():
        for n, t in tensors.items():
            dest[n].copy_(t)


@contextlib.contextmanager
def _swapped(averaged: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]) -> Iterator[None]:
    import torch

    _check_names(averaged, params, "swap_into")
    raw = {n: p.detach().clone() for n, p in params.items()}   # exact copies: restored bit for bit
    try:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(averaged[n])
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(raw[n])


def _copy_into(averaged: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]) -> None:
    import torch

    _check_names(averaged, params, "copy_to")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(averaged[n])


# =========================================================================================================
# Classic EMA with warm-up
# =========================================================================================================
class EMA:
    """Exponential moving average of named fp32 tensors (see the module docstring for ``step``).

    ``decay`` is the asymptotic decay; with ``warmup`` the ``t``-th update uses
    ``min(decay, (1 + t) / (10 + t))`` (diffusers' ``EMAModel`` with ``use_ema_warmup`` off, i.e. its
    default schedule): 0.1 at the first update, 0.55 at the eleventh, ``decay`` once ``t`` is large.
    The average lives on the parameters' devices.
    """

    def __init__(self, params: Mapping[str, torch.Tensor], decay: float = 0.9999, *, warmup: bool = True):
        if not 0.0 <= float(decay) < 1.0:
            raise ConfigError(f"EMA decay must be in [0, 1), got {decay}; 0.999-0.9999 is usual.")
        if not params:
            raise ConfigError("EMA of no parameters: attach LoRA (or mark parameters trainable) first.")
        self.decay, self.warmup = float(decay), bool(warmup)
        self.shadow = _fp32_copies(params)
        self.num_updates = 0
        self.last_step: int | None = None

    def decay_at(self, step: int) -> float:
        """The decay used by the update of 0-based step ``step``."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + step) / (10.0 + step))

    def update(self, params: Mapping[str, torch.Tensor], step: int) -> float:
        """Fold the current ``params`` into the average; returns the decay used."""
        import torch

        _check_names(self.shadow, params, "EMA.update")
        d = self.decay_at(int(step))
        with torch.no_grad():
            for n, s in self.shadow.items():
                s.lerp_(params[n].detach().to(device=s.device, dtype=torch.float32), 1.0 - d)
        self.num_updates += 1
        self.last_step = int(step)
        return d

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(CPU tensors for a safetensors file, JSON-able counters)."""
        tensors = {n: s.detach().to("cpu").contiguous().clone() for n, s in self.shadow.items()}
        meta = {"format": EMA_FORMAT, "kind": "ema", "decay": self.decay, "warmup": self.warmup,
                "num_updates": self.num_updates, "last_step": self.last_step}
        return tensors, meta

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` bitwise; the decay settings must be this EMA's (a resume with another
        decay would silently average two schedules)."""
        if meta.get("kind") != "ema" or int(meta.get("format", -1)) != EMA_FORMAT:
            raise ConfigError(f"Not an EMA state (kind {meta.get('kind')!r}, format {meta.get('format')!r}).")
        if float(meta["decay"]) != self.decay or bool(meta["warmup"]) != self.warmup:
            raise ConfigError(f"The checkpoint's EMA has decay {meta['decay']} (warm-up {meta['warmup']}) but "
                              f"this run asks for {self.decay} (warm-up {self.warmup}); resume with the same "
                              "EMA settings or start a new run.")
        _load_tensors(self.shadow, tensors, "EMA.load_state_dict")
        self.num_updates = int(meta["num_updates"])
        self.last_step = None if meta["last_step"] is None else int(meta["last_step"])

    def swap_into(self, params: Mapping[str, torch.Tensor]) -> contextlib.AbstractContextManager[None]:
        """``with ema.swap_into(params): ...`` runs the block with the averaged weights in ``params`` and puts
        the raw weights back exactly (bitwise) afterwards, also when the block raises."""
        return _swapped(self.shadow, params)

    def copy_to(self, params: Mapping[str, torch.Tensor]) -> None:
        """Overwrite ``params`` with the averaged weights (for export or evaluation of the EMA alone)."""
        _copy_into(self.shadow, params)

    def averaged(self) -> dict[str, torch.Tensor]:
        """CPU fp32 copies of the averaged weights, keyed like the parameters."""
        return self.state_dict()[0]


# =========================================================================================================
# Power-function EMA profiles (EDM2 §3.1)
# =========================================================================================================
def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent ``γ`` of the power-function profile whose relative std is ``sigma_rel``.

    ``σ_rel² = (γ+1) / ((γ+2)² (γ+3))`` multiplied out is the cubic ``γ³ + 7γ² + (16 - σ⁻²)γ + (12 - σ⁻²)
    = 0``. It has a root just above -1 (a profile piled on the first steps) and the one wanted, the largest.
    """
    import numpy as np

    s = float(sigma_rel)
    if not 0.0 < s < _SIGMA_REL_MAX:
        raise ConfigError(f"EMA relative std sigma_rel must be in (0, {_SIGMA_REL_MAX:.4f}), got {sigma_rel}; "
                          "EDM2 tracks 0.05 and 0.10 and finds the best lengths between about 0.01 and 0.25.")
    inv = s ** -2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    real = roots[np.abs(roots.imag) < 1e-9].real
    gamma = float(real.max())
    if gamma <= 0.0:
        raise ConfigError(f"sigma_rel {sigma_rel} gives no power-function profile with gamma > 0.")
    return gamma


def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative std of the power-function profile ``p(τ) ∝ τ^γ`` (EDM2 eq. 3)."""
    g = float(gamma)
    return math.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


def power_beta(t_prev: int, t: int, gamma: float) -> float:
    """The decay that moves a power-function average from ``t_prev`` steps done to ``t``: ``(t_prev/t)^(γ+1)``
    (``(1 - 1/t)^(γ+1)`` when updated every step; 0 at the first step, so it starts at the weights)."""
    return (float(t_prev) / float(t)) ** (float(gamma) + 1.0)


def _profile_dot(t_a: float, g_a: float, t_b: float, g_b: float) -> float:
    """``∫ p_a(τ) p_b(τ) dτ`` for ``p_x(τ) = (γ_x+1) τ^γ_x / t_x^(γ_x+1)`` on ``[0, t_x]``.

    The integral runs to ``T = min(t_a, t_b)``: ``(γ_a+1)(γ_b+1)/(γ_a+γ_b+1) · T^(γ_a+γ_b+1) /
    (t_a^(γ_a+1) t_b^(γ_b+1))``, written with the ratios ``T/t_x ≤ 1`` so large exponents cannot overflow.
    """
    big_t = min(t_a, t_b)
    scale = (g_a + 1.0) * (g_b + 1.0) / (g_a + g_b + 1.0) / big_t
    return scale * (big_t / t_a) ** (g_a + 1.0) * (big_t / t_b) ** (g_b + 1.0)


def _gram(ts: Sequence[float], gammas: Sequence[float]) -> np.ndarray:
    import numpy as np

    n = len(ts)
    return np.array([[_profile_dot(ts[i], gammas[i], ts[j], gammas[j]) for j in range(n)] for i in range(n)],
                    dtype=np.float64)


def solve_posthoc_coefficients(ts: Sequence[float], gammas: Sequence[float], t_target: float,
                               gamma_target: float) -> np.ndarray:
    """Coefficients ``x`` with ``Σ x_i p_i ≈ p_target`` in L2 over training time (EDM2 Appendix C.2).

    The normal equations ``A x = b``, ``A_ij = <p_i, p_j>``, ``b_i = <p_i, p_target>``, are solved by least
    squares (SVD), which also copes with snapshots whose profiles are (nearly) linearly dependent.
    """
    import numpy as np

    if len(ts) != len(gammas) or not ts:
        raise ConfigError("Post-hoc EMA needs at least one snapshot, each with a step and a gamma.")
    a = _gram(ts, gammas)
    b = np.array([_profile_dot(t, g, t_target, gamma_target) for t, g in zip(ts, gammas)], dtype=np.float64)
    x, *_ = np.linalg.lstsq(a, b, rcond=None)
    return x


def profile_fit_error(ts: Sequence[float], gammas: Sequence[float], coefficients: np.ndarray,
                      t_target: float, gamma_target: float) -> float:
    """Relative L2 error ``||Σ x_i p_i - p_target|| / ||p_target||`` of a reconstruction (0 = exact)."""
    import numpy as np

    x = np.asarray(coefficients, dtype=np.float64)
    b = np.array([_profile_dot(t, g, t_target, gamma_target) for t, g in zip(ts, gammas)], dtype=np.float64)
    rr = _profile_dot(t_target, gamma_target, t_target, gamma_target)
    sq = float(x @ _gram(ts, gammas) @ x - 2.0 * x @ b + rr)
    return math.sqrt(max(sq, 0.0) / rr)


@dataclass(frozen=True)
class Snapshot:
    """One stored power-function EMA: the file, the steps it averages, its profile."""

    path: Path
    step: int            # optimiser steps done (checkpoint numbering)
    gamma: float
    sigma_rel: float


def snapshot_name(step: int, sigma_rel: float) -> str:
    return f"phema-{int(step):09d}-{float(sigma_rel):.4f}.safetensors"


def list_snapshots(folder: str | Path) -> list[Snapshot]:
    """The snapshots in ``folder``, by step then σ_rel (profile read from each file's metadata)."""
    from safetensors import safe_open

    out = []
    for p in sorted(Path(folder).glob(SNAPSHOT_GLOB)):
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        if _SNAPSHOT_KEY not in meta:
            continue   # not one of ours
        info = json.loads(meta[_SNAPSHOT_KEY])
        out.append(Snapshot(path=p, step=int(info["step"]), gamma=float(info["gamma"]),
                            sigma_rel=float(info["sigma_rel"])))
    return sorted(out, key=lambda s: (s.step, s.sigma_rel))


class PostHocEMA:
    """Power-function EMA profiles updated every step and snapshotted every ``snapshot_every`` steps.

    ``update(params, step)`` moves every profile with ``β = (t_prev/t)^(γ+1)`` (``t = step + 1`` steps done)
    and, when ``folder`` is set and ``t`` is a multiple of ``snapshot_every``, writes one snapshot per
    profile (adapter weights only, fp32 safetensors, atomically). Call :meth:`snapshot` at the last step so
    that the end of training can be reconstructed exactly.
    """

    def __init__(self, params: Mapping[str, torch.Tensor], sigma_rels: Sequence[float] = POSTHOC_SIGMA_RELS, *,
                 snapshot_every: int = 0, folder: str | Path | None = None):
        if not params:
            raise ConfigError("Post-hoc EMA of no parameters: attach LoRA first.")
        if not sigma_rels or len(set(float(s) for s in sigma_rels)) != len(sigma_rels):
            raise ConfigError(f"Post-hoc EMA needs distinct sigma_rel values, got {list(sigma_rels)}.")
        if int(snapshot_every) < 0:
            raise ConfigError(f"snapshot_every must be >= 0 (0 = only explicit snapshots), got {snapshot_every}.")
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.profiles = [_fp32_copies(params) for _ in self.sigma_rels]
        self.snapshot_every = int(snapshot_every)
        self.folder = None if folder is None else Path(folder)
        self.t = 0   # optimiser steps folded in so far

    def update(self, params: Mapping[str, torch.Tensor], step: int) -> list[Path]:
        """Fold ``params`` after 0-based step ``step`` into every profile; returns snapshot files written."""
        import torch

        t = int(step) + 1
        if t <= self.t:
            raise ConfigError(f"Post-hoc EMA updated at step {step} after step {self.t - 1}; steps must increase.")
        _check_names(self.profiles[0], params, "PostHocEMA.update")
        with torch.no_grad():
            for prof, g in zip(self.profiles, self.gammas):
                w = 1.0 - power_beta(self.t, t, g)
                for n, s in prof.items():
                    s.lerp_(params[n].detach().to(device=s.device, dtype=torch.float32), w)
        self.t = t
        if self.folder is not None and self.snapshot_every and t % self.snapshot_every == 0:
            return self.snapshot()
        return []

    def snapshot(self, folder: str | Path | None = None) -> list[Path]:
        """Write the current profiles as ``phema-<step>-<σ_rel>.safetensors`` into ``folder`` (default: the
        one given at construction); rewriting a step after a resume replaces it whole."""
        from safetensors.torch import save_file

        dest = Path(folder) if folder is not None else self.folder
        if dest is None:
            raise ConfigError("PostHocEMA.snapshot needs a folder (none was given at construction).")
        if self.t == 0:
            raise ConfigError("Post-hoc EMA has no update yet; snapshot after the first optimiser step.")
        written = []
        for prof, s, g in zip(self.profiles, self.sigma_rels, self.gammas):
            path = dest / snapshot_name(self.t, s)
            info = {"format": EMA_FORMAT, "step": self.t, "gamma": g, "sigma_rel": s}
            # One metadata entry: safetensors writes several in hash order, and a resumed run must rewrite
            # a snapshot byte for byte.
            meta = {_SNAPSHOT_KEY: json.dumps(info, sort_keys=True)}
            tensors = {n: v.detach().to("cpu").contiguous() for n, v in prof.items()}
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp), metadata=meta)
            written.append(path)
        return written

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(CPU tensors ``"<profile index>/<name>"``, JSON-able counters and profiles)."""
        tensors = {f"{i}/{n}": v.detach().to("cpu").contiguous().clone()
                   for i, prof in enumerate(self.profiles) for n, v in prof.items()}
        meta = {"format": EMA_FORMAT, "kind": "posthoc_ema", "sigma_rels": list(self.sigma_rels),
                "gammas": list(self.gammas), "t": self.t, "snapshot_every": self.snapshot_every}
        return tensors, meta

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` bitwise; the tracked profiles must be this object's."""
        if meta.get("kind") != "posthoc_ema" or int(meta.get("format", -1)) != EMA_FORMAT:
            raise ConfigError(f"Not a post-hoc EMA state (kind {meta.get('kind')!r}).")
        if [float(s) for s in meta["sigma_rels"]] != self.sigma_rels:
            raise ConfigError(f"The checkpoint tracks sigma_rel {meta['sigma_rels']} but this run asks for "
                              f"{self.sigma_rels}; resume with the same post-hoc EMA settings.")
        for i, prof in enumerate(self.profiles):
            part = {k.partition("/")[2]: v for k, v in tensors.items() if k.partition("/")[0] == str(i)}
            _load_tensors(prof, part, f"PostHocEMA.load_state_dict (profile {self.sigma_rels[i]})")
        if len(tensors) != sum(len(p) for p in self.profiles):
            raise ConfigError("PostHocEMA.load_state_dict: the state has tensors of unknown profiles.")
        self.t = int(meta["t"])

    def swap_into(self, params: Mapping[str, torch.Tensor], sigma_rel: float
                  ) -> contextlib.AbstractContextManager[None]:
        """Like :meth:`EMA.swap_into`, with the tracked profile ``sigma_rel``."""
        return _swapped(self._profile(sigma_rel), params)

    def averaged(self, sigma_rel: float) -> dict[str, torch.Tensor]:
        """CPU fp32 copies of the tracked profile ``sigma_rel``."""
        return {n: v.detach().to("cpu").clone() for n, v in self._profile(sigma_rel).items()}

    def _profile(self, sigma_rel: float) -> dict[str, torch.Tensor]:
        for s, prof in zip(self.sigma_rels, self.profiles):
            if math.isclose(s, float(sigma_rel), rel_tol=1e-9):
                return prof
        raise ConfigError(f"sigma_rel {sigma_rel} is not tracked (tracked: {self.sigma_rels}); use reconstruct.")


def _select(snapshots: str | Path | Sequence[Snapshot], at_step: int | None) -> tuple[list[Snapshot], int]:
    """The snapshots usable for a reconstruction at ``at_step`` (default: the newest step), and that step."""
    snaps = list_snapshots(snapshots) if isinstance(snapshots, (str, Path)) else list(snapshots)
    if not snaps:
        raise NotFoundError(f"No post-hoc EMA snapshots in {snapshots}; train with post-hoc EMA on first.")
    target = max(s.step for s in snaps) if at_step is None else int(at_step)
    use = [s for s in snaps if s.step <= target]    # a snapshot from later in training is not an average up to then
    if not use:
        raise NotFoundError(f"No post-hoc EMA snapshot at or before step {target}; the first is at step "
                            f"{min(s.step for s in snaps)}.")
    return use, target


def reconstruct(snapshots: str | Path | Sequence[Snapshot], sigma_rel_target: float, *,
                at_step: int | None = None) -> dict[str, torch.Tensor]:
    """The power-function EMA of relative std ``sigma_rel_target`` at ``at_step`` steps done (default: the
    newest snapshot), as the least-squares combination of the snapshots taken up to then (EDM2 §3.2).

    ``snapshots`` is a snapshot folder or a list from :func:`list_snapshots`. Weights are summed in float64
    (the coefficients alternate in sign and can be large) and returned as CPU fp32 tensors.
    """
    import torch
    from safetensors.torch import load_file

    use, target = _select(snapshots, at_step)
    coeffs = solve_posthoc_coefficients([s.step for s in use], [s.gamma for s in use], target,
                                        sigma_rel_to_gamma(sigma_rel_target))
    total: dict[str, torch.Tensor] = {}
    for snap, x in zip(use, coeffs.tolist()):
        tensors = load_file(str(snap.path))
        if total:
            _check_names(total, tensors, f"reconstruct ({snap.path.name})")
        for n, v in tensors.items():
            acc = total.setdefault(n, torch.zeros(v.shape, dtype=torch.float64))
            acc.add_(v.to(torch.float64), alpha=x)
    return {n: v.to(torch.float32) for n, v in total.items()}


def reconstruction_report(snapshots: str | Path | Sequence[Snapshot], sigma_rel_target: float, *,
                          at_step: int | None = None) -> dict[str, Any]:
    """What :func:`reconstruct` would use, JSON-able: step, profile, coefficients and the profile's relative
    fit error (a large error says the target lies outside what the snapshots can express)."""
    use, target = _select(snapshots, at_step)
    ts, gs, g_t = [s.step for s in use], [s.gamma for s in use], sigma_rel_to_gamma(sigma_rel_target)
    x = solve_posthoc_coefficients(ts, gs, target, g_t)
    return {"sigma_rel": float(sigma_rel_target), "gamma": g_t, "step": target, "snapshots": len(use),
            "fit_error": profile_fit_error(ts, gs, x, target, g_t),
            "coefficients": [{"step": s.step, "sigma_rel": s.sigma_rel, "x": float(c)} for s, c in zip(use, x)]}
