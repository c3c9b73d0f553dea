"""Paired comparisons of two checkpoints measured on the same real set with seed-matched generated images.

Two checkpoints evaluated under one profile draw generated image j from the same (prompt, seed) and compare it
with the same real image, so their scores share most of their sampling noise. Comparing their unpaired
bootstrap intervals by overlap throws that away; resampling the SAME indices for both and looking at the
difference keeps it, and separates real differences with fewer images.

* :func:`paired_bootstrap`: FD and KID of A and B against the real features, the difference A − B with a
  95 % bootstrap interval (each replicate resamples real images with replacement and takes, for both
  checkpoints, the generated twins of exactly those real images);
* :func:`paired_mean_test`: the mean paired difference of per-image values (the colour gap, a classifier's
  per-image correctness) with a Student t interval;
* :func:`verdict`: "A better than B" / "B better than A" only when the interval excludes 0, else
  "not separated".

Pure functions over tensors, seeded and reproducible; :func:`medart_core.evaluate.compare_paired` feeds them
stored results.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

from . import metrics as M
from .errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

A_BETTER, B_BETTER, NOT_SEPARATED = "A better than B", "B better than A", "not separated"


def verdict(lo: float, hi: float, *, lower_is_better: bool = True) -> str:
    """The verdict of an interval of A − B: a side wins only when the interval excludes 0."""
    if lo > 0:
        return B_BETTER if lower_is_better else A_BETTER
    if hi < 0:
        return A_BETTER if lower_is_better else B_BETTER
    return NOT_SEPARATED


def _groups(owner: Sequence[int], n_real: int) -> list[list[int]]:
    """For each real image the indices of its generated twins."""
    out: list[list[int]] = [[] for _ in range(n_real)]
    for j, i in enumerate(owner):
        if not 0 <= int(i) < n_real:
            raise ConfigError(f"generated image {j} names real image {i}, outside 0..{n_real - 1}.")
        out[int(i)].append(j)
    return out


def _fd(real: "torch.Tensor", fake: "torch.Tensor") -> float:
    """The Fréchet distance of :func:`metrics.frechet_distance`, the same number computed in the space of the
    images instead of the features when there are fewer images than dimensions (Inception's 2048 at N=128: a
    few milliseconds instead of seconds per bootstrap replicate). With centred A = X_r/√(n_r−1) and
    B = X_f/√(n_f−1), Σ_r = AᵀA and Σ_f = BᵀB, the non-zero eigenvalues of Σ_rΣ_f are the squared singular
    values of ABᵀ (n_r × n_f), so tr √(Σ_rΣ_f) = Σ σ(ABᵀ) and tr Σ = ‖A‖²_F."""
    import torch

    if real.shape[1] <= max(real.shape[0], fake.shape[0]):
        return M.frechet_distance(real, fake)
    for x in (real, fake):                      # the feature-space path's "too few samples" error
        if x.shape[0] < M.MIN_SAMPLES:
            raise ConfigError(f"need at least {M.MIN_SAMPLES} samples for a covariance, got {x.shape[0]}.")
    mu_r, mu_f = real.mean(0), fake.mean(0)
    a = (real - mu_r) / math.sqrt(real.shape[0] - 1)
    b = (fake - mu_f) / math.sqrt(fake.shape[0] - 1)
    tr_sqrt = torch.linalg.svdvals(a @ b.T).sum()
    d = (mu_r - mu_f).square().sum() + a.square().sum() + b.square().sum() - 2 * tr_sqrt
    return float(d.clamp(min=0))


def _kid_full(real: "torch.Tensor", fake: "torch.Tensor") -> float:
    """Unbiased polynomial MMD² over the whole sets (KID with one subset of all images): the statistic whose
    difference is bootstrapped (random subsets would add noise the pairing cannot remove)."""
    return M._poly_mmd2(real, fake)


def paired_bootstrap(real: "torch.Tensor", fake_a: "torch.Tensor", fake_b: "torch.Tensor",
                     owner: Sequence[int] | None = None, *, n_boot: int = 200, alpha: float = 0.05,
                     seed: int = 0) -> dict[str, Any]:
    """FD and KID of A and B and their paired difference A − B with a (1 − alpha) bootstrap interval.

    ``owner[j]`` is the real image of generated image j (default: one twin per real image, in order); A and
    B must have the same plan. Like :func:`metrics.bootstrap_ci`, the percentile interval is shifted by the
    bootstrap bias (resampling duplicates points, which biases FD upward)."""
    import torch

    r, fa, fb = M._f64(real), M._f64(fake_a), M._f64(fake_b)
    if fa.shape != fb.shape:
        raise ConfigError(f"A and B need the same number of generated images, got {tuple(fa.shape)} and "
                          f"{tuple(fb.shape)}: evaluate both with one profile.")
    if r.shape[1] != fa.shape[1]:
        raise ConfigError(f"feature dimensions differ: {r.shape[1]} vs {fa.shape[1]}.")
    own = list(range(r.shape[0])) if owner is None else [int(i) for i in owner]
    if len(own) != fa.shape[0]:
        raise ConfigError(f"owner has {len(own)} entries for {fa.shape[0]} generated images.")
    groups = _groups(own, r.shape[0])
    stats = {"fd": _fd, "kid": _kid_full}
    point = {k: (f(r, fa), f(r, fb)) for k, f in stats.items()}
    gen = torch.Generator().manual_seed(int(seed))
    boot: dict[str, list[float]] = {k: [] for k in stats}
    for _ in range(int(n_boot)):
        idx = torch.randint(0, r.shape[0], (r.shape[0],), generator=gen).tolist()
        # The SAME resample for both checkpoints: the real images and the twins of exactly those images.
        fidx = torch.tensor([j for i in idx for j in groups[i]], dtype=torch.int64)
        ri = r[torch.tensor(idx, dtype=torch.int64)]
        for k, f in stats.items():
            boot[k].append(f(ri, fa[fidx]) - f(ri, fb[fidx]))
    out: dict[str, Any] = {"n_real": int(r.shape[0]), "n_generated": int(fa.shape[0]), "n_boot": int(n_boot),
                           "seed": int(seed), "alpha": float(alpha)}
    for k in stats:
        a, b = point[k]
        diff = a - b
        t = torch.tensor(boot[k], dtype=torch.float64)
        if len(t):
            lo, hi = torch.quantile(t, torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64)).tolist()
            bias = float(t.mean()) - diff
            ci = [float(lo) - bias, float(hi) - bias]
        else:
            ci = [-math.inf, math.inf]
        out[k] = {"a": a, "b": b, "diff": diff, "ci": ci, "verdict": verdict(*ci)}
    return out


def paired_mean_test(values_a: Sequence[float], values_b: Sequence[float], *, lower_is_better: bool = True,
                     alpha: float = 0.05) -> dict[str, Any]:
    """Mean of the paired differences a_i − b_i with a (1 − alpha) Student t interval (scipy's quantile) and
    the verdict; no interval (and "not separated") from fewer than two pairs. Identical values give the
    interval [0, 0]: never separated."""
    from scipy import stats

    a, b = [float(x) for x in values_a], [float(x) for x in values_b]
    if len(a) != len(b):
        raise ConfigError(f"paired values need one B value per A value, got {len(a)} and {len(b)}.")
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    if n == 0:
        raise ConfigError("no paired values to compare.")
    mean = math.fsum(d) / n
    out: dict[str, Any] = {"n": n, "a": math.fsum(a) / n, "b": math.fsum(b) / n, "diff": mean, "ci": None,
                           "verdict": NOT_SEPARATED}
    if n < 2:
        return out
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in d) / (n - 1))
    half = float(stats.t.ppf(1 - alpha / 2, n - 1)) * sd / math.sqrt(n)
    out["ci"] = [mean - half, mean + half]
    out["verdict"] = verdict(*out["ci"], lower_is_better=lower_is_better)
    return out


def per_image_colour_gap(fake: "torch.Tensor", real: "torch.Tensor") -> list[float]:
    """Med-Art's colour-moment gap per generated image against its real twin (``hldf.color_moment_loss`` per
    image: Σ_c (μ_c(x̃) − μ_c(x))² + (σ_c(x̃) − σ_c(x))²), images [M, 3, H, W] in the same range."""
    from .hldf import color_moments

    if fake.shape[:2] != real.shape[:2]:
        raise ConfigError(f"one real twin per generated image is needed, got {tuple(fake.shape)} and "
                          f"{tuple(real.shape)}.")
    mu_f, sd_f = color_moments(fake)
    mu_r, sd_r = color_moments(real)
    return ((mu_f - mu_r) ** 2 + (sd_f - sd_r) ** 2).sum(dim=1).double().tolist()


def describe(verdict_text: str, a: str, b: str) -> str:
    """A verdict with the checkpoints named ("run@200 better than base", or "not separated")."""
    if verdict_text == A_BETTER:
        return f"{a} better than {b}"
    if verdict_text == B_BETTER:
        return f"{b} better than {a}"
    return NOT_SEPARATED


__all__ = ["A_BETTER", "B_BETTER", "NOT_SEPARATED", "describe", "paired_bootstrap", "paired_mean_test",
           "per_image_colour_gap", "verdict"]
