"""Evaluate generated samples against reference statistics: every metric, with every setting recorded.

:func:`evaluate_samples` is the one-shot evaluation behind ``dar eval``: it extracts features of
the samples, computes every metric the extractor and the reference allow, and returns a JSON-able
dict that says how each number was obtained (extractor and weight hash, reference and its hash,
k, subsets, splits, package versions). A number without its settings cannot be reproduced, so the
settings travel in the same dict as the numbers.

:class:`InDomainEvaluator` is the fast, cached variant for periodic evaluation during training on
the built-in dataset: reference features and k-NN radii of the built-in train split are computed
once, each call then costs one classifier pass over the samples plus small matrix products.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dar.evaluate.features import FashionMNISTFeatureExtractor, FeatureExtractor, full_fp32_precision
from dar.evaluate.metrics import (
    class_probabilities,
    feature_statistics,
    frechet_distance,
    inception_score,
    kid,
    precision_recall,
)
from dar.evaluate.reference import ReferenceStatistics, load_reference
from dar.provenance import package_versions

PR_K = 3
"""Neighbourhood size of the precision/recall manifolds (Kynkäänniemi et al. 2019; ADM)."""
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
IS_SPLITS = 10




def class_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Share of samples whose predicted class is their conditioning label."""
    labels = np.asarray(labels)
    if labels.shape != (len(logits),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be an integer vector of length {len(logits)}, got {labels.dtype} {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise ValueError(f"labels must lie in [0, {logits.shape[1]}), got [{labels.min()}, {labels.max()}]")
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def evaluate_samples(
    samples: np.ndarray,
    labels: np.ndarray | None,
    reference: ReferenceStatistics | str | Path,
    extractor: FeatureExtractor,
    *,
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Every metric available for ``extractor`` and ``reference``, plus the settings that produced them.

    Args:
        samples: uint8 images ``[N, H, W, C]`` (the ADM sample format).
        labels: the class each sample was generated for, or ``None``; gives ``class_acc`` when the
            extractor classifies the dataset's own classes.
        reference: :class:`ReferenceStatistics` or a source for :func:`load_reference`.
        extractor: see :func:`dar.evaluate.features.make_feature_extractor`.
        seed: seed of the KID subset draws and of the permutation applied before the IS splits.

    Returns:
        ``{"metrics": {...}, "skipped": {metric: reason}, "settings": {...}}``. Metric names depend on
        the extractor: ``fid``, ``sfid``, ``inception_score``, ``kid`` for Inception; ``fd_fmnist``,
        ``is_fmnist``, ``kid_fmnist`` for the Fashion-MNIST classifier; ``precision``, ``recall`` and
        ``class_acc`` for both. Standard deviations over splits/subsets are ``<name>_std``.
    """
    if not isinstance(reference, ReferenceStatistics):
        reference = load_reference(reference, extractor, batch_size=batch_size, progress=progress)
    reference.check_compatible(extractor)
    names = extractor.metric_names
    n = len(samples)

    features = extractor.extract(samples, batch_size, progress)
    metrics: dict[str, float] = {}
    skipped: dict[str, str] = {}

    mu, sigma = feature_statistics(features["pool"])
    metrics[names["fd"]] = frechet_distance(mu, sigma, reference.mu, reference.sigma)
    if "sfd" in names:
        if reference.mu_spatial is not None:
            mu_s, sigma_s = feature_statistics(features["spatial"])
            metrics[names["sfd"]] = frechet_distance(mu_s, sigma_s, reference.mu_spatial, reference.sigma_spatial)
        else:
            skipped[names["sfd"]] = "the reference has no spatial statistics (mu_s, sigma_s)"

    # Splits must not follow the file's order: a class-sorted file would put one class in each split and
    # score ~1. A fixed permutation (as torch-fidelity does) makes the splits random but reproducible.
    is_splits = min(IS_SPLITS, n)
    shuffled = np.random.default_rng(seed).permutation(n)
    probabilities = class_probabilities(features["logits"])[shuffled]
    metrics[names["is"]], metrics[names["is"] + "_std"] = inception_score(probabilities, is_splits)

    kid_subset_size = None
    if reference.features is not None:
        with full_fp32_precision():
            metrics["precision"], metrics["recall"] = precision_recall(
                reference.features,
                features["pool"],
                PR_K,
                real_radii=reference.manifold_radii(PR_K, extractor.device),
                device=extractor.device,
            )
        kid_subset_size = min(KID_SUBSET_SIZE, n, len(reference.features))
        metrics[names["kd"]], metrics[names["kd"] + "_std"] = kid(
            reference.features, features["pool"], num_subsets=KID_SUBSETS, subset_size=kid_subset_size, seed=seed
        )
    else:
        reason = "the reference holds statistics only, no per-image features"
        skipped.update({"precision": reason, "recall": reason, names["kd"]: reason})

    if labels is not None and extractor.class_names is not None:
        metrics["class_acc"] = class_accuracy(features["logits"], labels)
    elif labels is None:
        skipped["class_acc"] = "no labels given with the samples"
    else:
        skipped["class_acc"] = f"the {extractor.name} extractor does not classify the dataset's own classes"

    return {
        "metrics": metrics,
        "skipped": skipped,
        "settings": {
            "num_samples": n,
            "sample_shape": list(samples.shape[1:]),
            "extractor": extractor.describe(),
            "reference": reference.describe(),
            "precision_recall": {
                "k": PR_K,
                "num_reference": None if reference.features is None else len(reference.features),
            },
            "kid": {"subsets": KID_SUBSETS, "subset_size": kid_subset_size, "kernel": "(x.y/d + 1)^3", "seed": seed},
            "inception_score": {
                "splits": is_splits,
                "shuffle_seed": seed,
                "logits": extractor.describe().get("logits"),
            },
            "frechet": "scipy.linalg.sqrtm; float64 statistics, unbiased covariance",
            "device": str(extractor.device),
            "versions": package_versions(),
        },
    }


class InDomainEvaluator:
    """FD-FMNIST, precision, recall and class accuracy of samples of the built-in dataset, cached for speed.

    Construction loads the shipped Fashion-MNIST classifier, extracts the features of the built-in
    train split (``make_dataset("builtin", split="train")``) and precomputes their statistics and
    k-NN radii; each call then only runs the classifier over the samples. A few thousand 32x32
    samples take about a second on a CPU.

    Precision/recall depend on the number of samples (the k-NN radii of the sample manifold grow
    when there are fewer samples), so compare curves made with the same sample count.
    """

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 1000):
        self.extractor = FashionMNISTFeatureExtractor(device=device)
        self.batch_size = batch_size
        self.reference = load_reference("builtin-train", self.extractor, batch_size=batch_size)
        with full_fp32_precision():
            self.reference.manifold_radii(PR_K, self.extractor.device)

    def __call__(self, samples: np.ndarray, labels: np.ndarray | None = None) -> dict[str, float]:
        """``samples``: uint8 ``[N, 32, 32, 1]``; ``labels``: their conditioning classes (for ``class_acc``)."""
        features = self.extractor.extract(samples, self.batch_size)
        mu, sigma = feature_statistics(features["pool"])
        with full_fp32_precision():
            precision, recall = precision_recall(
                self.reference.features,
                features["pool"],
                PR_K,
                real_radii=self.reference.manifold_radii(PR_K, self.extractor.device),
                device=self.extractor.device,
            )
        result = {
            "fd_fmnist": frechet_distance(mu, sigma, self.reference.mu, self.reference.sigma),
            "precision": precision,
            "recall": recall,
        }
        if labels is not None:
            result["class_acc"] = class_accuracy(features["logits"], labels)
        return result
