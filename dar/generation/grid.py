"""A labelled grid of a checkpoint's samples: one row per class, fixed noise per sample index."""

from __future__ import annotations

import typing
from pathlib import Path

from dar.data import FASHION_MNIST_CLASSES, save_labelled_grid
from dar.diffusion.samplers import SamplerConfig, sample
from dar.generation.generate import check_decoder, initial_noise, sample_labels, sampling_precision, to_images
from dar.training.config import RunConfig

if typing.TYPE_CHECKING:
    from dar.data.vae import VAE

MAX_GRID_SAMPLES = 160


def class_names(config: RunConfig) -> list[str]:
    """Names for the grid's rows. Only the built-in dataset's are known without reading data: a
    checkpoint's stored data path comes from whoever wrote the file, so it is never opened here."""
    if config.data.name == "builtin" and config.model.num_classes == len(FASHION_MNIST_CLASSES):
        return list(FASHION_MNIST_CLASSES)
    return [str(i) for i in range(config.model.num_classes)]


def grid_scale(images) -> int:
    """Small images (Fashion-MNIST, 32 px) are shown enlarged; decoded 256 px images at their size."""
    return 2 if images.shape[1] < 128 else 1


def save_checkpoint_grid(model, config: RunConfig, path: str | Path, num: int, sampler: SamplerConfig,
                         seed: int, vae: "VAE | None" = None, precision: str = "fp32") -> tuple[Path, dict]:
    """Sample the first ``min(num, 160)`` grid images (balanced over at most 10 classes) with ``model``
    (on its device, in ``precision``: see sampling_precision) and save them; a latent model's samples
    are decoded by ``vae``."""
    if num < 1:
        raise ValueError(f"--num must be positive, got {num}")
    check_decoder(config, vae)
    m = config.model
    device = next(model.parameters()).device
    n = min(num, MAX_GRID_SAMPLES)
    labels = sample_labels(n, min(m.num_classes, 10), "balanced", seed)
    noise = initial_noise(range(n), (m.in_channels, m.input_size, m.input_size), seed)
    with sampling_precision(precision, device):
        x, info = sample(model, noise.to(device), labels.to(device), sampler)
    images = to_images(x.float(), vae)
    return save_labelled_grid(images, labels.tolist(), class_names(config), path, scale=grid_scale(images)), info
