"""Evaluation of generated samples: FID, sFID, IS, precision/recall, KID, and in-domain metrics.

Modules, one idea each:

* :mod:`~dar.evaluate.metrics`     the formulas, on feature arrays (no networks involved);
* :mod:`~dar.evaluate.inception`   the FID Inception-V3 in plain PyTorch (pytorch-fid weight file);
* :mod:`~dar.evaluate.classifier`  the shipped Fashion-MNIST CNN for the built-in dataset;
* :mod:`~dar.evaluate.features`    :class:`FeatureExtractor`, the common interface of both networks;
* :mod:`~dar.evaluate.reference`   reference statistics (built-in splits, ADM .npz, ``--make-ref`` files);
* :mod:`~dar.evaluate.evaluator`   :func:`evaluate_samples` and the cached :class:`InDomainEvaluator`;
* :mod:`~dar.evaluate.checks`      input checks of ``dar eval`` (image count, shape, pixel values);
* :mod:`~dar.cli.eval`         ``dar eval``.

See docs/EVALUATION.md for how every number is computed and how it relates to published ones.
"""

from dar.evaluate.evaluator import InDomainEvaluator, evaluate_samples
from dar.evaluate.features import EXTRACTORS, FeatureExtractor, make_feature_extractor
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
from dar.evaluate.reference import ReferenceStatistics, load_reference, make_reference, save_reference

__all__ = [
    "EXTRACTORS",
    "FeatureExtractor",
    "InDomainEvaluator",
    "ReferenceStatistics",
    "class_probabilities",
    "evaluate_samples",
    "feature_statistics",
    "frechet_distance",
    "inception_score",
    "kid",
    "knn_radii",
    "load_reference",
    "make_feature_extractor",
    "make_reference",
    "manifold_coverage",
    "precision_recall",
    "save_reference",
]
