"""The image autoencoder of latent diffusion: SD-VAE through ``diffusers.AutoencoderKL``.

Latent models (DiT/SiT on ImageNet) train on ``scale_factor * z`` with ``z`` from the VAE's posterior
(``sd-vae-ft-ema``: 256 px -> 4 x 32 x 32, scale 0.18215), and their samples are decoded back to pixels.
A VAE is loaded from a local folder (``config.json`` + ``diffusion_pytorch_model.safetensors``, as
``diffusers`` saves it) or, on a machine that is online, a hub id; it is identified in every record by
its config and the SHA-256 of its weights' tensors. ``diffusers`` is an optional dependency
(``pip install dar[latents]``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dar.data.images import to_uint8
from dar.provenance import state_dict_sha256, weights_sha256

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
DEFAULT_SCALE_FACTOR = 0.18215  # SD-VAE latents times this have about unit variance (DiT, SiT)
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


@dataclass
class VAE:
    """A loaded autoencoder and what identifies it."""

    model: torch.nn.Module  # diffusers.AutoencoderKL, eval mode, no gradients
    source: str
    scale_factor: float
    weights_sha256: str
    weights_sha256_of: str  # "file" (a local folder's safetensors) or "loaded tensors" (a hub id)

    def record(self) -> dict:
        """Everything a result needs to say which VAE made or decoded its latents."""
        return {"source": self.source, "scale_factor": self.scale_factor, "weights_sha256": self.weights_sha256,
                "weights_sha256_of": self.weights_sha256_of, "dtype": str(self.dtype).removeprefix("torch."),
                "config": {k: v for k, v in dict(self.model.config).items() if not k.startswith("_")}}

    def check_decodes(self, channels: int, model: str) -> None:
        """A clear error unless this VAE's latents have ``channels`` channels (those ``model`` makes)."""
        latent_channels = self.model.config.latent_channels
        if latent_channels != channels:
            raise ValueError(f"the VAE {self.source} decodes {latent_channels}-channel latents, but {model} "
                             f"makes {channels}-channel ones; use the VAE its training latents were made with")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode_moments(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Model-space pixels [B, 3, H, W] in [-1, 1] -> the posterior's (mean, std), unscaled, fp32."""
        posterior = self.model.encode(pixels.to(self.device, self.dtype)).latent_dist
        return posterior.mean.float(), posterior.std.float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        """Scaled latents [B, C, h, w] -> uint8 images [B, H, W, 3] (the ADM format), ``chunk`` at a time
        so memory stays bounded whatever B is."""
        images = []
        for part in latents.split(chunk):
            pixels = self.model.decode(part.to(self.device, self.dtype) / self.scale_factor).sample
            images.append(to_uint8(pixels.float()).cpu())
        return torch.cat(images) if images else torch.zeros(0, 0, 0, 3, dtype=torch.uint8)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def _autoencoder_class():
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ValueError("latent models need the VAE of the `diffusers` package: pip install 'dar[latents]'") from None
    return AutoencoderKL


def load_vae(source: str | Path = DEFAULT_VAE, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, scale_factor: float = DEFAULT_SCALE_FACTOR) -> VAE:
    """A VAE from a local folder (checked: config.json and the safetensors weights must be there) or a hub
    id (needs network or a filled hub cache). Weights are read as safetensors only, never unpickled."""
    AutoencoderKL = _autoencoder_class()
    path = Path(source)
    if path.exists():
        missing = [name for name in ("config.json", WEIGHTS_NAME) if not (path / name).is_file()]
        if missing:
            raise ValueError(f"VAE folder {path} lacks {', '.join(missing)} (expected a diffusers AutoencoderKL "
                             f"folder: config.json + {WEIGHTS_NAME})")
        try:
            config = json.loads((path / "config.json").read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path / 'config.json'} is not valid JSON ({error})") from None
        if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise ValueError(f"{path} holds a {config['_class_name']}, not an AutoencoderKL")
        digest, digest_of = weights_sha256(path / WEIGHTS_NAME), "file"
    elif str(source).count("/") == 1 and not str(source).startswith((".", "/")):
        digest = digest_of = None  # a hub id: diffusers resolves (and caches) it; hashed once loaded
    else:
        raise ValueError(f"VAE {source} is neither a folder nor a hub id like {DEFAULT_VAE}")
    try:
        model = AutoencoderKL.from_pretrained(str(source), use_safetensors=True, torch_dtype=dtype,
                                              low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"cannot load the VAE from {source}: {reason}") from None
    if digest is None:
        digest, digest_of = state_dict_sha256(model.state_dict()), "loaded tensors"
    model = model.to(device).eval().requires_grad_(False)
    return VAE(model, str(source), scale_factor, digest, digest_of)


def save_vae(model: torch.nn.Module, folder: str | Path) -> Path:
    """Write an AutoencoderKL as a local VAE folder that :func:`load_vae` reads (tests, offline copies)."""
    folder = Path(folder)
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def tiny_autoencoder(seed: int = 0, latent_channels: int = 4) -> torch.nn.Module:
    """A randomly initialised, very small AutoencoderKL with the SD-VAE's structure (8x downsampling,
    4 latent channels): the same code path as the real VAE at a size a CPU test can run."""
    AutoencoderKL = _autoencoder_class()
    torch.manual_seed(seed)
    blocks = 4  # three downsamplings: 8x, as the SD-VAE
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, layers_per_block=1,
                         block_out_channels=(8,) * blocks, norm_num_groups=4,
                         down_block_types=("DownEncoderBlock2D",) * blocks,
                         up_block_types=("UpDecoderBlock2D",) * blocks).eval()

