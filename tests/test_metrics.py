"""The metric formulas on synthetic features with known answers."""

import numpy as np
import pytest
from scipy import linalg

from dar.evaluate.metrics import (
    class_probabilities,
    feature_statistics,
    frechet_distance,
    inception_score,
    kid,
    knn_radii,
    manifold_coverage,
    precision_recall,
)
from tolerances import assert_close_scaled


def random_spd(rng, dim):
    a = rng.normal(size=(dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


# ---------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------


def test_frechet_distance_closed_form_for_commuting_gaussians():
    rng = np.random.default_rng(0)
    dim = 8
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))  # shared eigenvectors -> the covariances commute
    a, b = rng.uniform(0.1, 3.0, dim), rng.uniform(0.1, 3.0, dim)
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    actual = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert actual == pytest.approx(expected, rel=1e-9)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]])) == pytest.approx(
        5.0
    )


def test_frechet_distance_matches_the_symmetric_formula():
    # tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2), computed here with symmetric square roots only
    rng = np.random.default_rng(1)
    dim = 32
    s1, s2 = random_spd(rng, dim), random_spd(rng, dim)
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    root1 = linalg.sqrtm(s1).real
    middle = np.linalg.eigvalsh(root1 @ s2 @ root1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(middle, 0, None)))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-8)


def test_frechet_distance_of_a_dataset_to_itself_is_zero_and_grows_with_noise():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(3000, 16)) @ rng.normal(size=(16, 16))
    mu, sigma = feature_statistics(features)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    distances = []
    for noise in (0.1, 0.3, 1.0, 3.0):
        noisy = features + noise * rng.normal(size=features.shape)
        distances.append(frechet_distance(*feature_statistics(noisy), mu, sigma))
    assert distances[0] > 0 and all(a < b for a, b in zip(distances, distances[1:]))


def test_feature_statistics_are_float64_unbiased():
    features = np.random.default_rng(3).normal(size=(50, 4)).astype(np.float32)
    mu, sigma = feature_statistics(features)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(sigma, np.cov(features.astype(np.float64), rowvar=False))
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(features[:1])


def test_frechet_distance_handles_a_singular_product_and_rejects_mismatched_statistics():
    rng = np.random.default_rng(4)
    few = rng.normal(size=(5, 12))  # fewer samples than dimensions: rank-deficient covariances
    value = frechet_distance(*feature_statistics(few), *feature_statistics(few + 0.5))
    assert np.isfinite(value) and value > 0
    with pytest.raises(ValueError, match="same feature extractor"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------------------------------------
# Precision / recall
# ---------------------------------------------------------------------------------------------


def test_knn_radii_match_brute_force_for_any_block_size():
    points = np.random.default_rng(5).normal(size=(101, 6)).astype(np.float32)
    squared = ((points[:, None] - points[None]) ** 2).sum(-1)
    expected = np.sort(squared, axis=1)[:, 3]  # index 0 is the point itself
    for block_size in (7, 64, 4096):
        assert_close_scaled(knn_radii(points, 3, block_size=block_size), expected, rtol=1e-4)


def test_precision_recall_identical_sets():
    points = np.random.default_rng(6).normal(size=(300, 8))
    assert precision_recall(points, points.copy()) == (1.0, 1.0)


def test_precision_recall_disjoint_far_clusters():
    rng = np.random.default_rng(7)
    real = rng.normal(size=(200, 8))
    fake = rng.normal(size=(200, 8)) + 100.0
    assert precision_recall(real, fake) == (0.0, 0.0)


def test_precision_recall_of_a_mode_dropping_subset():
    # real = two far-apart modes A and B; fake = exactly the points of mode A (mode B dropped):
    # every sample is real (precision 1), only A's share of the data is covered (recall |A| / N)
    rng = np.random.default_rng(8)
    mode_a = rng.normal(size=(150, 8))
    mode_b = rng.normal(size=(250, 8)) + 50.0
    real = np.concatenate([mode_a, mode_b])
    for block_size in (16, 4096):
        precision, recall = precision_recall(real, mode_a, block_size=block_size)
        assert precision == 1.0
        assert recall == pytest.approx(150 / 400)


def test_precision_recall_reuses_reference_radii_and_matches_kynkaanniemi_definition():
    rng = np.random.default_rng(9)
    real, fake = rng.normal(size=(120, 5)), rng.normal(size=(90, 5)) * 1.5
    radii = knn_radii(real, 3)
    assert precision_recall(real, fake, real_radii=radii) == precision_recall(real, fake)
    # direct definition: a fake point counts if it lies in some real point's k-NN ball
    d = ((fake[:, None] - real[None]) ** 2).sum(-1)
    assert manifold_coverage(fake, real, radii) == pytest.approx(np.mean((d <= radii[None]).any(1)))


# ---------------------------------------------------------------------------------------------
# KID
# ---------------------------------------------------------------------------------------------


def test_kid_matches_the_unbiased_mmd_formula():
    rng = np.random.default_rng(10)
    x, y = rng.normal(size=(12, 3)), rng.normal(size=(12, 3)) + 0.3
    k = lambda a, b: (a @ b / 3 + 1) ** 3  # noqa: E731
    m = 12
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    expected = (xx + yy) / (m * (m - 1)) - 2 * xy / m**2
    mean, std = kid(x, y, num_subsets=1, subset_size=12)  # one subset of all points: a permutation
    assert mean == pytest.approx(expected, rel=1e-10) and std == 0.0


def test_kid_is_unbiased_for_equal_distributions_and_positive_for_shifted():
    rng = np.random.default_rng(11)
    a, b = rng.normal(size=(1500, 16)), rng.normal(size=(1500, 16))
    same, same_std = kid(a, b, num_subsets=50, subset_size=500)
    shifted, _ = kid(a, b + 0.5, num_subsets=50, subset_size=500)
    assert abs(same) < 3 * same_std / np.sqrt(50) + 1e-3  # ~0 up to the resampling error of the mean
    assert shifted > 20 * abs(same) and shifted > 0.05
    assert kid(a, b, num_subsets=5, subset_size=100, seed=1) == kid(a, b, num_subsets=5, subset_size=100, seed=1)


def test_kid_validates_inputs():
    with pytest.raises(ValueError, match="same D"):
        kid(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        kid(np.zeros((1, 3)), np.zeros((5, 3)))


# ---------------------------------------------------------------------------------------------
# Inception Score
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 10, 1008])
def test_inception_score_of_a_confident_balanced_classifier_is_k(k):
    probabilities = np.eye(k)[np.arange(10 * k) % k]  # every split holds every class equally often
    mean, std = inception_score(probabilities, splits=10)
    assert mean == pytest.approx(k) and std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_is_one_when_all_predictions_agree():
    probabilities = class_probabilities(np.tile(np.random.default_rng(12).normal(size=(1, 7)), (50, 1)))
    assert inception_score(probabilities, splits=5) == pytest.approx((1.0, 0.0))


def test_inception_score_matches_its_definition():
    logits = np.random.default_rng(13).normal(size=(40, 6)) * 3
    p = class_probabilities(logits)
    np.testing.assert_allclose(p.sum(1), 1.0)
    marginal = p.mean(0)
    expected = np.exp(np.mean(np.sum(p * (np.log(p) - np.log(marginal)), axis=1)))
    assert inception_score(p, splits=1) == pytest.approx((expected, 0.0))
    with pytest.raises(ValueError, match="sum to 1"):
        inception_score(logits, splits=1)
    with pytest.raises(ValueError, match="splits"):
        inception_score(p, splits=41)
