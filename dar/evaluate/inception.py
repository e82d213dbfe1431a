"""The FID Inception-V3 in plain PyTorch: pool_3 (FID), mixed_6/conv (sFID) and logits (IS).

FID is defined by one specific network: the TensorFlow Inception graph of 2015-12-05
(``classify_image_graph_def.pb``) used by the original TTUR code and by ADM's evaluator. It differs
from torchvision's ImageNet Inception-V3 in its weights, in 1008 output classes, and in three
pooling details. pytorch-fid ported it to PyTorch (``pt_inception-2015-12-05-6726825d.pth``); this
module is an independent, torchvision-free implementation of that port with the same parameter
names, so the pytorch-fid weight file loads unchanged:

* ``BasicConv2d`` = conv (no bias) + BatchNorm (eps 0.001) + ReLU;
* the average-pool branches of the 35x35 (``Mixed_5*``), 17x17 (``Mixed_6b..e``) and first 8x8
  (``Mixed_7b``) blocks ignore the zero padding (``count_include_pad=False``), as TF's pooling does;
* the pool branch of the last block (``Mixed_7c``) is a *max* pool (a quirk of the TF graph);
* 1008-way ``fc``, no auxiliary classifier.

Outputs, for a batch of images:

``pool``    [N, 2048]  global average pool of ``Mixed_7c`` (TF ``pool_3``): FID, precision/recall, KID.
``spatial`` [N, 2023]  first 7 channels of ``Mixed_6d.branch1x1`` (TF ``mixed_6/conv``, after ReLU),
                       17 x 17 x 7 flattened in (H, W, C) order as ADM's evaluator does, so our
                       ``mu_s``/``sigma_s`` line up with those stored in ADM reference batches: sFID.
``logits``  [N, 1008]  ``pool @ fc.weight.T`` *without* the bias: the logits of the original
                       Inception Score code (Salimans et al.) and of ADM's evaluator, which both
                       multiply pool_3 by the softmax layer's weight matrix only.

Preprocessing (:func:`preprocess`) follows pytorch-fid exactly: uint8 -> ``u / 255`` -> bilinear
resize to 299 x 299 with ``F.interpolate(mode="bilinear", align_corners=False)`` (half-pixel
centers, no antialiasing) -> ``2 x - 1``. The TF graph instead resizes with TF1's legacy bilinear
kernel (no half-pixel offset) and normalises with ``(u - 128) / 128``; see docs/EVALUATION.md for
what that means for comparing numbers with ADM's.

Weights: ``--inception-weights PATH`` / ``$DAR_INCEPTION_WEIGHTS`` / the torch hub cache (where
pytorch-fid caches the same file) / a download of :data:`FID_WEIGHTS_URL`, in that order
(:func:`resolve_weights_path`). Loading uses ``torch.load(weights_only=True)`` (or safetensors for a
``.safetensors`` file): no code in a weight file is ever executed. The file is identified by its
SHA-256 (:data:`FID_WEIGHTS_SHA256`, :func:`check_known_weights`): other values in the same shapes
give other numbers, which must not be called FID.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
"""SHA-256 of pytorch-fid's file (95,628,359 bytes). pytorch-fid's code names only its first 8 hex digits
(``6726825d`` in the file name, torch hub's convention); the full digest is the one other projects pin
for the file at :data:`FID_WEIGHTS_URL`, and it starts with those digits."""
WEIGHTS_ENV_VAR = "DAR_INCEPTION_WEIGHTS"

INPUT_SIZE = 299
POOL_DIM = 2048
NUM_LOGITS = 1008
SPATIAL_CHANNELS = 7
SPATIAL_SIZE = 17
SPATIAL_DIM = SPATIAL_SIZE * SPATIAL_SIZE * SPATIAL_CHANNELS  # 2023


class InceptionWeightsError(ValueError):
    """The Inception weight file is missing, unreadable or not the pytorch-fid FID Inception (a bad input value)."""


# ---------------------------------------------------------------------------------------------
# Architecture (parameter names = torchvision / pytorch-fid, so the weight file loads as is)
# ---------------------------------------------------------------------------------------------


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm(eps=0.001, TF's value) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    """3x3/1 average pool that, like TF, averages only over the pixels inside the image."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b/c/d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], dim=1)


class InceptionB(nn.Module):
    """35 -> 17 reduction (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([self.branch3x3(x), branch3x3dbl, branch_pool], dim=1)


class InceptionC(nn.Module):
    """17x17 block (Mixed_6b..e) with factorised 7x7 convs: 1x1 | 1x7-7x1 | (7x1-1x7)x2 | avgpool-1x1.

    The first 192 output channels are the ``branch1x1`` output: for ``Mixed_6d`` that is TF's
    ``mixed_6/conv``, the source of the sFID features.
    """

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = conv(branch7x7dbl)
        branch_pool = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool], dim=1)


class InceptionD(nn.Module):
    """17 -> 8 reduction (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            branch7x7x3 = conv(branch7x7x3)
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch7x7x3, branch_pool], dim=1)


class InceptionE(nn.Module):
    """8x8 block (Mixed_7b/c): 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1.

    ``pool`` is ``"avg"`` (padding excluded) for Mixed_7b and ``"max"`` for Mixed_7c, as in the TF graph.
    """

    def __init__(self, in_channels: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], dim=1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], dim=1)
        if self.pool == "avg":
            pooled = _avg_pool_3x3(x)
        else:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pooled)], dim=1)


class FIDInceptionV3(nn.Module):
    """The FID Inception-V3. Input ``[N, 3, 299, 299]`` in [-1, 1] (see :func:`preprocess`)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(POOL_DIM, NUM_LOGITS)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x [N, 3, 299, 299]`` -> ``{"pool": [N, 2048], "spatial": [N, 2023], "logits": [N, 1008]}``."""
        x = self.Conv2d_1a_3x3(x)  # [N, 32, 149, 149]
        x = self.Conv2d_2a_3x3(x)  # [N, 32, 147, 147]
        x = self.Conv2d_2b_3x3(x)  # [N, 64, 147, 147]
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # [N, 64, 73, 73]
        x = self.Conv2d_3b_1x1(x)  # [N, 80, 73, 73]
        x = self.Conv2d_4a_3x3(x)  # [N, 192, 71, 71]
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # [N, 192, 35, 35]
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # [N, 288, 35, 35]
        x = self.Mixed_6a(x)  # [N, 768, 17, 17]
        x = self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x)))  # [N, 768, 17, 17]
        spatial = x[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)  # mixed_6/conv[..., :7], HWC order
        x = self.Mixed_6e(x)  # [N, 768, 17, 17]
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # [N, 2048, 8, 8]
        pool = x.mean(dim=(2, 3))  # [N, 2048]
        logits = pool @ self.fc.weight.T  # [N, 1008]; no bias, as the IS definition uses
        return {"pool": pool, "spatial": spatial, "logits": logits}


def preprocess(images: np.ndarray | torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 ``[N, H, W, C]`` (C = 1 or 3) or ``[N, H, W]`` -> float32 ``[N, 3, 299, 299]`` in [-1, 1].

    Grayscale is repeated to three channels. Exactly pytorch-fid's arithmetic: ``u / 255``, then
    ``F.interpolate(size=(299, 299), mode="bilinear", align_corners=False)`` (also for 299-pixel
    inputs, where it is the identity), then ``2 x - 1``. The conversion runs on ``device``, so only
    uint8 crosses the bus.
    """
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"expected images [N, H, W, C] with C = 1 or 3 (or [N, H, W]), got shape {tuple(images.shape)}"
        )
    x = images.to(device).permute(0, 3, 1, 2).float() / 255.0
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return 2.0 * x - 1.0


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


def _missing_weights_message(reason: str) -> str:
    return (
        f"The FID Inception weights are not available ({reason}).\n"
        f"Obtain the pytorch-fid weight file {FID_WEIGHTS_FILENAME} from\n"
        f"    {FID_WEIGHTS_URL}\n"
        "(about 95 MB) on a machine with internet access, copy it to this machine, and pass it with\n"
        f"    --inception-weights /path/to/{FID_WEIGHTS_FILENAME}\n"
        f"or set the environment variable {WEIGHTS_ENV_VAR}=/path/to/{FID_WEIGHTS_FILENAME}\n"
        f"or put it at {hub_cache_path()} (where pytorch-fid caches it too)."
    )


def hub_cache_path() -> Path:
    """``$TORCH_HOME/hub/checkpoints/<file>``: where torch hub (and pytorch-fid) keep the weight file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILENAME


def resolve_weights_path(weights: str | Path | None = None, *, download: bool = True) -> Path:
    """Find the weight file: explicit path > ``$DAR_INCEPTION_WEIGHTS`` > torch hub cache > download.

    An explicitly given path (argument or environment variable) must exist; it is never replaced by
    a download. The download goes to the hub cache, so it happens once per machine.
    """
    explicit = weights if weights is not None else os.environ.get(WEIGHTS_ENV_VAR) or None
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            source = "--inception-weights" if weights is not None else f"${WEIGHTS_ENV_VAR}"
            raise InceptionWeightsError(_missing_weights_message(f"{source} points to {path}, which is not a file"))
        return path
    cached = hub_cache_path()
    if cached.is_file():
        return cached
    if not download:
        raise InceptionWeightsError(_missing_weights_message("no path given and nothing in the torch hub cache"))
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        # hash_prefix: a damaged or substituted download is deleted instead of landing in the cache
        torch.hub.download_url_to_file(FID_WEIGHTS_URL, str(cached), hash_prefix=FID_WEIGHTS_SHA256, progress=True)
    except (OSError, RuntimeError) as e:  # OSError: URLError, HTTPError, timeouts, DNS; RuntimeError: wrong hash
        raise InceptionWeightsError(_missing_weights_message(f"download failed: {e}")) from e
    return cached


def expected_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor the pytorch-fid file must provide, with its shape (BatchNorm step counters excluded)."""
    with torch.device("meta"):  # shapes only: no memory, no random initialisation
        model = FIDInceptionV3()
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def _is_safetensors(path: Path) -> bool:
    """Whether ``path`` starts like a safetensors file: an 8-byte little-endian header length, then JSON."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size


def _read_error(path: Path, error: Exception) -> InceptionWeightsError:
    """Our message for a weight file that cannot be read. torch's own text is not passed on where it
    suggests retrying with ``weights_only=False``: that would run code from an unknown file."""
    expected = f"Expected {FID_WEIGHTS_FILENAME} from {FID_WEIGHTS_URL}"
    text = str(error)
    pickled_object = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if pickled_object:
        return InceptionWeightsError(
            f"{path}: the file holds non-tensor Python objects ({pickled_object.group(1)}), which are refused: "
            f"loading them could run code from the file. {expected}"
        )
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)  # the cause, without torch's advice
    reason = detail.group(1) if detail else (text.strip().splitlines() or [""])[0]
    if "weights_only" in reason or "Weights only" in reason:
        reason = "not a plain tensor state dict"
    return InceptionWeightsError(
        f"{path}: cannot read the Inception weight file; it is truncated, corrupt or not a PyTorch or safetensors "
        f"state dict ({type(error).__name__}: {reason}). {expected}"
    )


def _read_state(path: Path) -> object:
    """The object stored in a weight file: safetensors by content (whatever the file is called),
    otherwise ``torch.load(weights_only=True)``."""
    try:
        if _is_safetensors(path) or path.suffix == ".safetensors":
            return load_safetensors(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except (
        RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile, SafetensorError
    ) as e:  # fmt: skip
        raise _read_error(path, e) from e


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read and validate a pytorch-fid format weight file (``.pth`` or ``.safetensors``).

    Every expected tensor must be present with its exact shape and nothing else may be there,
    except BatchNorm ``num_batches_tracked`` counters, which older files lack and eval mode ignores.
    Whether the values are pytorch-fid's is :func:`check_known_weights`' question.
    """
    path = Path(path)
    state = _read_state(path)
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise InceptionWeightsError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    expected = expected_state_dict_shapes()
    found = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if wrong:
            details.append(
                f"{len(wrong)} with the wrong shape (e.g. "
                + ", ".join(f"{k}: {found[k]} != {expected[k]}" for k in wrong[:3])
                + ")"
            )
        raise InceptionWeightsError(
            f"{path}: not the pytorch-fid FID Inception weights ({'; '.join(details)}). "
            f"Expected {FID_WEIGHTS_FILENAME} from {FID_WEIGHTS_URL}"
        )
    return state


def load_fid_inception(path: str | Path, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """:class:`FIDInceptionV3` in eval mode, weights from a validated pytorch-fid format file."""
    model = FIDInceptionV3()
    result = model.load_state_dict(load_state_dict(path), strict=False)
    assert not result.unexpected_keys and all(k.endswith("num_batches_tracked") for k in result.missing_keys)
    return model.eval().requires_grad_(False).to(device)


def check_known_weights(path: str | Path, sha256: str, *, allow_unknown: bool = False) -> bool:
    """Whether the file with digest ``sha256`` is pytorch-fid's FID Inception; raise unless it is or
    ``allow_unknown``.

    The shape check in :func:`load_state_dict` cannot tell the FID network from another Inception-V3
    (torchvision's, a fine-tuned one, random weights) saved in the same layout; only the bytes can.
    """
    if sha256 == FID_WEIGHTS_SHA256:
        return True
    if allow_unknown:
        return False
    raise InceptionWeightsError(
        f"{path}: SHA-256 {sha256} is not that of the FID Inception weights {FID_WEIGHTS_FILENAME} "
        f"(SHA-256 {FID_WEIGHTS_SHA256}). The tensors fit the network, but other values give numbers that are "
        f"not FID. Use the file from {FID_WEIGHTS_URL}, or pass --allow-unknown-weights (allow_unknown_weights=True "
        "in Python) to measure with these weights anyway; the result then records their SHA-256 and a warning."
    )
