"""Every random number of the project comes from :func:`seeded_generator` with a ``(seed, stream,
index)`` triple, or from :func:`fixed_noise_generator`. The streams are listed once, in :class:`Stream`,
so no two uses can collide and a new use cannot change an old one's numbers."""

from __future__ import annotations

import enum

import numpy as np
import torch


class Stream(enum.IntEnum):
    """Independent random streams; the values are part of every recorded result, never renumber them."""

    TRAIN_STEP = 0  # index = step: examples' flips, label drops, t, noise
    TRAIN_EPOCH = 1  # index = epoch: the data permutation
    TRAIN_LATENTS = 2  # index = step: latents drawn from stored VAE posteriors
    SAMPLE_NOISE = 10  # index = sample: the initial noise of `dar sample`
    SAMPLE_LABELS = 11  # the labels of `dar sample --labels random`
    SAMPLE_SDE = 12  # index = shard: the SDE's Brownian increments
    DIAGNOSE_IMAGES = 20
    DIAGNOSE_NOISE = 21
    PROBE_IMAGES = 22
    PROBE_NOISE = 23
    PROBE_T = 24
    PROBE_SPLIT = 25
    PREPARED_LATENT_SAMPLES = 30  # index = source image: `dar prepare-latents --store samples`
    # `dar distill` (docs/DISTILLATION.md); index = step unless noted
    DISTILL_GENERATOR = 40  # labels, initial noise, the backward-simulated step and its rollout's noise
    DISTILL_DM = 41  # t and noise of the distribution-matching gradient
    DISTILL_FAKE = 42  # t and noise of the fake score's denoising loss
    DISTILL_MONITOR = 43  # index 0: the re-noising of multi-step sample grids and periodic evaluation
    DISTILL_GAN = 44  # the GAN term's times and noises, then its real batch: indices (with replacement), flips, latents


# Fixed noise of the training-time sample grids and periodic evaluation: seed + offset, as every
# recorded run was made (changing them would change the study's evaluation noise).
FIXED_NOISE_SEED_OFFSETS = {"sample_grid": 12345, "periodic_eval": 54321}


def seeded_generator(seed: int, index: int, stream: Stream) -> torch.Generator:
    """An independent, reproducible CPU generator per (seed, stream, index)."""
    entropy = np.random.SeedSequence([seed, int(stream), index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(entropy[0]) << 32 | int(entropy[1]))


def fixed_noise_generator(seed: int, purpose: str) -> torch.Generator:
    """The generator of one of :data:`FIXED_NOISE_SEED_OFFSETS`' purposes."""
    return torch.Generator().manual_seed(seed + FIXED_NOISE_SEED_OFFSETS[purpose])
