"""Pixels: uint8 <-> model space ([-1, 1]), square padding, and labelled sample grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def uint8_to_model(pixels: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` -> float32 model space in [-1, 1] (``u / 127.5 - 1``)."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).float().div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Model-space images ``[B, C, H, W]`` in [-1, 1] -> uint8 ``[B, H, W, C]`` (the ADM sample format).

    Rounds to the nearest level, so ``to_uint8(u / 127.5 - 1) == u`` exactly for uint8 ``u``, and
    clamps, because samples of a diffusion model overshoot [-1, 1] slightly. The result stays on
    the input's device.
    """
    if x.ndim != 4:
        raise ValueError(f"to_uint8 expects a [B, C, H, W] batch, got shape {tuple(x.shape)}")
    pixels = ((x.detach().float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous()


def pad_square(images: np.ndarray, size: int, background: int) -> np.ndarray:
    """uint8 ``[N, s, s]`` centred on a ``size x size`` canvas of ``background`` (``size - s`` even)."""
    pad = (size - images.shape[1]) // 2
    if pad < 0 or 2 * pad != size - images.shape[1]:
        raise ValueError(f"cannot centre {images.shape[1]}x{images.shape[2]} images on a {size}x{size} canvas")
    if pad:
        images = np.pad(images, ((0, 0), (pad, pad), (pad, pad)), constant_values=background)
    return images


def save_labelled_grid(images: np.ndarray, labels, class_names, path: str | Path, scale: int = 2) -> Path:
    """images: uint8 [N, H, W, C] (C = 1 or 3). Images with the same label share a row, in label order."""
    images = np.asarray(images)
    labels = [int(l) for l in labels]
    if images.ndim != 4 or images.shape[0] != len(labels):
        raise ValueError(f"expected uint8 [N, H, W, C] images and N labels, got {images.shape} and {len(labels)}")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    rows = {label: [i for i, l in enumerate(labels) if l == label] for label in sorted(set(labels))}
    per_row = max(len(members) for members in rows.values())
    H, W = images.shape[1] * scale, images.shape[2] * scale
    font = ImageFont.load_default()
    names = {label: class_names[label] if label < len(class_names) else str(label) for label in rows}
    margin = 8 + max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(n, font=font)) for n in names.values())
    canvas = Image.new("RGB", (margin + per_row * (W + 2), len(rows) * (H + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, members) in enumerate(rows.items()):
        top = r * (H + 2)
        draw.text((4, top + H // 2 - 5), names[label], fill="black", font=font)
        for c, i in enumerate(members):
            tile = Image.fromarray(images[i]).resize((W, H), Image.NEAREST)
            canvas.paste(tile, (margin + c * (W + 2), top))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
