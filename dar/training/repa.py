"""REPA (Yu et al., 2024, "Representation Alignment for Generation"): align a projection of the
diffusion transformer's hidden state at block ``repa.depth`` with a frozen image encoder's patch
features of the clean image.

    L = L_velocity + lambda * L_align,    L_align = -1/T sum_tokens cos(proj(h_n), z_n)

The projector is part of the model (:class:`dar.models.sit.ProjectorConfig`); the encoder is frozen and
never saved. Encoder features of a fixed training set do not change, so they are computed once per
(encoder, weights, data, resolution) and read from a cache (:mod:`dar.data.encoders.cache`); a training
step looks up the rows of its examples, flipped where the step flipped the image.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F


def alignment_loss(projected: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Per-sample REPA loss [B]: minus the cosine similarity of projected [B, T, C] and encoder features
    [B, T, C], averaged over the T tokens (fp32)."""
    if projected.shape != features.shape:
        raise ValueError(f"projector output {tuple(projected.shape)} does not match the encoder features "
                         f"{tuple(features.shape)}: the encoder's token grid and width must equal the model's")
    cosine = (F.normalize(projected.float(), dim=-1) * F.normalize(features.float(), dim=-1)).sum(dim=-1)  # [B, T]
    return -cosine.mean(dim=1)


def default_cache_dir() -> Path:
    return Path(os.environ.get("DAR_CACHE", Path.home() / ".cache" / "dar")) / "features"


def alignment_targets(config, dataset, progress: bool = True):
    """The feature table of the training set for ``config.repa`` (computed on first use, then cached).
    Its encoder must produce the model's token grid and the projector's width."""
    from dar.data.encoders import load_encoder
    from dar.data.encoders.cache import dataset_features

    repa = config.repa
    grid = config.token_grid
    encoder = load_encoder(repa.encoder, repa.encoder_path, grid)
    cache = Path(repa.cache_dir) if repa.cache_dir else default_cache_dir()
    table = dataset_features(dataset, encoder, cache, flips=config.data.hflip, progress=progress)
    if (table.tokens, table.dim) != (grid * grid, config.projector.dim):
        raise ValueError(f"{repa.encoder} features are {table.tokens} tokens x {table.dim} but the model has "
                         f"{grid * grid} tokens and a projector to {config.projector.dim}")
    return table
