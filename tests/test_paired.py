"""Paired comparisons (medart_core/paired.py): identical checkpoints are never separated; a shifted one is,
with fewer images than the unpaired overlap rule needs (the Ns are printed: run with ``-s`` to see them).

The "checkpoints" are built directly as tensors: real features and, for A and B, the same seed-matched noise
(B = A + a shift), as two checkpoints evaluated on one profile draw their twins from the same seeds."""
from __future__ import annotations

import math

import pytest
import torch

from medart_core import metrics as M
from medart_core import paired as P
from medart_core.errors import ConfigError

GRID = (10, 20, 40, 80, 160)


def feature_sets(n: int, *, d: int = 8, shift: float = 0.5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    real = torch.randn(n, d, generator=g, dtype=torch.float64)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)   # the seed-matched noise both checkpoints draw
    return real, z, z + shift


def image_sets(n: int, *, shift: float = 0.05, seed: int = 0):
    """Real images, A = its twins with seed-matched noise, B = A with the red channel brightened."""
    g = torch.Generator().manual_seed(seed)
    real = torch.rand(n, 3, 8, 8, generator=g) * 2 - 1
    a = (real + 0.3 * torch.randn(n, 3, 8, 8, generator=g)).clamp(-1, 1)
    b = a.clone()
    b[:, 0] = (b[:, 0] + shift).clamp(-1, 1)
    return real, a, b


def _apart(ia, ib) -> bool:
    return ia[1] < ib[0] or ib[1] < ia[0]


def _t_interval(values) -> tuple[float, float]:
    from scipy import stats

    v = [float(x) for x in values]
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))
    half = float(stats.t.ppf(0.975, len(v) - 1)) * sd / math.sqrt(len(v))
    return m - half, m + half


def test_verdict_rule():
    assert P.verdict(-2.0, -0.1) == P.A_BETTER and P.verdict(0.1, 2.0) == P.B_BETTER
    assert P.verdict(-1.0, 1.0) == P.verdict(0.0, 0.0) == P.NOT_SEPARATED
    assert P.verdict(0.1, 2.0, lower_is_better=False) == P.A_BETTER       # e.g. per-image correctness
    assert P.describe(P.A_BETTER, "run@20", "base") == "run@20 better than base"
    assert P.describe(P.NOT_SEPARATED, "run@20", "base") == "not separated"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_identical_checkpoints_are_never_separated(seed):
    real, a, _ = feature_sets(40, seed=seed)
    out = P.paired_bootstrap(real, a, a.clone(), n_boot=100, seed=seed)
    for k in ("fd", "kid"):
        lo, hi = out[k]["ci"]
        assert lo <= 0.0 <= hi and out[k]["verdict"] == P.NOT_SEPARATED, (k, out[k])
        assert out[k]["diff"] == 0.0
    r_img, a_img, _ = image_sets(40, seed=seed)
    gap = P.per_image_colour_gap(a_img, r_img)
    cg = P.paired_mean_test(gap, list(gap))
    assert cg["ci"][0] <= 0.0 <= cg["ci"][1] and cg["verdict"] == P.NOT_SEPARATED


def test_paired_bootstrap_is_seeded_and_reproducible():
    real, a, b = feature_sets(30)
    assert P.paired_bootstrap(real, a, b, n_boot=50, seed=3) == P.paired_bootstrap(real, a, b, n_boot=50, seed=3)
    assert P.paired_bootstrap(real, a, b, n_boot=50, seed=3) != P.paired_bootstrap(real, a, b, n_boot=50, seed=4)


def test_twins_per_image_resample_with_their_real_image():
    real, a, b = feature_sets(20)
    a2, b2 = torch.cat([a, a + 0.01]), torch.cat([b, b + 0.01])
    owner = list(range(20)) * 2      # twin k of real image i sits at k*20 + i
    out = P.paired_bootstrap(real, a2, b2, owner, n_boot=30, seed=0)
    assert out["n_real"] == 20 and out["n_generated"] == 40
    assert out["fd"]["diff"] == pytest.approx(M.frechet_distance(real, a2) - M.frechet_distance(real, b2))
    with pytest.raises(ConfigError, match="same number"):
        P.paired_bootstrap(real, a2, b, owner)
    with pytest.raises(ConfigError, match="owner"):
        P.paired_bootstrap(real, a2, b2, owner[:-1])


def test_shifted_checkpoint_is_separated_with_fewer_images_than_the_overlap_rule_needs():
    """FD and KID: the first N of GRID at which the paired interval of A − B excludes 0, against the first N
    at which A's and B's own (unpaired) bootstrap intervals stop overlapping."""
    first_paired: dict[str, int] = {}
    first_unpaired: dict[str, int] = {}
    stats = {"fd": M.frechet_distance, "kid": P._kid_full}
    for n in GRID:
        real, a, b = feature_sets(n)
        pb = P.paired_bootstrap(real, a, b, n_boot=200, seed=0)
        for k, f in stats.items():
            assert pb[k]["diff"] < 0          # A (unshifted) is closer to the real features
            if k not in first_paired and pb[k]["verdict"] == P.A_BETTER:
                first_paired[k] = n
            if k not in first_unpaired:
                ia = M.bootstrap_ci(real, a, f, n_boot=200, seed=0)
                ib = M.bootstrap_ci(real, b, f, n_boot=200, seed=0)
                if _apart(ia, ib):
                    first_unpaired[k] = n
        if len(first_unpaired) == len(stats) and len(first_paired) == len(stats):
            break
    print(f"\nshift 0.5 in 8-d features: paired separates at N={first_paired}, unpaired intervals stop "
          f"overlapping at N={first_unpaired}")
    for k in stats:
        assert k in first_paired, f"{k}: the paired test never separated a real shift"
        assert first_paired[k] < first_unpaired.get(k, math.inf), (k, first_paired, first_unpaired)


def test_shifted_colour_gap_is_separated_with_fewer_images_than_the_overlap_rule_needs():
    """The per-image colour gap: paired t interval of A − B against the overlap of A's and B's own t intervals."""
    first_paired = first_unpaired = None
    for n in GRID:
        real, a, b = image_sets(n)
        ga, gb = P.per_image_colour_gap(a, real), P.per_image_colour_gap(b, real)
        test = P.paired_mean_test(ga, gb)
        assert test["diff"] < 0
        if first_paired is None and test["verdict"] == P.A_BETTER:
            first_paired = n
        if first_unpaired is None and _apart(_t_interval(ga), _t_interval(gb)):
            first_unpaired = n
        if first_paired is not None and first_unpaired is not None:
            break
    print(f"\nred +0.05 on [-1, 1] images: paired colour-gap test separates at N={first_paired}, unpaired t "
          f"intervals stop overlapping at N={first_unpaired}")
    assert first_paired is not None
    assert first_paired < (first_unpaired or math.inf)


def test_paired_mean_test_edge_cases():
    one = P.paired_mean_test([1.0], [0.5])
    assert one["ci"] is None and one["verdict"] == P.NOT_SEPARATED and one["diff"] == 0.5
    with pytest.raises(ConfigError, match="one B value"):
        P.paired_mean_test([1.0, 2.0], [1.0])
    # Per-image correctness (1/0), higher is better: B right on every image A got wrong.
    acc = P.paired_mean_test([0, 1] * 10, [1, 1] * 10, lower_is_better=False)
    assert acc["diff"] == -0.5 and acc["verdict"] == P.B_BETTER


@pytest.mark.parametrize("n, d", [(12, 40), (30, 300), (20, 8)])
def test_the_bootstraps_fd_is_the_metrics_fd(n, d):
    """With fewer images than dimensions the paired bootstrap takes FD in image space (singular values of
    an n x n product): the same number as metrics.frechet_distance's feature-space eigh, to rounding."""
    g = torch.Generator().manual_seed(n)
    real = torch.randn(n, d, generator=g, dtype=torch.float64)
    fake = torch.randn(n + 3, d, generator=g, dtype=torch.float64) * 1.3 + 0.2
    assert P._fd(real, fake) == pytest.approx(M.frechet_distance(real, fake), rel=1e-7)
    with pytest.raises(ConfigError, match="at least"):
        P._fd(real[:1], fake)
