"""Sample-quality metrics computed from feature vectors: FD/FID/sFID, KID, IS, precision/recall.

Every function here takes features (or class probabilities) that a feature extractor has already
produced (:mod:`dar.evaluate.features`), so each metric can be tested on synthetic data with a
known answer and reused with any extractor. Which network made the features decides the name of
the number: the Fréchet distance on Inception-V3 pool_3 features is FID, on Inception's
``mixed_6/conv`` spatial features sFID, on the Fashion-MNIST classifier's features FD-FMNIST.

Conventions follow the implementations whose numbers papers report:

* Fréchet distance: TTUR / pytorch-fid / ADM (``scipy.linalg.sqrtm``, diagonal offset when the
  covariance product is singular, imaginary round-off discarded). Statistics use float64 and the
  unbiased covariance (``np.cov``, N - 1).
* KID: Bińkowski et al. 2018 as in torch-fidelity: unbiased MMD^2 with the cubic polynomial kernel
  ``k(x, y) = (x.y / d + 1)^3``, averaged over 100 random subsets of 1,000 (without replacement).
* Inception Score: Salimans et al. 2016 (``exp E_x KL(p(y|x) || p(y))``), 10 splits, mean and std.
* Precision/recall: Kynkäänniemi et al. 2019 with k = 3, as in ADM's evaluator; pairwise distances
  are computed block by block, so 50k x 50k runs in bounded memory on a GPU or CPU.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import linalg
from scipy.special import softmax, xlogy

FRECHET_EPS = 1e-6
"""Diagonal offset added to both covariances when their product is numerically singular (pytorch-fid, ADM)."""

IMAGINARY_TOLERANCE = 1e-3
"""Largest imaginary part allowed on the diagonal of sqrtm(sigma1 sigma2) before FD is declared invalid."""


# ---------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` of ``features [N, D]``, in float64.

    float64 because FID subtracts traces of 2048 x 2048 matrices whose entries are accumulated
    over 50,000 images; float32 round-off there is visible in the second decimal of FID.
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need features [N, D] with N >= 2 to estimate a covariance, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

        d^2 = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^{1/2})

    Numerics as in pytorch-fid and ADM's evaluator, so the same statistics give the same number:
    ``scipy.linalg.sqrtm`` of the (non-symmetric) product; if that is not finite (singular product,
    e.g. fewer samples than dimensions) both covariances get ``FRECHET_EPS`` on the diagonal, with a
    warning; a complex result from round-off is accepted only if the imaginary part of its diagonal
    stays below ``IMAGINARY_TOLERANCE`` and is then dropped.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, dtype=np.float64)), np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"incompatible statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape} "
            "(were they computed with the same feature extractor?)"
        )

    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"Fréchet distance: sigma1 @ sigma2 is singular; adding {FRECHET_EPS} to the diagonal of both "
            "covariances (usually: fewer samples than feature dimensions)",
            stacklevel=2,
        )
        offset = np.eye(sigma1.shape[0]) * FRECHET_EPS
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        largest = np.max(np.abs(np.diagonal(covmean).imag))
        if largest > IMAGINARY_TOLERANCE:
            raise ValueError(f"Fréchet distance: sqrtm(sigma1 sigma2) has an imaginary component of {largest:.3g}")
        covmean = covmean.real

    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


# ---------------------------------------------------------------------------------------------
# Kernel Inception Distance
# ---------------------------------------------------------------------------------------------


def kid(
    features_a: np.ndarray,
    features_b: np.ndarray,
    *,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel (Inception) Distance: mean and std of the unbiased MMD^2 over random subsets.

    Kernel ``k(x, y) = (x.y / d + 1)^3`` (degree 3, gamma 1/d, coef0 1). For each subset pair
    ``X, Y`` of ``m`` points (drawn without replacement, ``m = min(subset_size, N_a, N_b)``):

        MMD^2_u = sum_{i != j} [k(x_i, x_j) + k(y_i, y_j)] / (m (m - 1)) - 2 sum_{i, j} k(x_i, y_j) / m^2

    The estimator is unbiased, so it is ~0 (and can be slightly negative) for two samples of the
    same distribution, unlike FID, whose bias depends on the number of samples. The subsets are
    drawn from ``np.random.default_rng(seed)``: the same inputs always give the same numbers.
    """
    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"KID needs two feature arrays [N, D] with the same D, got {a.shape} and {b.shape}")
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples on each side, got {len(a)} and {len(b)}")
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be positive, got {num_subsets}")
    dim = a.shape[1]
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets)
    for s in range(num_subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        k_xx = (x @ x.T / dim + 1.0) ** 3
        k_yy = (y @ y.T / dim + 1.0) ** 3
        k_xy = (x @ y.T / dim + 1.0) ** 3
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        values[s] = within - 2.0 * k_xy.sum() / (m * m)
    return float(values.mean()), float(values.std())


# ---------------------------------------------------------------------------------------------
# Inception Score
# ---------------------------------------------------------------------------------------------


def class_probabilities(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis in float64 (the IS takes logs of these; float32 underflows)."""
    return softmax(np.asarray(logits, dtype=np.float64), axis=-1)


def inception_score(probabilities: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Inception Score ``exp(E_x KL(p(y|x) || p(y)))`` of ``probabilities [N, K]``: mean and std over splits.

    The samples are cut into ``splits`` consecutive, (almost) equal parts; each part gets its own
    marginal ``p(y)`` and score. Ten splits is the definition of Salimans et al. (2016); ADM's
    evaluator cuts 5,000-sample parts instead, which is the same thing for the usual 50,000 samples.
    Bounds: 1 when every sample gets the same prediction, ``K`` for confident predictions spread
    evenly over ``K`` classes.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probabilities must be [N, K], got shape {p.shape}")
    if not 1 <= splits <= len(p):
        raise ValueError(f"splits must lie in [1, N = {len(p)}], got {splits}")
    if np.any(p < 0) or not np.allclose(p.sum(axis=1), 1.0, atol=1e-6):
        raise ValueError(
            "probabilities must be non-negative and sum to 1 per row (apply class_probabilities to logits)"
        )
    scores = []
    for part in np.array_split(p, splits):
        marginal = part.mean(axis=0, keepdims=True)
        kl = (xlogy(part, part) - xlogy(part, marginal)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


# ---------------------------------------------------------------------------------------------
# Precision and recall (k-NN manifolds)
# ---------------------------------------------------------------------------------------------

DEFAULT_BLOCK_SIZE = 4096
"""Rows and columns of one block of pairwise distances (4096^2 float32 = 64 MiB)."""


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``|a_i - b_j|^2`` for ``a [n, D]``, ``b [m, D]`` via one matmul, clamped at 0 against round-off."""
    return (a.square().sum(1, keepdim=True) - 2.0 * (a @ b.T) + b.square().sum(1)[None]).clamp_min_(0.0)


def _as_tensor(features: np.ndarray | torch.Tensor, device: str | torch.device) -> torch.Tensor:
    tensor = torch.as_tensor(features).to(device=device, dtype=torch.float32)
    if tensor.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {tuple(tensor.shape)}")
    return tensor


def knn_radii(
    features: np.ndarray | torch.Tensor,
    k: int = 3,
    *,
    device: str | torch.device = "cpu",
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> np.ndarray:
    """Squared distance of every point to its k-th nearest neighbour in the same set, ``[N]`` float32.

    A point's distance to itself (0) is the smallest in its row, so the k-th neighbour is the
    (k + 1)-th smallest distance. Rows and columns are processed in blocks, keeping the running
    k + 1 smallest distances per row, so memory stays at one ``block_size^2`` block for any N.
    Squared distances are returned because precision/recall only compare them with other
    squared distances.
    """
    x = _as_tensor(features, device)
    n = len(x)
    if not 1 <= k < n:
        raise ValueError(f"k must lie in [1, N - 1] = [1, {n - 1}], got {k}")
    radii = torch.empty(n, device=x.device)
    for r in range(0, n, block_size):
        rows = x[r : r + block_size]
        nearest = torch.full((len(rows), 0), float("inf"), device=x.device)
        for c in range(0, n, block_size):
            block = _squared_distances(rows, x[c : c + block_size])
            candidates = torch.cat([nearest, block], dim=1)
            nearest = candidates.topk(min(k + 1, candidates.shape[1]), dim=1, largest=False).values
        radii[r : r + block_size] = nearest[:, k]
    return radii.cpu().numpy()


def manifold_coverage(
    points: np.ndarray | torch.Tensor,
    manifold: np.ndarray | torch.Tensor,
    manifold_radii: np.ndarray,
    *,
    device: str | torch.device = "cpu",
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> float:
    """Fraction of ``points`` inside the k-NN manifold of ``manifold``.

    The manifold is the union of the balls around every manifold point ``m_j`` whose squared radius
    is ``manifold_radii[j]`` (its k-th neighbour distance, :func:`knn_radii`). A point is inside if
    ``|p - m_j|^2 <= radius_j`` for some ``j`` (``<=`` as in Kynkäänniemi et al. and ADM).
    """
    p = _as_tensor(points, device)
    m = _as_tensor(manifold, device)
    radii = torch.as_tensor(manifold_radii, dtype=torch.float32, device=m.device)
    if p.shape[1] != m.shape[1] or radii.shape != (len(m),):
        raise ValueError(
            f"shape mismatch: points {tuple(p.shape)}, manifold {tuple(m.shape)}, radii {tuple(radii.shape)}"
        )
    inside = torch.zeros(len(p), dtype=torch.bool, device=p.device)
    for r in range(0, len(p), block_size):
        rows = p[r : r + block_size]
        covered = torch.zeros(len(rows), dtype=torch.bool, device=p.device)
        for c in range(0, len(m), block_size):
            covered |= (_squared_distances(rows, m[c : c + block_size]) <= radii[c : c + block_size][None]).any(1)
            if covered.all():
                break  # every row already found a ball; the remaining blocks cannot change the answer
        inside[r : r + block_size] = covered
    return int(inside.sum()) / len(p)  # exact fraction (a float32 mean would print 0.879000008)


def precision_recall(
    real: np.ndarray | torch.Tensor,
    fake: np.ndarray | torch.Tensor,
    k: int = 3,
    *,
    real_radii: np.ndarray | None = None,
    device: str | torch.device = "cpu",
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of ``fake`` samples against ``real`` data.

    * precision: share of fake samples inside the k-NN manifold of the real features
      (are the samples realistic?);
    * recall: share of real samples inside the k-NN manifold of the fake features
      (is the data distribution covered?).

    ``real_radii`` (from :func:`knn_radii` with the same ``k``) can be passed to reuse the reference
    manifold across evaluations; it is the most expensive part for a fixed reference set.
    Both sets should have the same size (50k/50k for ImageNet in ADM) because k-NN radii shrink with N.
    """
    real_t = _as_tensor(real, device)
    fake_t = _as_tensor(fake, device)
    if real_radii is None:
        real_radii = knn_radii(real_t, k, device=device, block_size=block_size)
    fake_radii = knn_radii(fake_t, k, device=device, block_size=block_size)
    precision = manifold_coverage(fake_t, real_t, real_radii, device=device, block_size=block_size)
    recall = manifold_coverage(real_t, fake_t, fake_radii, device=device, block_size=block_size)
    return precision, recall
