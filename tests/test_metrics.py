"""Metric math against closed forms and independent implementations (scipy, numpy brute force, torch-fidelity)."""

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.spatial.distance import cdist
from scipy.stats import ortho_group
from torch_fidelity.metric_fid import fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric

from pipeline import metrics


def _random_cov(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / d + (0.0 if rank else 0.1 * np.eye(d))


def _scipy_frechet(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    diff = mu1 - mu2
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def test_frechet_closed_form_commuting_gaussians():
    rng = np.random.default_rng(0)
    d = 12
    q = ortho_group.rvs(d, random_state=1)  # shared eigenbasis -> sqrt(S1 S2) = Q sqrt(a b) Q^T
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = metrics.frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_one_dimensional_is_wasserstein2():
    got = metrics.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]]))
    assert got == pytest.approx((1 + 2) ** 2 + (2 - 3) ** 2, rel=1e-12)


def test_frechet_zero_for_identical_sets():
    x = np.random.default_rng(2).standard_normal((50, 64))  # N < D: singular covariance
    st = metrics.feature_stats(x)
    assert abs(metrics.frechet_from_stats(st, st)) < 1e-9 * np.trace(st.sigma)


@pytest.mark.parametrize("d", [5, 64, 256])
def test_frechet_matches_scipy_sqrtm(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d) * 0.3
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
    ours = metrics.frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(_scipy_frechet(mu1, s1, mu2, s2), rel=1e-6)
    assert ours == pytest.approx(fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, False)
                                 ["frechet_inception_distance"], rel=1e-6)


def test_frechet_rank_deficient_is_finite_and_agrees():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((40, 128)), rng.standard_normal((40, 128)) + 0.5
    sa, sb = metrics.feature_stats(a), metrics.feature_stats(b)
    ours = metrics.frechet_from_stats(sa, sb)
    assert np.isfinite(ours) and ours > 0
    assert ours == pytest.approx(_scipy_frechet(sa.mu, sa.sigma, sb.mu, sb.sigma), rel=1e-6)


def test_frechet_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shape mismatch"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_merged_block_moments_equal_numpy_cov_for_any_split():
    x = np.random.default_rng(4).standard_normal((101, 7)) * 3 + 10  # offset mean: checks the centred update
    ref_mu, ref_cov = x.mean(0), np.cov(x, rowvar=False)
    for cuts in ([101], [50, 101], [1, 2, 30, 64, 101], [33, 66, 101]):
        parts = [metrics.moments(x[s:e]) for s, e in zip([0, *cuts[:-1]], cuts)]
        st = metrics.gaussian_stats(metrics.merge_all(parts))
        np.testing.assert_allclose(st.mu, ref_mu, rtol=1e-12)
        np.testing.assert_allclose(st.sigma, ref_cov, rtol=1e-10, atol=1e-12)
    assert metrics.merge_moments(metrics.Moments(0, np.zeros(7), np.zeros((7, 7))), parts[0]) is parts[0]


def _brute_pr(real, fake, k):
    rr, ff, rf = cdist(real, real, "sqeuclidean"), cdist(fake, fake, "sqeuclidean"), cdist(real, fake, "sqeuclidean")
    r_rad = np.sort(rr, axis=1)[:, k]
    f_rad = np.sort(ff, axis=1)[:, k]
    precision = np.mean([(rf[:, j] <= r_rad).any() for j in range(len(fake))])
    recall = np.mean([(rf[i, :] <= f_rad).any() for i in range(len(real))])
    return precision, recall


@pytest.mark.parametrize("k", [1, 3])
def test_precision_recall_matches_brute_force(k):
    rng = np.random.default_rng(5 + k)
    real = rng.standard_normal((80, 6))
    fake = rng.standard_normal((60, 6)) * 1.5 + 0.7
    got = metrics.precision_recall(real, fake, k=k, block=17)  # odd block size exercises the blocking
    exp_p, exp_r = _brute_pr(real, fake, k)
    assert got.precision == pytest.approx(exp_p, abs=1e-12)
    assert got.recall == pytest.approx(exp_r, abs=1e-12)
    assert 0 < got.precision < 1 and 0 < got.recall < 1


def test_precision_recall_identical_sets_is_one():
    x = np.random.default_rng(6).standard_normal((30, 4))
    assert metrics.precision_recall(x, x) == (1.0, 1.0)


def test_precision_recall_needs_more_than_k_points():
    with pytest.raises(ValueError, match="more than k=3"):
        metrics.precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))


def test_inception_score_matches_torch_fidelity_and_limits():
    logits = np.random.default_rng(7).standard_normal((300, 20)) * 3
    mean, std = metrics.inception_score(logits, split_size=100)
    ref = isc_features_to_metric(torch.from_numpy(logits), splits=3, shuffle=False)
    assert mean == pytest.approx(ref["inception_score_mean"], rel=1e-10)
    assert std == pytest.approx(ref["inception_score_std"], rel=1e-8)
    uniform = metrics.inception_score(np.zeros((10, 5)))
    assert uniform[0] == pytest.approx(1.0) and uniform[1] == 0.0
    confident = np.repeat(np.eye(5) * 1e3, 4, axis=0)  # balanced, certain predictions -> IS = #classes
    assert metrics.inception_score(confident)[0] == pytest.approx(5.0, rel=1e-9)


@pytest.mark.slow
def test_frechet_at_the_sfid_dimension_matches_adm_sqrtm():
    """sFID's Fréchet step at 2,023 dims, full-rank covariances from 2,600 feature rows, against ADM's formula
    (scipy.linalg.sqrtm of S1 S2); ~40 s on 2 cores."""
    rng = np.random.default_rng(7)
    d = 7 * 17 * 17
    a = np.abs(rng.standard_normal((2600, d)))  # ReLU-like, as mixed_6/conv features are
    b = np.abs(1.1 * rng.standard_normal((2600, d)) + 0.05)
    sa, sb = metrics.feature_stats(a), metrics.feature_stats(b)
    np.testing.assert_allclose(sa.sigma, np.cov(a, rowvar=False), rtol=1e-10, atol=1e-12)
    expected = _scipy_frechet(sa.mu, sa.sigma, sb.mu, sb.sigma)
    assert metrics.frechet_from_stats(sa, sb) == pytest.approx(expected, rel=1e-9)
