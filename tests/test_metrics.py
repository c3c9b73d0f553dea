"""Distribution metrics on feature matrices: identities, monotonicity under a shift, small-N behaviour."""
from __future__ import annotations

import pytest
import torch

from medart_core import metrics as M
from medart_core.errors import ConfigError


def _feats(n=200, d=16, seed=0, shift=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * scale + shift


def test_fid_of_a_set_with_itself_is_zero_and_matches_torchmetrics():
    from torchmetrics.image.fid import _compute_fid

    x, y = _feats(seed=0), _feats(seed=1, shift=0.3, scale=1.2)
    assert M.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    mu1, s1 = M.mean_cov(x)
    mu2, s2 = M.mean_cov(y)
    ref = float(_compute_fid(mu1, s1, mu2, s2))
    assert M.frechet_distance(x, y) == pytest.approx(ref, rel=1e-6)


def test_a_shifted_set_scores_worse_on_every_metric():
    real = _feats(seed=0)
    near = _feats(seed=1)
    far = _feats(seed=2, shift=1.5)
    assert M.frechet_distance(real, far) > M.frechet_distance(real, near)
    assert M.kernel_inception_distance(real, far, n_subsets=20).mean > \
        M.kernel_inception_distance(real, near, n_subsets=20).mean
    a, b = M.prdc(real, near), M.prdc(real, far)
    for k in ("precision", "recall", "density", "coverage"):
        assert b[k] < a[k], k


def test_kid_small_n_and_subset_rules():
    real, fake = _feats(n=6, seed=0), _feats(n=6, seed=1, shift=2.0)
    k = M.kernel_inception_distance(real, fake, n_subsets=10)
    assert k.subset_size == 6 and k.mean > 0 and k.std >= 0
    same = M.kernel_inception_distance(_feats(n=6, seed=2), real, n_subsets=10).mean
    assert abs(same) < k.mean / 5, "two draws of one distribution are much closer than a shifted set"
    with pytest.raises(ConfigError, match="subset size"):
        M.kernel_inception_distance(real, fake, subset_size=7)
    with pytest.raises(ConfigError, match="PRDC"):
        M.prdc(real[:5], fake[:5], k=5)


def test_bootstrap_interval_contains_the_estimate_and_is_seeded():
    real, fake = _feats(seed=0), _feats(seed=1, shift=0.5)
    lo, hi = M.bootstrap_ci(real, fake, M.frechet_distance, n_boot=30, seed=3)
    assert lo < M.frechet_distance(real, fake) < hi
    assert (lo, hi) == M.bootstrap_ci(real, fake, M.frechet_distance, n_boot=30, seed=3)


def test_warnings_and_proportion_interval():
    w = M.sample_size_warnings(10, 10, 2048, minimum=50)
    assert len(w) == 2 and "below the feature dimension" in w[0]
    assert M.sample_size_warnings(100, 100, 64, minimum=50) == []
    lo, hi = M.proportion_ci(7, 10)
    assert 0 < lo < 0.7 < hi < 1
    assert M.proportion_ci(0, 0) == (0.0, 1.0)
