"""A labelled grid of a checkpoint's samples: one row per class, fixed noise per sample index."""

from __future__ import annotations

from pathlib import Path

from dar.data import FASHION_MNIST_CLASSES, save_labelled_grid, to_uint8
from dar.diffusion.samplers import SamplerConfig, sample
from dar.generation.generate import check_pixel_model, initial_noise, sample_labels
from dar.training.config import RunConfig

MAX_GRID_SAMPLES = 160


def class_names(config: RunConfig) -> list[str]:
    """Names for the grid's rows. Only the built-in dataset's are known without reading data: a
    checkpoint's stored data path comes from whoever wrote the file, so it is never opened here."""
    if config.data.name == "builtin" and config.model.num_classes == len(FASHION_MNIST_CLASSES):
        return list(FASHION_MNIST_CLASSES)
    return [str(i) for i in range(config.model.num_classes)]


def save_checkpoint_grid(model, config: RunConfig, path: str | Path, num: int, sampler: SamplerConfig,
                         seed: int) -> tuple[Path, dict]:
    """Sample the first ``min(num, 160)`` grid images (balanced over at most 10 classes) with ``model``
    (on its device) and save them."""
    if num < 1:
        raise ValueError(f"--num must be positive, got {num}")
    check_pixel_model(config)
    m = config.model
    device = next(model.parameters()).device
    n = min(num, MAX_GRID_SAMPLES)
    labels = sample_labels(n, min(m.num_classes, 10), "balanced", seed)
    noise = initial_noise(range(n), (m.in_channels, m.input_size, m.input_size), seed)
    x, info = sample(model, noise.to(device), labels.to(device), sampler)
    return save_labelled_grid(to_uint8(x.cpu()), labels.tolist(), class_names(config), path), info
