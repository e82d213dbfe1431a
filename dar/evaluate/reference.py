"""Reference statistics: what generated samples are compared against.

A :class:`ReferenceStatistics` holds, for one feature extractor, the mean and covariance of the
reference features (FID/FD), optionally the spatial ones (sFID), and optionally the raw ``pool``
features themselves (precision/recall and KID need individual points, not moments).

Sources accepted by :func:`load_reference`:

``builtin-train`` / ``builtin-test``
    The built-in Fashion-MNIST subset (:func:`dar.data.make_dataset`), features computed on the fly.
An image ``.npz`` (``arr_0``: uint8 NHWC, e.g. a dataset dump or an ADM reference batch)
    Features computed from the images. If the file also stores ``mu``/``sigma`` (and ``mu_s``/
    ``sigma_s``), as ADM's reference batches do, those stored Inception statistics are used for
    FID/sFID exactly as ADM's evaluator uses them, and the images only provide the points for
    precision/recall/KID.
An ADM statistics-only ``.npz`` (``mu``, ``sigma``, ``mu_s``, ``sigma_s``)
    FID and sFID only.
A file written by :func:`save_reference` (``dar eval IMAGES --make-ref OUT``)
    ``mu``/``sigma``/``mu_s``/``sigma_s`` under ADM's names, ``features`` and a JSON ``meta``
    record naming the extractor and its weights' SHA-256, which must match at evaluation time, and
    the shape of the images the statistics come from (files written before it was recorded lack it).

Statistics without such a record (ADM's files) are taken to be Inception pool_3/mixed_6 statistics
from ADM's TensorFlow graph and are only used with the "inception" extractor.

:func:`reference_images` says how many images of which shape stand behind a reference without
computing anything, so ``dar eval`` can refuse a mismatch before the expensive part.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from dar.data import PADDED_SIZE, load_builtin_arrays
from dar.evaluate.features import FeatureExtractor, file_sha256
from dar.evaluate.metrics import feature_statistics, knn_radii
from dar.files import atomic_path

REFERENCE_FORMAT = "dar-reference-v1"
BUILTIN_REFERENCES: tuple[str, ...] = ("builtin-train", "builtin-test")
"""Shortcuts for the splits of the built-in Fashion-MNIST subset."""

_BUILTIN_CACHE: dict[tuple[str, str, str], "ReferenceStatistics"] = {}
"""Built-in references by (source, extractor, weights SHA-256). They are fixed by the shipped data and
weights, and periodic evaluation, tests and ``dar eval`` would otherwise recompute them every time."""


@dataclasses.dataclass
class ReferenceStatistics:
    """Reference side of every metric, for one feature extractor.

    ``extractor``/``weights_sha256`` name the network that produced the statistics (``None`` sha for
    statistics stored by ADM's TensorFlow evaluator); ``features`` are the pool features of the
    reference images, or ``None`` when only moments are known (no precision/recall/KID then).
    ``image_shape`` is ``[H, W, C]`` of the reference images, ``None`` where unknown (ADM statistics).
    """

    description: str
    extractor: str
    weights_sha256: str | None
    mu: np.ndarray
    sigma: np.ndarray
    mu_spatial: np.ndarray | None = None
    sigma_spatial: np.ndarray | None = None
    features: np.ndarray | None = None
    num_images: int | None = None
    image_shape: tuple[int, ...] | None = None
    statistics_source: str = "computed from the reference images"
    file_sha256: str | None = None
    metadata: dict = dataclasses.field(default_factory=dict)
    _radii: dict[int, np.ndarray] = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    def check_compatible(self, extractor: FeatureExtractor) -> None:
        """Raise unless these statistics were made by ``extractor`` (same network, same weights)."""
        if self.extractor != extractor.name:
            raise ValueError(
                f"reference {self.description!r} holds {self.extractor!r} statistics, but samples are measured "
                f"with {extractor.name!r}; use --extractor {self.extractor} or another reference"
            )
        if self.weights_sha256 is not None and self.weights_sha256 != extractor.weights_sha256:
            raise ValueError(
                f"reference {self.description!r} was computed with {self.extractor} weights of SHA-256 "
                f"{self.weights_sha256}, but the loaded weights have {extractor.weights_sha256}; recompute the reference"
            )

    def manifold_radii(self, k: int, device: str | torch.device = "cpu") -> np.ndarray:
        """k-NN radii of :attr:`features` (precision/recall), computed on first use and kept.

        For a 50k reference this is the most expensive part of precision/recall, and it does not
        depend on the samples, so periodic evaluations against the same reference pay for it once.
        """
        if self.features is None:
            raise ValueError(f"reference {self.description!r} holds statistics only, no per-image features")
        if k not in self._radii:
            self._radii[k] = knn_radii(self.features, k, device=device)
        return self._radii[k]

    def describe(self) -> dict:
        """JSON-able description recorded with every result."""
        return {
            "source": self.description,
            "file_sha256": self.file_sha256,
            "num_images": self.num_images,
            "image_shape": None if self.image_shape is None else list(self.image_shape),
            "extractor": self.extractor,
            "weights_sha256": self.weights_sha256,
            "statistics": self.statistics_source,
            "has_spatial_statistics": self.mu_spatial is not None,
            "has_features": self.features is not None,
            **({"metadata": self.metadata} if self.metadata else {}),
        }


def make_reference(
    images: np.ndarray,
    extractor: FeatureExtractor,
    description: str,
    *,
    batch_size: int | None = None,
    progress: bool = False,
) -> ReferenceStatistics:
    """Compute reference statistics and features of uint8 NHWC ``images`` with ``extractor``."""
    features = extractor.extract(images, batch_size, progress)
    mu, sigma = feature_statistics(features["pool"])
    mu_s, sigma_s = feature_statistics(features["spatial"]) if "spatial" in features else (None, None)
    return ReferenceStatistics(
        description=description,
        extractor=extractor.name,
        weights_sha256=extractor.weights_sha256,
        mu=mu,
        sigma=sigma,
        mu_spatial=mu_s,
        sigma_spatial=sigma_s,
        features=features["pool"],
        num_images=len(images),
        image_shape=tuple(images.shape[1:]),
    )


def save_reference(reference: ReferenceStatistics, path: str | Path, extractor: FeatureExtractor) -> Path:
    """Write ``reference`` as an ``.npz`` with ADM's key names plus ``features`` and a JSON ``meta`` record."""
    reference.check_compatible(extractor)
    meta = {
        "format": REFERENCE_FORMAT,
        "description": reference.description,
        "num_images": reference.num_images,
        **({"image_shape": list(reference.image_shape)} if reference.image_shape is not None else {}),
        "extractor": extractor.describe(),
        **({"source_file_sha256": reference.file_sha256} if reference.file_sha256 else {}),
        **reference.metadata,
    }
    arrays = {"mu": reference.mu, "sigma": reference.sigma, "meta": np.array(json.dumps(meta))}
    if reference.mu_spatial is not None:
        arrays.update(mu_s=reference.mu_spatial, sigma_s=reference.sigma_spatial)
    if reference.features is not None:
        arrays["features"] = reference.features.astype(np.float32)
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"reference output must be a .npz file, got {path}")
    # never leave a half-written reference behind; a handle, because np.savez appends ".npz" to a
    # file *name* that lacks it (the temporary name does)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    return path


def load_image_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """``arr_0`` (uint8 ``[N, H, W, C]``) and the labels of an ADM-format sample/image file.

    Labels come from ``labels`` (the format of ``dar sample``) or, failing that, ``arr_1`` when it is
    an integer vector of length N (the format of ADM's ``image_sample.py`` for class-conditional models).
    """
    with _open_npz(path) as archive:
        if "arr_0" not in archive.files:
            raise ValueError(f"{path}: no arr_0 array (expected ADM format: arr_0 = uint8 images [N, H, W, C])")
        images = archive["arr_0"]
        labels = None
        for key in ("labels", "arr_1"):
            if key in archive.files:
                candidate = archive[key]
                if candidate.ndim == 1 and len(candidate) == len(images) and np.issubdtype(candidate.dtype, np.integer):
                    labels = candidate.astype(np.int64)
                    break
                if key == "labels":
                    raise ValueError(
                        f"{path}: 'labels' must be an integer vector of length {len(images)}, "
                        f"got {candidate.dtype} {candidate.shape}"
                    )
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"{path}: arr_0 must be uint8 images [N, H, W, C] with C = 1 or 3, got {images.dtype} {images.shape}"
        )
    return images, labels


def builtin_images(split: str) -> np.ndarray:
    """uint8 NHWC images of the built-in Fashion-MNIST subset, exactly as the model sees them (32x32)."""
    from dar.data import make_dataset, to_uint8

    return to_uint8(make_dataset("builtin", split=split).images).numpy()


def stored_extractor_name(path: str | Path) -> str | None:
    """The extractor recorded in a file written by :func:`save_reference`; ``None`` for any other file."""
    with _open_npz(path) as archive:
        if "meta" not in archive.files:
            return None
        return json.loads(str(archive["meta"][()]))["extractor"]["name"]


def reference_images(source: str | Path) -> tuple[int | None, tuple[int, ...] | None]:
    """``(number, [H, W, C])`` of the images behind a reference, ``None`` for what is not known (ADM
    statistics record neither; older ``--make-ref`` files no shape). Reads array headers and the
    ``meta`` record only: no image is loaded and no feature computed."""
    if str(source) in BUILTIN_REFERENCES:
        raw, _, _ = load_builtin_arrays(str(source).removeprefix("builtin-"))
        return len(raw), (PADDED_SIZE, PADDED_SIZE, 1)  # as builtin_images() pads them
    path = Path(source)
    with _open_npz(path) as archive:
        if "meta" in archive.files:
            meta = json.loads(str(archive["meta"][()]))
            shape = meta.get("image_shape")
            return meta.get("num_images"), tuple(shape) if shape is not None else None
        if "arr_0" not in archive.files:
            return None, None
    shape = _npz_array_shape(path, "arr_0")
    return shape[0], tuple(shape[1:])


def _npz_array_shape(path: Path, key: str) -> tuple[int, ...]:
    """Shape of one array in an .npz, from its .npy header (a 50k-image reference is ~10 GB)."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as f:
            npy = np.lib.format
            version = npy.read_magic(f)
            shape, _, _ = (npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0)(f)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: cannot read the header of {key} ({type(e).__name__}: {e})") from e
    return tuple(shape)


def load_reference(
    source: str | Path,
    extractor: FeatureExtractor,
    *,
    batch_size: int | None = None,
    progress: bool = False,
) -> ReferenceStatistics:
    """Reference statistics for ``extractor`` from a built-in name or an ``.npz`` (see module docstring)."""
    if str(source) in BUILTIN_REFERENCES:
        key = (str(source), extractor.name, extractor.weights_sha256)
        if key not in _BUILTIN_CACHE:
            split = str(source).removeprefix("builtin-")
            _BUILTIN_CACHE[key] = make_reference(
                builtin_images(split), extractor, f"{source} (built-in Fashion-MNIST subset, {split} split)",
                batch_size=batch_size, progress=progress,
            )  # fmt: skip
        return _BUILTIN_CACHE[key]  # shared, together with its k-NN radii once computed: never modify it

    path = Path(source)
    with _open_npz(path) as archive:
        keys = set(archive.files)
        meta = json.loads(str(archive["meta"][()])) if "meta" in keys else None
        stored = {k: archive[k] for k in ("mu", "sigma", "mu_s", "sigma_s", "features") if k in keys}
    sha = file_sha256(path)

    if meta is not None:  # written by save_reference
        if meta.get("format") != REFERENCE_FORMAT:
            raise ValueError(f"{path}: unknown reference format {meta.get('format')!r} (expected {REFERENCE_FORMAT})")
        reference = ReferenceStatistics(
            description=str(path),
            extractor=meta["extractor"]["name"],
            weights_sha256=meta["extractor"]["weights_sha256"],
            mu=stored["mu"],
            sigma=stored["sigma"],
            mu_spatial=stored.get("mu_s"),
            sigma_spatial=stored.get("sigma_s"),
            features=stored.get("features"),
            num_images=meta.get("num_images"),
            image_shape=tuple(meta["image_shape"]) if meta.get("image_shape") is not None else None,
            statistics_source=f"stored by dar eval --make-ref ({meta.get('description')})",
            file_sha256=sha,
        )
        reference.check_compatible(extractor)
        return reference

    has_images = "arr_0" in keys
    use_stored = "mu" in stored and extractor.name == "inception"
    if not has_images and not use_stored:
        if "mu" in stored:
            raise ValueError(
                f"{path}: holds only Inception statistics (ADM format) and no images, so it cannot serve the "
                f"{extractor.name!r} extractor"
            )
        raise ValueError(f"{path}: neither images (arr_0) nor statistics (mu, sigma) found; keys: {sorted(keys)}")

    computed = None
    if has_images:
        images, _ = load_image_npz(path)
        computed = make_reference(images, extractor, str(path), batch_size=batch_size, progress=progress)
        computed.file_sha256 = sha
        if not use_stored:
            return computed
    # ADM's evaluator prefers statistics stored in the reference batch; so do we, for comparable numbers.
    # They come from ADM's TensorFlow graph, not from our weights, hence weights_sha256=None.
    return ReferenceStatistics(
        description=str(path),
        extractor="inception",
        weights_sha256=None,
        mu=stored["mu"],
        sigma=stored["sigma"],
        mu_spatial=stored.get("mu_s"),
        sigma_spatial=stored.get("sigma_s"),
        features=computed.features if computed is not None else None,
        num_images=computed.num_images if computed is not None else None,
        image_shape=computed.image_shape if computed is not None else None,
        statistics_source="mu/sigma stored in the file (ADM reference batch, TensorFlow Inception graph)"
        + ("; precision/recall/KID points computed from its arr_0 images" if computed is not None else ""),
        file_sha256=sha,
    )


@contextlib.contextmanager
def _open_npz(path: str | Path) -> Iterator[np.lib.npyio.NpzFile]:
    """``np.load`` of an .npz with pickles disabled and a clear error for unreadable files."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"file not found: {path}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{path}: cannot read as .npz ({type(e).__name__}: {e})") from e
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: expected an .npz archive, found a single .npy array")
    with archive:
        yield archive
