"""Checks that the inputs of an evaluation can give a meaningful number, run before the expensive part.

FID and its relatives return *a* number for any uint8 array: for 4 images, for masks, for 32-pixel
samples measured against a 256-pixel reference. Such numbers look like results and end up in
tables. ``dar eval`` therefore refuses inputs that cannot be compared (too few images, a resolution
or channel count that differs from the reference's) unless ``--force`` is given, and warns about
inputs that are probably a mistake (0/1 values, (nearly) constant images). Every check returns the
warnings it has to record, so the result file says what was overridden or suspicious.
"""

from __future__ import annotations

import numpy as np

FORCE_HINT = "pass --force to compute the numbers anyway (the result then records a warning)"

CONSTANT_STD = 2.0
"""Pixel standard deviation (of 255) below which an image set counts as nearly constant. Real image
sets have 50-90; a value this low means blank images or one image repeated."""

VALUE_CHECK_IMAGES = 100
"""Images (evenly spaced through the file) whose spread is measured: enough to see a constant set,
and bounded memory for 50,000 large images."""


def _refuse_or_warn(message: str, force: bool) -> list[str]:
    if not force:
        raise ValueError(f"{message}; {FORCE_HINT}")
    return [f"{message} (evaluated anyway: --force)"]


def check_image_count(num_images: int, minimum: int, what: str, force: bool = False) -> list[str]:
    """Refuse (or, with ``force``, warn about) fewer than ``minimum`` images (see
    :func:`dar.evaluate.features.minimum_images` for why the floor is the feature dimension + 1).
    Fewer than 2 images are refused even with ``force``: no covariance exists then."""
    if num_images >= minimum:
        return []
    if num_images < 2:
        raise ValueError(f"{what} holds {num_images} image(s); a covariance needs at least 2, {minimum:,} to be usable")
    return _refuse_or_warn(
        f"{what} holds {num_images:,} images, fewer than the {minimum:,} needed for a non-singular covariance "
        "of the features; numbers from so few images are dominated by their count (published FIDs use 50,000)",
        force,
    )


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(n) for n in shape)


def check_image_shape(
    samples_shape: tuple[int, ...], reference_shape: tuple[int, ...] | None, reference: str, force: bool = False
) -> list[str]:
    """Refuse (or warn about) samples whose ``[H, W, C]`` differ from the reference images'.

    The extractors resize, so such a pair is measurable, but the distance then mostly measures the
    difference in resolution (or colour), not the model. ``reference_shape`` ``None`` (ADM
    statistics, which record no shape) checks nothing.
    """
    samples_shape = tuple(samples_shape)
    if reference_shape is None or samples_shape == tuple(reference_shape):
        return []
    differs = "resolution" if samples_shape[:2] != tuple(reference_shape[:2]) else "channel count"
    return _refuse_or_warn(
        f"samples are {_shape_text(samples_shape)} (H x W x C) but the reference {reference} holds "
        f"{_shape_text(reference_shape)} images; a distance across a different {differs} measures that difference, "
        "not the samples' quality",
        force,
    )


def value_warnings(images: np.ndarray, what: str) -> list[str]:
    """Warnings about pixel values that suggest a wrong conversion or a broken sampler (never errors:
    a data set may legitimately be binary)."""
    low, high = int(images.min()), int(images.max())
    if high <= 1:
        return [
            f"{what}: every pixel value lies in [{low}, {high}]; images in 0..255 are expected. Is it a mask, or "
            "float images in [0, 1] converted to uint8 without multiplying by 255?"
        ]
    picked = images[np.linspace(0, len(images) - 1, min(len(images), VALUE_CHECK_IMAGES)).astype(int)]
    picked = picked.astype(np.float32)
    spread = float(picked.std())
    if spread < CONSTANT_STD:
        return [f"{what}: pixel values are nearly constant (standard deviation {spread:.2f} of 255): blank images?"]
    across = float(picked.std(axis=0).mean())
    if len(picked) > 1 and across < CONSTANT_STD:
        return [
            f"{what}: the images are nearly identical (mean per-pixel standard deviation across images {across:.2f} "
            "of 255): one image repeated, or a collapsed sampler?"
        ]
    return []
