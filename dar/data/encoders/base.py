"""What every REPA image encoder is: a frozen network from model-space images to a row-major grid of
patch features, with what identifies it (name, weights, preprocessing) for the feature cache."""

from __future__ import annotations

import torch


class MissingEncoderFiles(FileNotFoundError, ValueError):
    """An encoder's weights (or the features stored for a data set) are not where they were looked for.
    A ValueError too, so the CLI reports it as one line."""


class ImageEncoder(torch.nn.Module):
    """A frozen image encoder: ``forward(images [B, C, H, W] in [-1, 1], C = 1 or 3) -> [B, grid*grid, dim]``
    float32, tokens in row-major order (a ViT/SiT patch grid's order).

    Attributes: ``name`` (one of :data:`dar.data.encoders.ENCODERS`), ``dim`` (feature width), ``grid``
    (tokens per side), ``resolution`` (the side images are resized to), ``weights_sha256`` (identity of the
    weights), ``preprocess`` (a tag naming the preprocessing, part of the cache key), ``source`` (where the
    weights were read). Always in eval mode with no gradients: ``train()`` keeps it in eval mode, so a
    parent module switching to training never turns on BatchNorm updates or dropout here.
    """

    def __init__(self, name: str, dim: int, grid: int, resolution: int, weights_sha256: str, preprocess: str,
                 source: str):
        super().__init__()
        self.name, self.dim, self.grid, self.resolution = name, int(dim), int(grid), int(resolution)
        self.weights_sha256, self.preprocess, self.source = weights_sha256, preprocess, source

    def _encode(self, rgb: torch.Tensor) -> torch.Tensor:
        """float32 RGB ``[B, 3, H, W]`` in [-1, 1] on the encoder's device -> ``[B, grid*grid, dim]``."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def train(self, mode: bool = True) -> "ImageEncoder":
        return super().train(False)  # frozen: never in training mode

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3) or not images.is_floating_point():
            raise ValueError(f"{self.name} encodes float images [B, 1 or 3, H, W] in [-1, 1], got "
                             f"{images.dtype} {tuple(images.shape)}")
        x = images.to(self.device, torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grey -> RGB
        features = self._encode(x).float()
        expected = (x.shape[0], self.grid * self.grid, self.dim)
        if tuple(features.shape) != expected:  # a network that does not give the promised grid
            raise RuntimeError(f"{self.name} made features {tuple(features.shape)}, expected {expected}")
        return features

    def identity(self) -> dict:
        """What decides the features of a given image: part of every feature cache's key."""
        return {"encoder": self.name, "weights_sha256": self.weights_sha256, "preprocess": self.preprocess,
                "resolution": self.resolution, "grid": self.grid, "dim": self.dim}

    def record(self) -> dict:
        """:meth:`identity` and where the weights came from, for run records."""
        return {**self.identity(), "source": self.source}

    def extra_repr(self) -> str:
        return (f"name={self.name}, dim={self.dim}, grid={self.grid}, resolution={self.resolution}, "
                f"weights_sha256={self.weights_sha256[:12]}...")
