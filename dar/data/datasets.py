"""Datasets for training diffusion transformers in pixel or latent space.

Every dataset yields ``(x, y)`` pairs in *model space*: ``x`` is a float32 ``[C, H, W]`` tensor and
``y`` an integer class label.

* Pixel datasets map uint8 pixels ``u`` to ``x = u / 127.5 - 1``, i.e. exactly onto ``[-1, 1]``,
  the range the diffusion prior (unit Gaussian noise) is calibrated for. :func:`to_uint8` is the
  inverse and produces the ADM sample format (uint8 NHWC) used by FID reference batches.
* Latent datasets yield VAE latents times the VAE's scale factor (``0.18215`` for the SD-VAE used
  by DiT/SiT), so that their variance is close to one: a ``dar prepare-latents`` directory applies the
  factor its manifest records; plain safetensors files must hold latents already scaled (no rescaling).

Datasets, selected by name through :func:`make_dataset`:

``builtin``
    A class-balanced Fashion-MNIST subset shipped in ``dar/assets`` (12,000 train / 2,000 test
    images, built by ``scripts/build_builtin_dataset.py``). Needs no download, so every example and
    test in the repository runs offline.
``idx``
    A directory of IDX files in the standard MNIST naming, e.g. full MNIST or Fashion-MNIST.
``imagefolder``
    One sub-directory per class, decoded lazily with PIL and center-cropped like ADM/DiT.
``latents``
    Pre-computed latents: a ``dar prepare-latents`` directory (``manifest.json`` + shards, memory-mapped
    by :class:`dar.data.latents.LatentShards`, unscaled on disk and scaled by the manifest's factor when
    read), or plain safetensors files of scaled ``latents`` + ``labels``, loaded into memory.

The 28x28 (Fashion-)MNIST images are padded to 32x32 by default so that the common DiT patch sizes
2, 4 and 8 all divide the image side.
"""

from __future__ import annotations

import gzip
import hashlib
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file

from dar.data.images import pad_square, uint8_to_model

DATASETS: tuple[str, ...] = ("builtin", "idx", "imagefolder", "latents")
"""Names accepted by :func:`make_dataset`."""

SPLITS: tuple[str, ...] = ("train", "test")
"""Splits of the datasets that ship both (``builtin`` and ``idx``)."""

PADDED_SIZE = 32
"""Default side of the (Fashion-)MNIST datasets: 28 + 2 * 2 pixels of background padding."""

BACKGROUND = 0
"""uint8 value of the (Fashion-)MNIST background (both draw on black); used for padding."""

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

BUILTIN_PATH = Path(__file__).resolve().parents[1] / "assets" / "fashion_mnist_subset.npz"
"""The shipped Fashion-MNIST subset (see ``scripts/build_builtin_dataset.py`` for provenance)."""

IMAGE_EXTENSIONS: tuple[str, ...] = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff", ".webp")
"""File suffixes (case-insensitive) that the ``imagefolder`` dataset treats as images."""

BAD_IMAGE_POLICIES: tuple[str, ...] = ("error", "skip")
"""What the ``imagefolder`` dataset does with files it cannot read (``data.bad_images``): fail at
construction, listing them, or leave them out and report which."""

SCAN_THREADS = 16
"""Class directories checked at once: the scan waits on file I/O (often a network file system)."""


# ---------------------------------------------------------------------------------------------
# In-memory dataset
# ---------------------------------------------------------------------------------------------


class ArrayDataset(torch.utils.data.Dataset):
    """In-memory dataset of model-space tensors. x in [-1, 1] for pixels (or raw latents), float32 [C,H,W].

    Small datasets (MNIST-sized pixels, pre-computed latents) fit in memory, and a training step
    then needs no DataLoader worker at all: :meth:`get_batch` gathers a whole batch with one
    indexing operation.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_names: list[str]):
        if images.ndim != 4 or images.dtype != torch.float32:
            raise ValueError(f"images must be float32 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if images.shape[2] != images.shape[3]:
            raise ValueError(f"images must be square, got H x W = {images.shape[2]} x {images.shape[3]}")
        if labels.shape != (images.shape[0],) or labels.dtype != torch.int64:
            raise ValueError(
                f"labels must be int64 [N] with N = {images.shape[0]}, got {labels.dtype} {tuple(labels.shape)}"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise ValueError(
                f"labels must lie in [0, {len(class_names)}), got [{labels.min().item()}, {labels.max().item()}]"
            )
        self.images = images
        self.labels = labels
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[2]

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])

    def get_batch(self, indices: torch.Tensor, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather ``x [B, C, H, W]`` and ``y [B]`` for a 1-D tensor of indices (nothing is random here)."""
        return self.images[indices], self.labels[indices]

    def fingerprint(self) -> str:
        """SHA-256 of the examples and labels: a resumed run checks it trains on the same data."""
        digest = hashlib.sha256()
        digest.update(str((tuple(self.images.shape), str(self.images.dtype))).encode())
        digest.update(self.images.contiguous().numpy().tobytes())
        digest.update(self.labels.numpy().tobytes())
        return digest.hexdigest()


def _pixel_dataset(
    images: np.ndarray, labels: np.ndarray, class_names: list[str], image_size: int | None, source: str
) -> ArrayDataset:
    """Square uint8 ``[N, H, W]`` grayscale images -> padded, model-space ``ArrayDataset``.

    ``image_size`` is the native side (no padding) or :data:`PADDED_SIZE` (the default): the image
    is centered and surrounded by :data:`BACKGROUND`, which keeps every patch size that divides 32
    usable without resampling the digits/garments.
    """
    native = images.shape[1]
    size = PADDED_SIZE if image_size is None else image_size
    choices = sorted({native, PADDED_SIZE}) if native <= PADDED_SIZE and (PADDED_SIZE - native) % 2 == 0 else [native]
    if size not in choices:
        raise ValueError(
            f"image_size={image_size!r} is not supported for the {native}x{native} images of {source}; "
            f"choose one of {choices} ({native} = native, {PADDED_SIZE} = padded)"
        )
    return ArrayDataset(
        uint8_to_model(pad_square(images, size, BACKGROUND)[:, None]),
        torch.from_numpy(labels.astype(np.int64)),
        class_names,
    )


# ---------------------------------------------------------------------------------------------
# IDX files (MNIST / Fashion-MNIST)
# ---------------------------------------------------------------------------------------------

# IDX type code (third magic byte) -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

# Split name -> file-name prefix of the standard MNIST distribution.
_IDX_PREFIXES = {"train": "train", "test": "t10k"}


def read_idx(path: str | Path) -> np.ndarray:
    """Parse one IDX file (raw or gzip-compressed) into a native-endian numpy array.

    Format (http://yann.lecun.com/exdb/mnist/): the magic number is two zero bytes, a type code and
    the number of dimensions; then one big-endian uint32 per dimension; then the data, big-endian,
    row-major. The file size must match the header exactly, which catches truncated downloads.
    Compression is detected from the content (gzip magic ``1f 8b``), not from the file name.
    """
    path = Path(path)
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt or truncated gzip stream ({e})") from e
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _IDX_DTYPES or data[3] == 0:
        raise ValueError(
            f"{path}: not an IDX file (bad magic number {data[:4].hex() or '<empty>'}; expected "
            f"00 00 <type code in {sorted(_IDX_DTYPES)}> <ndim >= 1>)"
        )
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise ValueError(f"{path}: truncated header (needs {header_size} bytes for {ndim} dims, file has {len(data)})")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape)) * dtype.itemsize
    actual = len(data) - header_size
    if actual != expected:
        problem = "truncated" if actual < expected else "has trailing bytes"
        raise ValueError(
            f"{path}: {problem}: header declares shape {shape} = {expected} data bytes, but the file holds {actual}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def find_idx_file(directory: Path, stem: str) -> Path:
    """``stem`` or ``stem.gz`` inside ``directory`` (uncompressed preferred: it loads faster)."""
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise ValueError(f"{directory}: missing IDX file {stem} (looked for {stem} and {stem}.gz)")


def load_idx_split(directory: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read ``<prefix>-images-idx3-ubyte[.gz]`` and ``<prefix>-labels-idx1-ubyte[.gz]``.

    ``prefix`` is ``train`` or ``t10k`` (for ``split="test"``). Returns uint8 images ``[N, H, W]``
    and int64 labels ``[N]``.
    """
    if split not in _IDX_PREFIXES:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(_IDX_PREFIXES)}")
    directory = Path(directory)
    prefix = _IDX_PREFIXES[split]
    image_file = find_idx_file(directory, f"{prefix}-images-idx3-ubyte")
    label_file = find_idx_file(directory, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{image_file}: expected uint8 images [N, H, W], got {images.dtype} {images.shape}")
    if images.shape[1] != images.shape[2]:
        raise ValueError(f"{image_file}: expected square images, got {images.shape[1]}x{images.shape[2]}")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise ValueError(f"{label_file}: expected uint8 labels [N], got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(
            f"count mismatch: {image_file} holds {len(images)} images but {label_file} holds {len(labels)} labels"
        )
    return images, labels.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Built-in Fashion-MNIST subset
# ---------------------------------------------------------------------------------------------


def load_builtin_arrays(split: str, path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """uint8 images ``[N, 28, 28]``, int64 labels and class names of one split of the built-in subset.

    ``path`` selects another file written by ``scripts/build_builtin_dataset.py`` (e.g. one with
    more images per class) instead of the shipped :data:`BUILTIN_PATH`.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    path = BUILTIN_PATH if path is None else Path(path)
    if not path.is_file():
        raise ValueError(f"built-in dataset file not found: {path}")
    with np.load(path, allow_pickle=False) as archive:
        missing = {f"{split}_images", f"{split}_labels", "class_names"} - set(archive.files)
        if missing:
            raise ValueError(f"{path}: not a built-in dataset file, missing arrays {sorted(missing)}")
        return (
            archive[f"{split}_images"],
            archive[f"{split}_labels"].astype(np.int64),
            [str(name) for name in archive["class_names"]],
        )


# ---------------------------------------------------------------------------------------------
# Image folder (lazy, RGB)
# ---------------------------------------------------------------------------------------------


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM/DiT center crop: PIL image -> uint8 ``[image_size, image_size, C]`` array.

    First halve with a BOX filter while the short side is at least ``2 * image_size`` (cheap,
    alias-free downsampling), then resize with BICUBIC so the short side equals ``image_size``,
    then crop the center. Matching this exactly matters: FID against ADM reference batches is
    sensitive to the resizing pipeline.
    """
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images in ``root/<class name>/**/<file>``; sorted class directory names give the class indices.

    Files are decoded lazily (datasets like ImageNet do not fit in memory), converted to RGB and
    center-cropped with :func:`center_crop_arr`. Hidden directories are ignored; files whose suffix
    is not in :data:`IMAGE_EXTENSIONS` are skipped. No augmentation is applied here.

    Every image is checked once at construction (PIL's header/structure check, no full decode), so a
    corrupt file is found now rather than hours into training: ``bad_images="error"`` fails listing
    them, ``"skip"`` leaves them out, reports them and keeps them in :attr:`skipped`.
    """

    channels = 3

    def __init__(self, root: str | Path, image_size: int, bad_images: str = "error"):
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"imagefolder path is not a directory: {root}")
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if bad_images not in BAD_IMAGE_POLICIES:
            raise ValueError(f"bad_images={bad_images!r} is not one of {', '.join(BAD_IMAGE_POLICIES)}")
        class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not class_dirs:
            raise ValueError(f"{root}: no class sub-directories found")
        self.root = root
        self.image_size = image_size
        self.class_names = [d.name for d in class_dirs]
        self.num_classes = len(class_dirs)
        with ThreadPoolExecutor(SCAN_THREADS) as pool:
            scanned = list(pool.map(_scan_class_dir, class_dirs))
        bad = [item for _, unreadable in scanned for item in unreadable]
        if bad and bad_images == "error":
            raise ValueError(f"{root}: {_list_bad_images(bad)}; fix or remove them, or set data.bad_images=skip "
                             "to leave them out")
        if bad:
            print(f"{root}: leaving out {_list_bad_images(bad)}", file=sys.stderr)
        self.skipped: list[Path] = [path for path, _ in bad]
        self.samples: list[tuple[Path, int]] = []
        for label, (class_dir, (files, unreadable)) in enumerate(zip(class_dirs, scanned)):
            if not files:
                raise ValueError(f"{class_dir}: class directory holds no {'readable ' if unreadable else ''}"
                                 f"images ({', '.join(IMAGE_EXTENSIONS)})")
            self.samples.extend((f, label) for f in files)
        self.labels = torch.tensor([label for _, label in self.samples], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def fingerprint(self) -> str:
        """SHA-256 of the file list (relative paths, sizes, labels) and the crop size: the identity of an
        image folder too large to hash by content."""
        digest = hashlib.sha256(str(self.image_size).encode())
        for path, label in self.samples:
            digest.update(f"{path.relative_to(self.root)}\0{path.stat().st_size}\0{label}\n".encode())
        return digest.hexdigest()

    def __getitem__(self, i) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except OSError as error:  # the construction-time check does not decode: e.g. a truncated JPEG
            raise ValueError(f"{path}: cannot decode image ({error}); remove or replace the file") from None
        pixels = center_crop_arr(rgb, self.image_size).transpose(2, 0, 1)  # HWC -> CHW
        return uint8_to_model(np.ascontiguousarray(pixels)), label


def _unreadable(path: Path) -> str | None:
    """Why PIL cannot read ``path``, or None. ``verify`` checks the header and structure (chunk CRCs
    for PNG) without decoding the pixels, which keeps a scan of ImageNet affordable."""
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:  # PIL reports bad files as OSError, SyntaxError, struct.error, ...
        return str(error) or type(error).__name__
    return None


def _scan_class_dir(class_dir: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The readable images of one class directory, and the unreadable ones with the reason."""
    files = sorted(p for p in class_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    reasons = [(path, _unreadable(path)) for path in files]
    return [p for p, why in reasons if why is None], [(p, why) for p, why in reasons if why is not None]


def _list_bad_images(bad: list[tuple[Path, str]], shown: int = 5) -> str:
    listed = "; ".join(f"{path} ({why})" for path, why in bad[:shown])
    more = f"; and {len(bad) - shown} more" if len(bad) > shown else ""
    return f"{len(bad)} unreadable image file(s): {listed}{more}"


# ---------------------------------------------------------------------------------------------
# Pre-computed latents
# ---------------------------------------------------------------------------------------------


def load_latents(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate ``latents [N, C, h, w]`` and ``labels [N]`` from one or more safetensors files.

    ``path`` is a ``.safetensors`` file or a directory whose ``*.safetensors`` files are read in
    sorted name order (shards). Latents are returned as float32 without any rescaling: they must be
    stored already scaled (e.g. multiplied by 0.18215 for the SD-VAE). Labels come back as int64.
    """
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"{path}: directory holds no *.safetensors files")
    all_latents, all_labels = [], []
    for file in files:
        try:
            tensors = load_file(file)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file}: cannot read safetensors file ({e})") from e
        if not tensors:
            raise ValueError(f"{file}: holds no tensors (expected 'latents' [N, C, h, w] and 'labels' [N])")
        missing = {"latents", "labels"} - tensors.keys()
        if missing:
            raise ValueError(f"{file}: missing tensor(s) {sorted(missing)}; found {sorted(tensors)}")
        latents, labels = tensors["latents"], tensors["labels"]
        if latents.ndim != 4 or not latents.is_floating_point():
            raise ValueError(
                f"{file}: 'latents' must be floating point [N, C, h, w], got {latents.dtype} {tuple(latents.shape)}"
            )
        if latents.shape[2] != latents.shape[3]:
            raise ValueError(f"{file}: latents must be square, got h x w = {latents.shape[2]} x {latents.shape[3]}")
        if labels.ndim != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(
                f"{file}: 'labels' must be an integer [N] tensor, got {labels.dtype} {tuple(labels.shape)}"
            )
        if len(labels) != len(latents):
            raise ValueError(f"{file}: {len(latents)} latents but {len(labels)} labels")
        if len(latents) == 0:  # an extraction that wrote nothing; training on it would fail much later
            raise ValueError(f"{file}: holds no latents ('latents' has shape {tuple(latents.shape)})")
        if len(labels) and labels.min() < 0:
            raise ValueError(f"{file}: labels must be non-negative, found {labels.min().item()}")
        if all_latents and latents.shape[1:] != all_latents[0].shape[1:]:
            raise ValueError(
                f"{file}: latent shape {tuple(latents.shape[1:])} differs from "
                f"{tuple(all_latents[0].shape[1:])} in {files[0]}"
            )
        all_latents.append(latents.float())
        all_labels.append(labels.long())
    return torch.cat(all_latents), torch.cat(all_labels)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def make_dataset(
    name: str, path: str | None = None, split: str = "train", image_size: int | None = None,
    bad_images: str = "error",
) -> torch.utils.data.Dataset:
    """Build a dataset by name (one of :data:`DATASETS`).

    Args:
        name: ``builtin``, ``idx``, ``imagefolder`` or ``latents``.
        path: data location; required except for ``builtin``, where it optionally names another
            file built by ``scripts/build_builtin_dataset.py``.
        split: ``train`` or ``test`` for ``builtin`` and ``idx``. An ``imagefolder`` or ``latents``
            path holds exactly one split, so these take only ``"train"`` (point ``path`` at the
            data you want instead).
        image_size: model-space side length.
            ``builtin``/``idx``: 28 (native) or 32 (default, padded with background).
            ``imagefolder``: required; the ADM center-crop size.
            ``latents``: optional check that the stored latents have this side.
        bad_images: ``imagefolder`` only: ``error`` (fail listing unreadable image files) or ``skip``
            (leave them out and report them); see :class:`ImageFolderDataset`.

    Returns:
        An :class:`ArrayDataset` (``builtin``, ``idx``, plain ``latents`` files), a
        :class:`dar.data.latents.LatentShards` (a ``dar prepare-latents`` directory) or an
        :class:`ImageFolderDataset`. Class names are the Fashion-MNIST names for ``builtin``, the
        sorted directory names for ``imagefolder`` (and the latents prepared from one), and ``"0"`` ...
        ``"K-1"`` for ``idx`` and plain latent files (they carry no names; ``K`` = largest label + 1).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if bad_images not in BAD_IMAGE_POLICIES:
        raise ValueError(f"bad_images={bad_images!r} is not one of {', '.join(BAD_IMAGE_POLICIES)}")

    if name == "builtin":
        images, labels, class_names = load_builtin_arrays(split, path)
        return _pixel_dataset(images, labels, class_names, image_size, "the built-in dataset")

    if path is None:
        raise ValueError(f"dataset {name!r} needs a path")
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{name} dataset path does not exist: {path}")
    if name in ("imagefolder", "latents") and split != "train":
        raise ValueError(
            f"split {split!r} is not available for dataset {name!r}: its path holds a single split, "
            f"so point path at the data you want and keep split='train'"
        )

    if name == "idx":
        if not path.is_dir():
            raise ValueError(f"idx dataset path must be a directory of IDX files, got {path}")
        images, labels = load_idx_split(path, split)
        class_names = [str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0)]
        return _pixel_dataset(images, labels, class_names, image_size, str(path))

    if name == "imagefolder":
        if image_size is None:
            raise ValueError("dataset 'imagefolder' needs image_size (the center-crop side)")
        return ImageFolderDataset(path, image_size, bad_images)

    from dar.data.latents import MANIFEST_NAME, REQUEST_NAME, LatentShards

    if path.is_dir() and (path / MANIFEST_NAME).is_file():  # written by `dar prepare-latents`: memory-mapped
        shards = LatentShards(path)
        if image_size is not None and image_size != shards.image_size:
            raise ValueError(f"image_size={image_size} does not match the {shards.image_size}x{shards.image_size} "
                             f"latents in {path}")
        return shards
    if path.is_dir() and (path / REQUEST_NAME).is_file():
        raise ValueError(f"{path} is an unfinished `dar prepare-latents` output (no {MANIFEST_NAME}); rerun the "
                         "command that made it to finish it")
    latents, labels = load_latents(path)
    if image_size is not None and image_size != latents.shape[-1]:
        raise ValueError(
            f"image_size={image_size} does not match the {latents.shape[-1]}x{latents.shape[-1]} latents in {path}"
        )
    class_names = [str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0)]
    return ArrayDataset(latents, labels, class_names)
