"""Feature extractors: one interface over the FID Inception-V3 and the Fashion-MNIST classifier.

A :class:`FeatureExtractor` turns uint8 NHWC images (the ADM sample format) into the arrays the
metrics consume:

``pool``     [N, D]  features for the Fréchet distance, precision/recall and KID;
``logits``   [N, K]  class logits for the Inception Score (and class-conditional accuracy when the
                     classes are the dataset's own, see :attr:`FeatureExtractor.class_names`);
``spatial``  [N, S]  spatial features for sFID, only when :attr:`FeatureExtractor.has_spatial`.

It also says what its numbers must be called (:attr:`FeatureExtractor.metric_names`): the Fréchet
distance on Inception features is "fid", on the Fashion-MNIST classifier's it is "fd_fmnist", so an
in-domain number can never be mistaken for an ImageNet FID. Every extractor carries the SHA-256 of
its weight file, which every result records, and says how many images it needs at least
(:func:`minimum_images`).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from dar.data import FASHION_MNIST_CLASSES
from dar.evaluate import classifier, inception
from dar.provenance import file_sha256

EXTRACTORS: tuple[str, ...] = ("inception", "fmnist-classifier")
"""Names accepted by :func:`make_feature_extractor`."""


@contextlib.contextmanager
def full_fp32_precision() -> Iterator[None]:
    """Disable TF32 for CUDA convolutions and matmuls inside the block, restoring the settings after.

    cuDNN convolutions use TF32 (10-bit mantissa) by default on Ampere and later GPUs, and training
    code often enables it for matmuls too. Features computed that way differ from full-precision
    ones in the third significant digit, enough to move FID; a reference evaluator should not
    depend on the GPU generation. Uses the ``fp32_precision`` API where this torch has it (mixing
    it with the legacy ``allow_tf32`` flags is an error in recent releases).
    """
    if hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        saved = (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = saved
    else:
        saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class FeatureExtractor(ABC):
    """Maps uint8 images ``[N, H, W, C]`` to feature arrays; see the module docstring for the keys.

    Attributes:
        name: registry name (:data:`EXTRACTORS`), recorded with every result.
        weights_path, weights_sha256: the weight file used and its SHA-256.
        metric_names: what the Fréchet distance ("fd"), spatial Fréchet distance ("sfd", only with
            spatial features), Inception-Score analogue ("is") and kernel distance ("kd") computed
            on these features are called in results.
        class_names: the classes indexed by ``logits`` when they are the dataset's own labels, so
            that class-conditional accuracy is meaningful; ``None`` otherwise (Inception's 1008
            outputs are the TF graph's classes, not ImageNet label ids).
        has_spatial: whether ``extract`` returns ``spatial``.
        default_batch_size: images per forward pass when the caller does not choose.
        feature_dim: length of the ``pool`` feature vector (see :func:`minimum_images`).
        weights_verified: whether the weight file's SHA-256 is that of the published file the
            extractor stands for; ``None`` where there is none to compare with.
    """

    name: str
    metric_names: dict[str, str]
    class_names: tuple[str, ...] | None
    has_spatial: bool
    default_batch_size: int
    feature_dim: int
    weights_verified: bool | None = None

    def __init__(self, weights_path: Path, device: str | torch.device):
        self.weights_path = Path(weights_path)
        self.weights_sha256 = file_sha256(self.weights_path)
        self.device = torch.device(device)

    @abstractmethod
    def _forward(self, images: np.ndarray) -> dict[str, torch.Tensor]:
        """One batch of uint8 images -> feature tensors (on any device)."""

    def extract(
        self, images: np.ndarray, batch_size: int | None = None, progress: bool = False
    ) -> dict[str, np.ndarray]:
        """Features of all ``images`` (uint8 NHWC) as float32 numpy arrays, computed in batches."""
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
            raise ValueError(
                f"images must be a uint8 numpy array (NHWC), got {type(images).__name__} {getattr(images, 'dtype', '')}"
            )
        if len(images) == 0:
            raise ValueError("no images to extract features from")
        batch_size = batch_size or self.default_batch_size
        chunks: dict[str, list[np.ndarray]] = {}
        starts = range(0, len(images), batch_size)
        with torch.inference_mode(), full_fp32_precision():
            for start in tqdm(starts, desc=f"{self.name} features", unit="batch", disable=not progress):
                for key, value in self._forward(images[start : start + batch_size]).items():
                    chunks.setdefault(key, []).append(value.float().cpu().numpy())
        return {key: np.concatenate(values) for key, values in chunks.items()}

    def describe(self) -> dict:
        """JSON-able description recorded next to every number computed with this extractor."""
        return {"name": self.name, "weights": str(self.weights_path), "weights_sha256": self.weights_sha256}


class InceptionFeatureExtractor(FeatureExtractor):
    """The FID Inception-V3 (:mod:`dar.evaluate.inception`): pool 2048, spatial 2023, logits 1008."""

    name = "inception"
    metric_names = {"fd": "fid", "sfd": "sfid", "is": "inception_score", "kd": "kid"}
    class_names = None
    has_spatial = True
    default_batch_size = 100
    feature_dim = inception.POOL_DIM

    def __init__(
        self,
        weights: str | Path | None = None,
        device: str | torch.device = "cpu",
        *,
        allow_unknown_weights: bool = False,
    ):
        """``allow_unknown_weights``: accept a weight file of the right layout that is not pytorch-fid's
        (:func:`dar.evaluate.inception.check_known_weights`); :attr:`weights_verified` records which."""
        super().__init__(inception.resolve_weights_path(weights), device)
        self.model = inception.load_fid_inception(self.weights_path, self.device)
        self.weights_verified = inception.check_known_weights(
            self.weights_path, self.weights_sha256, allow_unknown=allow_unknown_weights
        )

    def _forward(self, images: np.ndarray) -> dict[str, torch.Tensor]:
        return self.model(inception.preprocess(images, self.device))

    def describe(self) -> dict:
        return {
            **super().describe(),
            "weights_verified": self.weights_verified,  # SHA-256 == pytorch-fid's file
            "preprocessing": "u/255, F.interpolate to 299x299 (bilinear, align_corners=False, no antialias), 2x-1 "
            "(pytorch-fid); grayscale repeated to RGB",
            "pool": "pool_3 [2048]",
            "spatial": "mixed_6/conv[..., :7] = Mixed_6d.branch1x1, 17x17x7 HWC-flattened [2023]",
            "logits": "pool_3 @ fc.weight.T, no bias [1008]",
        }


class FashionMNISTFeatureExtractor(FeatureExtractor):
    """The shipped Fashion-MNIST classifier (:mod:`dar.evaluate.classifier`): pool 128, logits 10."""

    name = "fmnist-classifier"
    metric_names = {"fd": "fd_fmnist", "is": "is_fmnist", "kd": "kid_fmnist"}
    class_names = FASHION_MNIST_CLASSES
    has_spatial = False
    default_batch_size = 1000
    feature_dim = classifier.FEATURE_DIM

    def __init__(self, weights: str | Path = classifier.CLASSIFIER_PATH, device: str | torch.device = "cpu"):
        super().__init__(weights, device)
        # channels_last: ~1.5x faster convolutions with few channels on CPU (oneDNN), same results up to round-off
        model = classifier.load_fmnist_classifier(self.weights_path, self.device)
        self.model = model.to(memory_format=torch.channels_last)
        self.metadata = classifier.read_classifier_metadata(self.weights_path)

    def _forward(self, images: np.ndarray) -> dict[str, torch.Tensor]:
        x = classifier.uint8_to_model(images).to(self.device).contiguous(memory_format=torch.channels_last)
        features, logits = self.model.forward_features(x)
        return {"pool": features, "logits": logits}

    def describe(self) -> dict:
        return {
            **super().describe(),
            "preprocessing": "u/127.5-1, 28x28 padded to 32x32 with background; no resizing",
            "pool": "global average pool of the last conv block [128]",
            "logits": "10 Fashion-MNIST classes",
            "test_accuracy": self.metadata.get("test_accuracy"),
        }


_CLASSES: dict[str, type[FeatureExtractor]] = {
    "inception": InceptionFeatureExtractor,
    "fmnist-classifier": FashionMNISTFeatureExtractor,
}


def _extractor_class(name: str) -> type[FeatureExtractor]:
    if name not in _CLASSES:
        raise ValueError(f"unknown feature extractor {name!r}; choose one of {', '.join(EXTRACTORS)}")
    return _CLASSES[name]


def minimum_images(name: str) -> int:
    """Fewest images an evaluation (or reference) with extractor ``name`` should rest on: one more
    than the feature dimension (2,049 for Inception, 129 for the classifier).

    The covariance of N feature vectors has rank at most N - 1, so below D + 1 images it is singular:
    the Fréchet distance then measures mostly how few images there were, and precision/recall and
    KID are just as unstable. It is a floor, not a recommendation: FID papers use 50,000 images.
    """
    return _extractor_class(name).feature_dim + 1


def make_feature_extractor(
    name: str,
    *,
    device: str | torch.device = "cpu",
    inception_weights: str | Path | None = None,
    allow_unknown_weights: bool = False,
) -> FeatureExtractor:
    """Build an extractor by name (:data:`EXTRACTORS`); ``inception_weights`` and ``allow_unknown_weights``
    (accept Inception weights that are not pytorch-fid's file) only apply to "inception"."""
    cls = _extractor_class(name)
    if cls is InceptionFeatureExtractor:
        return InceptionFeatureExtractor(inception_weights, device, allow_unknown_weights=allow_unknown_weights)
    if inception_weights is not None:
        raise ValueError(f"inception_weights was given, but the {name!r} extractor does not use Inception")
    if allow_unknown_weights:
        raise ValueError(f"allow_unknown_weights applies to Inception weights; the {name!r} extractor has none")
    return cls(device=device)
