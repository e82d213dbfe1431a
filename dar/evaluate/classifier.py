"""A small Fashion-MNIST CNN: the in-domain feature extractor for the built-in dataset.

Inception-V3 features are the standard for ImageNet, but they say little about 32x32 grayscale
garments: the images must be upsampled ~9x, and ImageNet classes have nothing to do with shirts
and sneakers. For the built-in dataset we therefore measure samples with a classifier trained on
Fashion-MNIST itself:

* ``features`` (128-d, global-average-pooled last conv block) -> FD-FMNIST, precision/recall, KID.
  The Fréchet distance on these features is called **FD-FMNIST**, never "FID", so nobody compares
  it with Inception numbers.
* ``logits`` (10 Fashion-MNIST classes) -> class-conditional accuracy (does a sample of class ``y``
  look like class ``y``?) and an in-domain Inception-Score analogue.

The shipped weights (``dar/assets/fmnist_classifier.safetensors``) come from
``scripts/train_fmnist_classifier.py``: full Fashion-MNIST train set, deterministic, CPU. Their
metadata records the command, the data files' SHA-256, the seed and the accuracy on the official
10,000-image test set.

Input convention: model space, ``x = u / 127.5 - 1`` for uint8 pixels ``u`` (the convention of
:mod:`dar.data`), 28x28 images padded to 32x32 with the background value -1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open

from dar.data.datasets import BACKGROUND
from dar.data.images import pad_square
from dar.data.images import uint8_to_model as images_to_model

CLASSIFIER_PATH = Path(__file__).resolve().parent.parent / "assets" / "fmnist_classifier.safetensors"
"""The shipped weights (see ``scripts/train_fmnist_classifier.py`` for their provenance)."""

IMAGE_SIZE = 32
"""Side of the classifier's input: the 28x28 Fashion-MNIST images padded by 2 pixels per side."""

NATIVE_SIZE = 28
"""Side of the original Fashion-MNIST images (accepted by :func:`uint8_to_model` and padded)."""

NUM_CLASSES = 10
FEATURE_DIM = 128


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class FashionMNISTClassifier(nn.Module):
    """VGG-style CNN for ``[N, 1, 32, 32]`` model-space images; ~150k parameters (0.6 MB fp32).

    Four stages at 32, 16, 8 and 4 pixels (16, 32, 64, 128 channels; 3x3 conv + BatchNorm + ReLU,
    max-pooling between stages), then global average pooling to the 128-d feature vector and a
    linear layer to the 10 class logits. The features are post-ReLU averages, like Inception's
    pool_3, so the Fréchet distance is computed on the same kind of statistic.
    """

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(1, 16), *_conv_bn_relu(16, 16), nn.MaxPool2d(2),  # 32 -> 16
            *_conv_bn_relu(16, 32), *_conv_bn_relu(32, 32), nn.MaxPool2d(2),  # 16 -> 8
            *_conv_bn_relu(32, 64), *_conv_bn_relu(64, 64), nn.MaxPool2d(2),  # 8 -> 4
            *_conv_bn_relu(64, FEATURE_DIM),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )  # fmt: skip
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [N, 1, 32, 32]`` -> ``(features [N, 128], logits [N, 10])``."""
        features = self.features(x)
        return features, self.head(self.dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[1]


def uint8_to_model(images: np.ndarray) -> torch.Tensor:
    """uint8 grayscale images -> float32 ``[N, 1, 32, 32]`` in [-1, 1] (``u / 127.5 - 1``).

    Accepts ``[N, H, W]`` or ``[N, H, W, 1]`` with ``H = W = 32`` (samples of a model trained on the
    padded built-in dataset) or ``28`` (raw Fashion-MNIST, padded here with background 0 -> -1,
    with the same padding as :mod:`dar.data.datasets`). Anything else is an error rather than a silent resize: the
    classifier has only seen this geometry, and a resized input would bias every metric.
    """
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3 or images.shape[1] != images.shape[2] or images.shape[1] not in (NATIVE_SIZE, IMAGE_SIZE):
        raise ValueError(
            "the Fashion-MNIST classifier takes grayscale uint8 images [N, H, W] or [N, H, W, 1] with "
            f"H = W = {IMAGE_SIZE} (or {NATIVE_SIZE}, padded to {IMAGE_SIZE}); got shape {images.shape}"
        )
    return images_to_model(pad_square(images, IMAGE_SIZE, BACKGROUND)[:, None])


def read_classifier_metadata(path: str | Path = CLASSIFIER_PATH) -> dict[str, str]:
    """The string metadata stored in a classifier file (training command, data, seed, accuracy)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: cannot read safetensors file ({e})") from e


def load_fmnist_classifier(
    path: str | Path = CLASSIFIER_PATH, device: str | torch.device = "cpu"
) -> FashionMNISTClassifier:
    """Build :class:`FashionMNISTClassifier` in eval mode with the weights of a safetensors file.

    Strict: a file whose tensors do not match the architecture exactly is an error (a silently
    half-loaded feature extractor would produce plausible-looking but meaningless distances).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"Fashion-MNIST classifier weights not found: {path}. They ship with the package; "
            "recreate them with scripts/train_fmnist_classifier.py"
        )
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: cannot read safetensors file ({e})") from e
    model = FashionMNISTClassifier()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        missing = sorted(expected.keys() - found.keys())
        unexpected = sorted(found.keys() - expected.keys())
        wrong = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
        raise ValueError(
            f"{path}: not a FashionMNISTClassifier state dict (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, wrong shape {[(k, found[k], expected[k]) for k in wrong[:5]]})"
        )
    model.load_state_dict(state)
    return model.eval().requires_grad_(False).to(device)
