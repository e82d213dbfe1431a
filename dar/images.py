"""Sample grids: one row per class, the class name written at the left of its row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


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
