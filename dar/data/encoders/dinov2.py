"""DINOv2 ViT-S/B/L/14 (Oquab et al., 2023) through ``transformers.Dinov2Model``, read from a local folder
only: the REPA encoder of ImageNet.

What REPA (Yu et al., 2024; github.com/sihyun-yu/REPA) feeds its alignment loss, and what this does:

* Preprocessing (REPA's ``preprocess_raw_image``): ``x / 2 + 0.5`` in [0, 1], normalised with the ImageNet
  mean/std, resized with bicubic interpolation (no antialiasing, as ``F.interpolate``'s default) to
  ``14 * grid`` px: 256 px images -> 224 px -> 16 x 16 patches. Grey is repeated to RGB.
* Position embeddings: REPA resamples DINOv2's 37 x 37 grid to ``grid x grid`` once, with timm's
  ``resample_abs_pos_embed`` (bicubic, antialiased), and the network then uses them as they are.
  ``Dinov2Model`` would otherwise interpolate them on every call without antialiasing, so the resampled
  grid is installed in the loaded model: the features are REPA's.
* Features: ``x_norm_patchtokens`` of the torch-hub model = the final LayerNorm's output without the CLS
  (and register) tokens = ``Dinov2Model(...).last_hidden_state[:, 1:]`` (transformers applies
  ``self.layernorm`` to the encoder's output to make ``last_hidden_state``).

The folder is the layout of the hub's ``facebook/dinov2-{small,base,large}``: ``config.json`` +
``model.safetensors`` (get it on a machine with network, e.g. ``huggingface-cli download
facebook/dinov2-base --local-dir DIR``). Nothing is ever downloaded (``local_files_only``), and weights
are read from safetensors only. The config's width must be the name's (384, 768, 1024): it is what the
REPA projector is built for (:func:`dar.data.encoders.encoder_dim`). Depth and heads are not checked, so a
shallow random model of the same width stands in for the real one in tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from dar.data.encoders.base import ImageEncoder, MissingEncoderFiles
from dar.provenance import weights_sha256

HUB_IDS = {"dinov2-s": "facebook/dinov2-small", "dinov2-b": "facebook/dinov2-base", "dinov2-l": "facebook/dinov2-large"}
DIMS = {"dinov2-s": 384, "dinov2-b": 768, "dinov2-l": 1024}
FILES = ("config.json", "model.safetensors")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESS = "repa-imagenet-meanstd-bicubic-posembed-aa-v1"


def _how_to_get(name: str) -> str:
    return (f"expected a folder with {' + '.join(FILES)} (the layout of the hub's {HUB_IDS[name]}); on a machine "
            f"with network: huggingface-cli download {HUB_IDS[name]} --local-dir DIR, then copy DIR here")


def read_config(name: str, folder: str | Path | None) -> tuple[Path, dict]:
    """The folder and its config.json, checked: files present, a plain DINOv2, the name's width."""
    if folder is None:
        raise MissingEncoderFiles(f"{name} needs repa.encoder_path / --repa-encoder-path: {_how_to_get(name)}")
    folder = Path(folder)
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        found = "it does not exist" if not folder.exists() else f"{', '.join(missing)} missing"
        raise MissingEncoderFiles(f"{name} weights not found in {folder} ({found}); {_how_to_get(name)}")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{folder / 'config.json'} is unreadable ({error})") from None
    if config.get("model_type") != "dinov2":
        raise ValueError(f"{folder} holds a {config.get('model_type')!r} model, not 'dinov2' (a plain DINOv2 "
                         f"without registers, as {HUB_IDS[name]})")
    if config.get("hidden_size") != DIMS[name]:
        known = {v: k for k, v in DIMS.items()}.get(config.get("hidden_size"))
        what = f", i.e. {known}" if known else ""
        raise ValueError(f"{folder} holds a DINOv2 of width {config.get('hidden_size')}{what}, but {name} has "
                         f"width {DIMS[name]}; choose the encoder name that matches the folder")
    return folder, config


def resample_position_embeddings(embeddings: torch.Tensor, grid: int) -> torch.Tensor:
    """``[1, 1 + n*n, D]`` (CLS first) -> ``[1, 1 + grid*grid, D]``: bicubic, antialiased, in float32 (the
    recipe of timm's ``resample_abs_pos_embed``, which REPA applies to DINOv2)."""
    n = round((embeddings.shape[1] - 1) ** 0.5)
    if n * n != embeddings.shape[1] - 1:
        raise ValueError(f"position embeddings of {embeddings.shape[1] - 1} patches are not a square grid")
    if n == grid:
        return embeddings
    cls, patches = embeddings[:, :1], embeddings[:, 1:]
    patches = patches.float().reshape(1, n, n, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(embeddings.dtype)
    return torch.cat([cls, patches], dim=1)


def preprocess(rgb: torch.Tensor, resolution: int) -> torch.Tensor:
    """Model-space RGB ``[B, 3, H, W]`` in [-1, 1] -> REPA's DINOv2 input at ``resolution`` px."""
    mean = torch.tensor(IMAGENET_MEAN, device=rgb.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=rgb.device).view(1, 3, 1, 1)
    x = ((rgb + 1.0) / 2.0 - mean) / std
    if tuple(x.shape[-2:]) != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bicubic", align_corners=False)
    return x


class Dinov2Encoder(ImageEncoder):
    """A local DINOv2 folder -> ``[B, grid*grid, width]`` normalised patch tokens at ``14 * grid`` px."""

    def __init__(self, name: str, path: str | Path | None, grid: int, device: str | torch.device = "cpu"):
        folder, config = read_config(name, path)
        try:
            from transformers import Dinov2Model
        except ImportError:
            raise MissingEncoderFiles(f"{name} needs the transformers package: pip install 'dar[repa]'") from None
        try:
            model = Dinov2Model.from_pretrained(str(folder), local_files_only=True, use_safetensors=True).float()
        except (OSError, ValueError, RuntimeError, KeyError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ValueError(f"cannot load {name} from {folder}: {reason}") from None
        patch = int(config.get("patch_size", 14))
        super().__init__(name, DIMS[name], grid, patch * grid, weights_sha256(folder / "model.safetensors"),
                         PREPROCESS, str(folder.resolve()))
        embeddings = model.embeddings
        embeddings.position_embeddings = torch.nn.Parameter(
            resample_position_embeddings(embeddings.position_embeddings.data, grid), requires_grad=False)
        self.model = model
        self.prefix_tokens = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)
        self.to(device).eval().requires_grad_(False)

    def _encode(self, rgb: torch.Tensor) -> torch.Tensor:
        hidden = self.model(pixel_values=preprocess(rgb, self.resolution)).last_hidden_state
        return hidden[:, self.prefix_tokens:]
