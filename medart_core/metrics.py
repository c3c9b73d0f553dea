"""Distribution metrics as pure functions over feature matrices: Fréchet distance (FID when the features
are Inception's), KID, precision/recall/density/coverage, bootstrap intervals.

Everything is computed in float64 on [N, D] feature tensors; no model, no state. Conventions follow the
papers and the reference implementations:

* FID: Heusel et al. 2017, ``‖μ₁−μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁^½ Σ₂ Σ₁^½)^½)`` with unbiased covariances
  (N−1), as torch-fidelity / pytorch-fid / torchmetrics compute it;
* KID: Bińkowski et al. 2018, unbiased MMD² with the cubic polynomial kernel ``(xᵀy/d + 1)³`` over random
  subsets (size min(1000, N)), mean ± std over subsets, as torch-fidelity does;
* PRDC: Naeem et al. 2020 (k-NN balls, k = 5).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

MIN_SAMPLES = 2


def _f64(x: "torch.Tensor") -> "torch.Tensor":
    import torch

    x = torch.as_tensor(x)
    if x.dim() != 2:
        raise ConfigError(f"features must be an [N, D] matrix, got shape {tuple(x.shape)}.")
    return x.detach().to("cpu", torch.float64)


def mean_cov(features: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """Mean and unbiased covariance (float64) of [N, D] features."""
    f = _f64(features)
    if f.shape[0] < MIN_SAMPLES:
        raise ConfigError(f"need at least {MIN_SAMPLES} samples for a covariance, got {f.shape[0]}.")
    mu = f.mean(0)
    c = f - mu
    return mu, c.T @ c / (f.shape[0] - 1)


def frechet_from_stats(mu1: "torch.Tensor", s1: "torch.Tensor", mu2: "torch.Tensor", s2: "torch.Tensor") -> float:
    """Fréchet distance between N(μ₁, Σ₁) and N(μ₂, Σ₂). The matrix square root is taken of the symmetric
    PSD matrix Σ₁^½ Σ₂ Σ₁^½ (eigh), which is numerically stabler than sqrtm of the non-symmetric Σ₁Σ₂."""
    import torch

    w, v = torch.linalg.eigh(s1)
    s1_half = (v * w.clamp(min=0).sqrt()) @ v.T
    m = s1_half @ s2 @ s1_half
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    d = (mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_sqrt
    return float(d.clamp(min=0))


def frechet_distance(real: "torch.Tensor", fake: "torch.Tensor") -> float:
    """Fréchet distance between two feature sets (FID when they are Inception pool features)."""
    r, f = _f64(real), _f64(fake)
    if r.shape[1] != f.shape[1]:
        raise ConfigError(f"feature dimensions differ: {r.shape[1]} vs {f.shape[1]}.")
    return frechet_from_stats(*mean_cov(r), *mean_cov(f))


def _poly_mmd2(x: "torch.Tensor", y: "torch.Tensor", degree: int = 3, coef: float = 1.0) -> float:
    d = x.shape[1]
    kxx = (x @ x.T / d + coef) ** degree
    kyy = (y @ y.T / d + coef) ** degree
    kxy = (x @ y.T / d + coef) ** degree
    m, n = x.shape[0], y.shape[0]
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(sxx + syy - 2 * kxy.mean())


@dataclass(frozen=True)
class KID:
    mean: float
    std: float
    subset_size: int
    n_subsets: int


def kernel_inception_distance(real: "torch.Tensor", fake: "torch.Tensor", *, subset_size: int | None = None,
                              n_subsets: int = 100, seed: int = 0) -> KID:
    """KID: unbiased polynomial-kernel MMD² over ``n_subsets`` random subsets of ``subset_size`` (default
    min(1000, N)) drawn without replacement from each set; mean and std over subsets. Works at small N."""
    import torch

    r, f = _f64(real), _f64(fake)
    n = min(r.shape[0], f.shape[0])
    size = min(1000, n) if subset_size is None else int(subset_size)
    if size < MIN_SAMPLES or size > n:
        raise ConfigError(f"KID subset size must be in [{MIN_SAMPLES}, {n}] for these sets, got {size}.")
    gen = torch.Generator().manual_seed(int(seed))
    vals = []
    for _ in range(int(n_subsets)):
        ir = torch.randperm(r.shape[0], generator=gen)[:size]
        jf = torch.randperm(f.shape[0], generator=gen)[:size]
        vals.append(_poly_mmd2(r[ir], f[jf]))
    t = torch.tensor(vals, dtype=torch.float64)
    return KID(mean=float(t.mean()), std=float(t.std(correction=0)) if len(vals) > 1 else 0.0,
               subset_size=size, n_subsets=int(n_subsets))


def prdc(real: "torch.Tensor", fake: "torch.Tensor", *, k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage (Naeem et al. 2020) with k-nearest-neighbour balls."""
    import torch

    r, f = _f64(real), _f64(fake)
    if min(r.shape[0], f.shape[0]) <= k:
        raise ConfigError(f"PRDC with k={k} needs more than {k} samples in each set "
                          f"(got {r.shape[0]} real, {f.shape[0]} generated).")
    d_rr = torch.cdist(r, r)
    d_ff = torch.cdist(f, f)
    d_rf = torch.cdist(r, f)  # [R, F]
    # k-th neighbour radius, excluding the point itself (distance 0 at index 0 after sorting).
    rad_r = d_rr.sort(dim=1).values[:, k]
    rad_f = d_ff.sort(dim=1).values[:, k]
    inside_r = d_rf <= rad_r[:, None]            # fake j inside real i's ball
    precision = inside_r.any(dim=0).double().mean()
    recall = (d_rf <= rad_f[None, :]).any(dim=1).double().mean()
    density = inside_r.double().sum(dim=0).mean() / k
    coverage = (d_rf.min(dim=1).values <= rad_r).double().mean()
    return {"precision": float(precision), "recall": float(recall), "density": float(density),
            "coverage": float(coverage)}


def bootstrap_ci(real: "torch.Tensor", fake: "torch.Tensor", stat: Callable[["torch.Tensor", "torch.Tensor"], float],
                 *, n_boot: int = 100, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of ``stat(real, fake)``, resampling both sets with replacement.

    Resampling duplicates points, which biases Fréchet distances upward (the bootstrap distribution can lie
    entirely above the estimate), so the percentile interval is shifted by the estimated bias
    ``mean(boot) − stat``: an interval around the estimate whose width is the bootstrap spread."""
    import torch

    r, f = _f64(real), _f64(fake)
    gen = torch.Generator().manual_seed(int(seed))
    vals = []
    for _ in range(int(n_boot)):
        ir = torch.randint(0, r.shape[0], (r.shape[0],), generator=gen)
        jf = torch.randint(0, f.shape[0], (f.shape[0],), generator=gen)
        vals.append(stat(r[ir], f[jf]))
    t = torch.tensor(vals, dtype=torch.float64)
    lo, hi = torch.quantile(t, torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64)).tolist()
    bias = float(t.mean()) - stat(r, f)
    return max(0.0, float(lo) - bias), float(hi) - bias


def proportion_ci(successes: int, n: int, *, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (win rates, accuracy), defined for n = 0 as (0, 1)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def sample_size_warnings(n_real: int, n_fake: int, dim: int, *, minimum: int = 50) -> list[str]:
    """Honest caveats: FID is biased upward at small N and its covariance is singular below D samples."""
    out = []
    n = min(n_real, n_fake)
    if n < dim:
        out.append(f"N={n} is below the feature dimension {dim}: the covariance is singular and FID is biased "
                   "upward; compare checkpoints only at equal N and prefer KID.")
    if n < minimum:
        out.append(f"N={n} is below the stated minimum of {minimum} images per set: treat the numbers as a smoke "
                   "test, not a result.")
    return out
