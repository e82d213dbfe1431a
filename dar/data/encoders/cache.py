"""Encoder features of a fixed data set, computed once and read from disk by every REPA training step.

A feature file is raw little-endian float16 rows (``<name>.f16``, memory-mapped when read) plus a JSON
sidecar (``<name>.json``) holding its key, shape, dtype and checksums:

* ``sha256``: of the whole file, computed while it is written;
* ``sample_sha256``: of a fixed sample of rows (up to :data:`SAMPLE_ROWS`, evenly spaced, first and last
  included).

Reading checks the sidecar's key against the one asked for, the file's size against the shape, and a
checksum: the full one for files up to :data:`FULL_CHECK_BYTES` (the built-in data's 344 MB take ~0.4 s),
the row sample beyond (ImageNet-sized files, hundreds of GB, cannot be hashed at every start; a torn or
truncated file still fails the size check).

Two places hold feature files:

* :func:`dataset_features` on a pixel data set: one cache file per key {encoder, weights, preprocessing,
  resolution, grid, dim, data set fingerprint and length, flips} under ``cache_dir``, named by the key's
  hash, of shape ``[N, 1 or 2, tokens, dim]`` (copy 1: the horizontally flipped image's features, computed
  by flipping the image). It is computed under a lock on ``cache_dir`` (a second process waits, then
  reads), written under a temporary name and renamed, and recomputed, with a message, when it fails a check.
* ``dar prepare-latents --repa-encoder`` (:mod:`dar.data.prepare`): the features of every stored latent
  (same order, same flip), one file per latent shard ``[n, 1, tokens, dim]`` in ``DIR/repa/<set>/``, with
  ``features.json`` written last; :func:`dataset_features` on that latent set reads them (they cannot be
  recomputed without the source images: a missing or damaged set is an error naming the command that
  makes it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from dar.data.encoders.base import ImageEncoder, MissingEncoderFiles
from dar.files import atomic_path, atomic_write_text, check_free_space, try_directory_lock

FORMAT = "dar-repa-features"
FORMAT_VERSION = 1
DTYPE = np.dtype("<f2")
SAMPLE_ROWS = 64
FULL_CHECK_BYTES = 1 << 30
WAIT_POLL_S = 2.0
FEATURES_DIR = "repa"  # inside a prepared latent directory
SET_MANIFEST = "features.json"
SET_REQUEST = "request.json"


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Feature files: raw float16 rows + a JSON sidecar
# ---------------------------------------------------------------------------------------------


def sidecar_of(data: Path) -> Path:
    return data.with_suffix(".json")


def temp_pattern(data: Path) -> str:
    """What :func:`dar.files.atomic_path` leaves of ``data`` when its writer is killed."""
    return f".{data.name}.tmp-*"


class _Writer:
    def __init__(self, handle, row_shape: tuple[int, ...]):
        self.handle, self.row_shape, self.rows, self.digest = handle, tuple(row_shape), 0, hashlib.sha256()

    def append(self, features: torch.Tensor) -> None:
        """Rows ``[n, *row_shape]`` (any float dtype, any device), stored as float16."""
        if tuple(features.shape[1:]) != self.row_shape:
            raise ValueError(f"feature rows {tuple(features.shape[1:])} do not match the file's {self.row_shape}")
        half = features.detach().to("cpu", torch.float16).contiguous()
        if not torch.isfinite(half).all():
            bad = "non-finite" if not torch.isfinite(features).all() else "beyond float16's range"
            raise ValueError(f"encoder features are {bad}; they cannot be stored as float16")
        data = half.numpy().astype(DTYPE, copy=False).tobytes()
        self.handle.write(data)
        self.digest.update(data)
        self.rows += len(half)


@contextlib.contextmanager
def feature_writer(data: Path, row_shape: tuple[int, ...]) -> Iterator[_Writer]:
    """Stream float16 rows to a temporary file that replaces ``data`` when the block ends without error (on
    an error it is removed: no partial file is ever left under ``data``'s name). Write the sidecar after."""
    with atomic_path(data) as tmp, open(tmp, "wb") as handle:
        yield _Writer(handle, row_shape)


def _sample_rows(count: int) -> list[int]:
    return sorted({int(i) for i in np.linspace(0, count - 1, min(count, SAMPLE_ROWS))}) if count else []


def _sample_digest(array: np.ndarray) -> str:
    digest = hashlib.sha256()
    for i in _sample_rows(len(array)):
        digest.update(np.ascontiguousarray(array[i]).tobytes())
    return digest.hexdigest()


def write_sidecar(data: Path, key: dict, writer: _Writer, extra: dict | None = None) -> dict:
    """The sidecar of the feature file ``writer`` just wrote (its sample checksum is read back from disk)."""
    shape = [writer.rows, *writer.row_shape]
    array = np.memmap(data, dtype=DTYPE, mode="r", shape=tuple(shape)) if writer.rows else np.zeros(shape, DTYPE)
    sidecar = {"format": FORMAT, "version": FORMAT_VERSION, "key": key, "shape": shape, "dtype": "float16",
               "byte_order": "little", "bytes": int(np.prod(shape)) * DTYPE.itemsize,
               "sha256": writer.digest.hexdigest(), "sample_rows": SAMPLE_ROWS,
               "sample_sha256": _sample_digest(array), **(extra or {})}
    del array
    atomic_write_text(sidecar_of(data), json.dumps(sidecar, indent=1))
    return sidecar


def check_feature_file(data: Path, key: dict, shape: tuple[int, ...], full: bool | None = None
                       ) -> tuple[dict | None, str]:
    """``(sidecar, "")`` when ``data`` and its sidecar hold the features of ``key``, float16 of ``shape``,
    intact; else ``(None, why not)``. ``full``: hash the whole file (default: when it is at most
    :data:`FULL_CHECK_BYTES`), else the sampled rows."""
    sidecar_path = sidecar_of(data)
    if not data.is_file() or not sidecar_path.is_file():
        return None, "missing"
    try:
        sidecar = json.loads(sidecar_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        return None, f"its sidecar {sidecar_path.name} is unreadable ({error})"
    if not isinstance(sidecar, dict) or (sidecar.get("format"), sidecar.get("version")) != (FORMAT, FORMAT_VERSION):
        return None, f"its sidecar {sidecar_path.name} is not a {FORMAT} v{FORMAT_VERSION} sidecar"
    if sidecar.get("key") != key:
        changed = sorted(k for k in set(key) | set(sidecar.get("key") or {}) if (sidecar.get("key") or {}).get(k) != key.get(k))
        return None, f"it was made for another key (differs in {', '.join(changed)})"
    shape = tuple(int(s) for s in shape)
    if sidecar.get("shape") != list(shape):
        return None, f"its sidecar says shape {sidecar.get('shape')}, expected {list(shape)}"
    expected = int(np.prod(shape)) * DTYPE.itemsize
    size = data.stat().st_size
    if size != expected or sidecar.get("bytes") != expected or sidecar.get("dtype") != "float16":
        return None, f"it holds {size} bytes, the sidecar's float16 {list(shape)} needs {expected} (truncated or torn)"
    if full is None:
        full = size <= FULL_CHECK_BYTES
    if full:
        digest = hashlib.sha256()
        with open(data, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        if digest.hexdigest() != sidecar.get("sha256"):
            return None, "its contents do not match the sidecar's SHA-256 (corrupted or modified)"
    elif shape[0]:
        array = np.memmap(data, dtype=DTYPE, mode="r", shape=shape)
        same = _sample_digest(array) == sidecar.get("sample_sha256")
        del array
        if not same:
            return None, "its sampled rows do not match the sidecar's checksum (corrupted or modified)"
    return sidecar, ""


# ---------------------------------------------------------------------------------------------
# The table a training step reads
# ---------------------------------------------------------------------------------------------


class FeatureTable:
    """Encoder features of a data set's items, memory-mapped from one or more feature files.

    ``lookup(indices, flipped)`` -> ``[B, tokens, dim]`` float32 (CPU) of items ``indices``, the horizontally
    flipped image's features where ``flipped[i]`` (tables computed with ``flips=True``). Reading 32 rows of
    64 x 112 costs microseconds; nothing but those rows is read. Pickles without its maps (DataLoader
    workers map the files again).
    """

    def __init__(self, path: Path, key: dict, files: list[Path], counts: list[int], copies: int, tokens: int,
                 dim: int):
        self.path, self.key, self.copies, self.tokens, self.dim = Path(path), key, copies, tokens, dim
        self.files, self.counts = [Path(f) for f in files], [int(c) for c in counts]
        self.starts = torch.tensor([0, *self.counts[:-1]], dtype=torch.int64).cumsum(0)
        self.count = sum(self.counts)
        self._maps: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.count

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state

    def _map(self, k: int) -> np.ndarray:
        if k not in self._maps:
            self._maps[k] = np.memmap(self.files[k], dtype=DTYPE, mode="r",
                                      shape=(self.counts[k], self.copies, self.tokens, self.dim))
        return self._maps[k]

    def lookup(self, indices: torch.Tensor, flipped: torch.Tensor | None = None) -> torch.Tensor:
        indices = torch.as_tensor(indices, dtype=torch.int64).reshape(-1).cpu()
        if len(indices) and (indices.min() < 0 or indices.max() >= self.count):
            raise IndexError(f"feature index out of range [0, {self.count})")
        copy = torch.zeros(len(indices), dtype=torch.int64)
        if flipped is not None:
            flipped = torch.as_tensor(flipped).reshape(-1).cpu().bool()
            if len(flipped) != len(indices):
                raise ValueError(f"{len(flipped)} flip flags for {len(indices)} indices")
            if flipped.any() and self.copies == 1:
                raise ValueError(f"{self.path} holds no flipped features (computed with flips=False)")
            copy = flipped.long()
        out = np.empty((len(indices), self.tokens, self.dim), dtype=DTYPE)
        if len(self.files) == 1:
            if len(indices):
                out[:] = self._map(0)[indices.numpy(), copy.numpy()]
        else:
            shard = torch.searchsorted(self.starts, indices, right=True) - 1
            for k in torch.unique(shard).tolist():
                rows = (shard == k).nonzero().reshape(-1).numpy()
                out[rows] = self._map(k)[(indices[rows] - self.starts[k]).numpy(), copy[rows].numpy()]
        return torch.from_numpy(out).float()


# ---------------------------------------------------------------------------------------------
# Pixel data sets: the cache
# ---------------------------------------------------------------------------------------------


def feature_key(dataset, encoder: ImageEncoder, flips: bool) -> dict:
    """What decides a data set's cached features."""
    return {"format": FORMAT, "version": FORMAT_VERSION, **encoder.identity(),
            "dataset": dataset.fingerprint(), "count": len(dataset), "flips": bool(flips)}


def _is_prepared_latents(dataset) -> bool:
    from dar.data.latents import LatentShards

    return isinstance(dataset, LatentShards)


def _images(dataset, indices: torch.Tensor) -> torch.Tensor:
    """Model-space items ``[B, C, H, W]`` (as dar.training.runtime.load_batch gathers them)."""
    if hasattr(dataset, "get_batch"):
        return dataset.get_batch(indices, None)[0]
    return torch.stack([dataset[int(i)][0] for i in indices])


@contextlib.contextmanager
def _waiting_lock(directory: Path, purpose: str) -> Iterator[None]:
    """Hold ``directory``'s lock, waiting (with one message) while another process holds it."""
    waited = False
    while True:
        with try_directory_lock(directory, purpose) as acquired:
            if acquired:
                yield
                return
        if not waited:
            print(f"waiting for another process computing features in {directory} (lock {directory / '.lock'})",
                  file=sys.stderr, flush=True)
            waited = True
        time.sleep(WAIT_POLL_S)


def dataset_features(dataset, encoder: ImageEncoder, cache_dir: str | Path, flips: bool, progress: bool = True,
                     batch_size: int = 64) -> FeatureTable:
    """The features of every item of ``dataset`` (and of its mirror image when ``flips``), from the cache
    under ``cache_dir``, computed first when missing or damaged. A ``dar prepare-latents`` directory's
    features are the ones stored at preparation (see :func:`prepared_features`)."""
    if _is_prepared_latents(dataset):
        return prepared_features(dataset, encoder, flips)
    channels = getattr(dataset, "channels", None)
    if channels is not None and channels not in (1, 3):
        raise ValueError(f"the data set's items have {channels} channels, not 1 or 3 image channels; REPA "
                         "features of latents are stored at preparation: dar prepare-latents --repa-encoder")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cache_dir = Path(cache_dir)
    key = feature_key(dataset, encoder, flips)
    shape = (len(dataset), 2 if flips else 1, encoder.grid * encoder.grid, encoder.dim)
    data = cache_dir / f"{encoder.name}-g{encoder.grid}-{key_hash(key)[:20]}.f16"
    sidecar, _ = check_feature_file(data, key, shape)
    if sidecar is not None:  # no lock needed to read: files are only ever replaced whole, by a rename
        return _table(data, key, sidecar)
    with _waiting_lock(cache_dir, f"dar REPA features {data.name}"):
        sidecar, problem = check_feature_file(data, key, shape)  # another process may have made it while we waited
        if sidecar is not None:
            return _table(data, key, sidecar)
        if problem != "missing":
            print(f"{data}: {problem}; recomputing it", file=sys.stderr, flush=True)
        sidecar_of(data).unlink(missing_ok=True)
        for leftover in cache_dir.glob(temp_pattern(data)):  # a killed writer's
            leftover.unlink(missing_ok=True)
        _compute(dataset, encoder, data, key, flips, progress, batch_size)
        sidecar, problem = check_feature_file(data, key, shape, full=True)
        if sidecar is None:
            raise RuntimeError(f"{data}: just written, but {problem}")
        return _table(data, key, sidecar)


def _table(data: Path, key: dict, sidecar: dict) -> FeatureTable:
    count, copies, tokens, dim = sidecar["shape"]
    return FeatureTable(data, key, [data], [count], copies, tokens, dim)


def _compute(dataset, encoder: ImageEncoder, data: Path, key: dict, flips: bool, progress: bool,
             batch_size: int) -> None:
    n, copies, tokens = len(dataset), 2 if flips else 1, encoder.grid * encoder.grid
    data.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(data.parent, n * copies * tokens * encoder.dim * DTYPE.itemsize, f"{encoder.name} features")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, unit="img", dynamic_ncols=True, desc=f"{encoder.name} features")
    started = time.perf_counter()
    try:
        with feature_writer(data, (copies, tokens, encoder.dim)) as writer:
            for lo in range(0, n, batch_size):
                x = _images(dataset, torch.arange(lo, min(lo + batch_size, n)))
                b = len(x)
                if flips:  # the mirror image's features: computed from the flipped image, not by flipping features
                    x = torch.cat([x, x.flip(-1)])
                features = encoder(x)
                writer.append(torch.stack([features[:b], features[b:]], 1) if flips else features[:, None])
                if bar is not None:
                    bar.update(b)
        write_sidecar(data, key, writer, {"seconds": round(time.perf_counter() - started, 1),
                                          "encoder": encoder.record()})
    finally:
        if bar is not None:
            bar.close()


# ---------------------------------------------------------------------------------------------
# Prepared latents: the features `dar prepare-latents --repa-encoder` stored beside the latents
# ---------------------------------------------------------------------------------------------


def feature_set_name(encoder: ImageEncoder) -> str:
    """The sub-directory of ``DIR/repa`` holding one encoder's features (its identity's hash in the name:
    other weights or preprocessing make another set)."""
    return f"{encoder.name}-g{encoder.grid}-{key_hash(encoder.identity())[:12]}"


def rows_digest(index: torch.Tensor, flipped: torch.Tensor) -> str:
    """Identity of a latent shard's rows: which source image, mirrored or not."""
    digest = hashlib.sha256(index.to(torch.int64).numpy().astype("<i8").tobytes())
    digest.update(flipped.to(torch.bool).numpy().tobytes())
    return digest.hexdigest()


def shard_feature_key(set_key: dict, shard: int, images: list[int], index: torch.Tensor,
                      flipped: torch.Tensor) -> dict:
    """Key of latent shard ``shard``'s feature file: the set's key, the shard and the rows it is aligned to."""
    return {**set_key, "shard": shard, "images": list(images), "rows": len(index),
            "rows_sha256": rows_digest(index, flipped)}


def set_key(encoder: ImageEncoder, manifest_or_request: dict) -> dict:
    """What a latent directory's feature set is: the encoder's identity and the latents' source and layout."""
    m = manifest_or_request
    return {"format": FORMAT, "version": FORMAT_VERSION, **encoder.identity(),
            "latents": {"source": {"kind": m["source"]["kind"], "sha256": m["source"]["sha256"]},
                        "resolution": m["resolution"], "flip": m["flip"], "shard_size": m["shard_size"]}}


def prepared_features(dataset, encoder: ImageEncoder, flips: bool) -> FeatureTable:
    """The features ``dar prepare-latents --repa-encoder`` stored for the latent set ``dataset``
    (a :class:`dar.data.latents.LatentShards`): one row per stored latent, flipped copies included."""
    from dar.data.latents import read_shard_header

    path = dataset.path
    if flips:
        raise ValueError(f"{path}: a prepared latent set is not flipped while training (its flipped copies, "
                         "made with --flip, are examples of their own); train it with data.hflip=false")
    directory = path / FEATURES_DIR / feature_set_name(encoder)
    manifest_file = directory / SET_MANIFEST
    if not manifest_file.is_file():
        sets = sorted(p.parent.name for p in (path / FEATURES_DIR).glob(f"*/{SET_MANIFEST}"))
        found = f"it holds {', '.join(sets)}" if sets else "it holds none"
        option = f" --repa-encoder-path {encoder.source}" if encoder.name != "efficientnet-lite0" else ""
        raise MissingEncoderFiles(
            f"{manifest_file} not found: the latents in {path} have no {encoder.name} features for a "
            f"{encoder.grid}x{encoder.grid} grid with these weights ({found}); add them with the `dar "
            f"prepare-latents` command that made the latents plus --repa-encoder {encoder.name}{option} "
            f"--repa-grid {encoder.grid} (finished latent shards are kept)")
    try:
        fset = json.loads(manifest_file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{manifest_file} is unreadable ({error})") from None
    key = set_key(encoder, dataset.manifest)
    fix = "rerun the `dar prepare-latents ... --repa-encoder` command that made it to recompute it"
    if fset.get("key") != key:
        raise ValueError(f"{manifest_file} describes other features or latents than {path}'s; {fix}")
    shards = dataset.manifest["shards"]
    entries = fset.get("shards") or []
    if [e.get("latent_shard") for e in entries] != [s["file"] for s in shards]:
        raise ValueError(f"{manifest_file} lists other shards than {path / 'manifest.json'}; {fix}")
    files, counts, tokens, dim = [], [], encoder.grid * encoder.grid, encoder.dim
    for entry, shard in zip(entries, shards):
        data = directory / entry["file"]
        header = read_shard_header(path / shard["file"], dataset.store)
        meta = header["meta"]
        shard_key = shard_feature_key(key, meta["shard"], meta["images"], header["index"], header["flipped"])
        sidecar, problem = check_feature_file(data, shard_key, (len(header["index"]), 1, tokens, dim))
        if sidecar is None:
            raise ValueError(f"{data}: {problem}; {fix}")
        files.append(data)
        counts.append(int(sidecar["shape"][0]))
    return FeatureTable(directory, key, files, counts, 1, tokens, dim)
