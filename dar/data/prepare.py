"""Encoding an image folder (ImageNet train layout) or an ADM ``.npz`` with a VAE into the sharded latents
that ``data.name=latents`` trains on (format: :mod:`dar.data.latents`); ``dar prepare-latents`` runs it.

The job is resumable and multi-process: shard ``k`` covers source images ``[k*S, (k+1)*S)``, is written
under a temporary name and renamed, and belongs to process ``k % world_size``; a rerun of the same job
keeps every finished shard (after checking it), removes what a killed write left, and encodes the rest.
``manifest.json`` is written last, by the main process, once every shard exists.

With an image encoder (``--repa-encoder``), the encoder features of every stored example (same image, same
flip, same order) are written beside each latent shard, in ``DIR/repa/<set>/`` (format and reader:
:mod:`dar.data.encoders.cache`), shard by shard like the latents and resumable the same way. They are not
part of the latents' request: a rerun that adds an encoder to a finished directory keeps its latents and
only computes the features (the images are decoded again, the VAE is not run).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from dar.data.latents import (
    FORMAT,
    FORMAT_VERSION,
    IMAGE_LIST_NAME,
    MANIFEST_NAME,
    REQUEST_NAME,
    STORED_DTYPE_NAME,
    TEMP_PATTERN,
    data_names,
    read_shard_header,
    shard_name,
)
from dar.files import atomic_path, atomic_write_text, check_free_space, job_directory_lock
from dar.seeds import Stream, seeded_generator

DEFAULT_SHARD_SIZE = 10_000  # source images: 320 MB of fp16 moments at 256 px (640 MB with --flip)
PLAIN_PROGRESS_EVERY_S = 30.0


# ---------------------------------------------------------------------------------------------
# Sources: an image folder or an ADM .npz, as model-space [3, R, R] images with labels
# ---------------------------------------------------------------------------------------------


def source_kind(source: str | Path) -> str:
    path = Path(source)
    if path.is_dir():
        return "imagefolder"
    if path.is_file() and path.suffix == ".npz":
        return "npz"
    if not path.exists():
        raise ValueError(f"source {path} does not exist")
    raise ValueError(f"source {path} is neither an image folder (one sub-folder per class) nor an ADM .npz file")


class FolderSource:
    """ImageFolderDataset's scan (unreadable files found before anything is encoded) and ADM crop."""

    kind = "imagefolder"

    def __init__(self, root: Path, resolution: int, bad_images: str):
        from dar.data.datasets import ImageFolderDataset

        self.dataset = ImageFolderDataset(root, resolution, bad_images)
        self.labels = self.dataset.labels
        self.class_names = self.dataset.class_names
        self.skipped = [{"path": str(p.relative_to(root)), "reason": _why_unreadable(p)} for p in self.dataset.skipped]
        # the list's identity: sorted relative paths, sizes and labels, as written to images.txt
        self.listing = "".join(f"{path.relative_to(root)}\t{path.stat().st_size}\t{label}\n"
                               for path, label in self.dataset.samples)
        self.sha256 = hashlib.sha256(self.listing.encode()).hexdigest()

    def __len__(self) -> int:
        return len(self.dataset)

    def name(self, i: int) -> str:
        return str(self.dataset.samples[i][0].relative_to(self.dataset.root))

    def load(self, i: int):
        return self.dataset[i][0]  # raises ValueError naming the file when it cannot be decoded


class NpzSource:
    """ADM sample format: ``arr_0`` uint8 ``[N, H, W, 3]``, labels in ``labels`` or ``arr_1`` (else all 0).
    Images are read through a memory map when the archive stores them uncompressed (as np.savez does)."""

    kind = "npz"

    def __init__(self, path: Path, resolution: int):
        from dar.provenance import file_sha256

        self.path, self.resolution = path, resolution
        self.images = _npz_array(path, "arr_0")
        if self.images is None or self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            found = "no arr_0" if self.images is None else f"{self.images.dtype} {self.images.shape}"
            raise ValueError(f"{path}: expected arr_0 uint8 [N, H, W, 3] (ADM format), found {found}")
        labels = _npz_array(path, "labels")
        labels = _npz_array(path, "arr_1") if labels is None else labels
        n = len(self.images)
        if n == 0:
            raise ValueError(f"{path}: arr_0 holds no images")
        labels = np.zeros(n, dtype=np.int64) if labels is None else np.array(labels, dtype=np.int64)
        self.labels = torch.from_numpy(labels)
        if self.labels.shape != (n,) or (n and self.labels.min() < 0):
            raise ValueError(f"{path}: labels must be {n} non-negative integers, found {tuple(self.labels.shape)}")
        self.class_names = [str(c) for c in range(int(self.labels.max()) + 1 if n else 1)]
        self.skipped: list[dict] = []
        self.listing = None
        self.sha256 = file_sha256(path)

    def __len__(self) -> int:
        return len(self.images)

    def name(self, i: int) -> str:
        return f"{self.path}[{i}]"

    def load(self, i: int):
        from PIL import Image

        from dar.data.datasets import center_crop_arr
        from dar.data.images import uint8_to_model

        pixels = np.array(self.images[i])  # a copy: the memory map is read-only
        if pixels.shape[:2] != (self.resolution, self.resolution):
            pixels = center_crop_arr(Image.fromarray(pixels), self.resolution)  # as ADM crops folders
        return uint8_to_model(pixels.transpose(2, 0, 1))


def open_source(source: str | Path, resolution: int, bad_images: str):
    path = Path(source)
    if source_kind(path) == "imagefolder":
        return FolderSource(path, resolution, bad_images)
    return NpzSource(path, resolution)


def _why_unreadable(path: Path) -> str:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:  # PIL reports bad files as many types
        return str(error) or type(error).__name__
    return "unreadable"


def _npz_array(path: Path, name: str):
    """Array ``name`` of an .npz, memory-mapped when stored uncompressed (an ImageNet-sized arr_0 does not
    fit in memory), else read; None when absent."""
    try:
        with zipfile.ZipFile(path) as archive:
            member = f"{name}.npy"
            if member not in archive.namelist():
                return None
            info = archive.getinfo(member)
            if info.compress_type != zipfile.ZIP_STORED:
                with archive.open(member) as handle:
                    return np.lib.format.read_array(handle, allow_pickle=False)
        with open(path, "rb") as handle:
            handle.seek(info.header_offset + 26)  # the local file header: 26 fixed bytes, then two lengths
            name_length, extra_length = struct.unpack("<HH", handle.read(4))
            handle.seek(name_length + extra_length, os.SEEK_CUR)
            version = np.lib.format.read_magic(handle)
            readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in readers:
                raise ValueError(f"unsupported .npy version {version}")
            shape, fortran, dtype = readers[version](handle)
            if dtype.hasobject:
                raise ValueError(f"{name} holds Python objects")
            offset = handle.tell()
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
    except (zipfile.BadZipFile, OSError, ValueError, struct.error) as error:
        raise ValueError(f"{path}: cannot read {name} as an .npz array ({error})") from None


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What decides the stored numbers: a rerun into the same directory must repeat them."""

    resolution: int
    flip: bool
    store: str
    shard_size: int
    seed: int | None  # --store samples only

    @property
    def copies(self) -> int:
        return 2 if self.flip else 1


def default_repa_grid(vae, resolution: int) -> int:
    """The encoder token grid that matches a /2 latent model: half the latent side (256 px -> 32 -> 16)."""
    return max(1, _latent_shape(vae, resolution)[-1] // 2)


class _FeatureSet:
    """The encoder features stored beside a latent directory's shards: shard ``k``'s rows in
    ``repa/<set>/shard_k.f16`` + its sidecar, keyed by the set and the rows of latent shard ``k``."""

    def __init__(self, out: Path, encoder, request: dict):
        from dar.data.encoders.cache import FEATURES_DIR, feature_set_name, set_key

        self.encoder = encoder
        self.key = set_key(encoder, request)
        self.directory = out / FEATURES_DIR / feature_set_name(encoder)
        self.row_shape = (1, encoder.grid * encoder.grid, encoder.dim)

    def file(self, k: int) -> Path:
        return self.directory / shard_name(k).replace(".safetensors", ".f16")

    def shard_key(self, k: int, lo: int, hi: int, index: torch.Tensor, flipped: torch.Tensor) -> dict:
        from dar.data.encoders.cache import shard_feature_key

        return shard_feature_key(self.key, k, [lo, hi], index, flipped)

    def problem(self, out: Path, shard: tuple, settings: "Settings", report: bool) -> str:
        """"" when shard ``(k, lo, hi)``'s features exist, intact and aligned with its (valid) latent shard."""
        from dar.data.encoders.cache import check_feature_file

        k, lo, hi = shard
        header = read_shard_header(out / shard_name(k), settings.store)
        key = self.shard_key(k, lo, hi, header["index"], header["flipped"])
        _, problem = check_feature_file(self.file(k), key, (len(header["index"]), *self.row_shape))
        if problem and problem != "missing" and report:
            print(f"{self.file(k)}: {problem}; recomputing it", file=sys.stderr)
        return problem

    def missing_bytes(self, lo: int, hi: int, settings: "Settings") -> int:
        return (hi - lo) * settings.copies * int(np.prod(self.row_shape)) * 2


def prepare_latents(source: str | Path, out: str | Path, vae, env, settings: Settings,
                    bad_images: str = "error", batch_size: int = 64, workers: int = 4,
                    progress: bool = True, encoder=None) -> dict | None:
    """Encode ``source`` into ``out``; every process of the job calls this. Returns the manifest on rank 0
    (None elsewhere). ``encoder`` (a :class:`dar.data.encoders.ImageEncoder`): also store its features of
    every stored example."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    latent_shape = _latent_shape(vae, settings.resolution)
    src = open_source(source, settings.resolution, bad_images)  # 'error': unreadable files stop us here
    vae_record = _vae_identity(vae)
    request = {"format": FORMAT, "format_version": FORMAT_VERSION, "source": {"kind": src.kind, "sha256": src.sha256},
               "vae": {k: vae_record[k] for k in ("weights_sha256", "config", "dtype")},
               "scale_factor": vae.scale_factor, **asdict(settings)}
    n = len(src)
    shards = [(k, lo, min(lo + settings.shard_size, n)) for k, lo in enumerate(range(0, n, settings.shard_size))]
    features = None if encoder is None else _FeatureSet(out, encoder, request)
    with job_directory_lock(out, "dar prepare-latents", env):
        if env.is_main:
            _check_request(out, request)
            for leftover in out.glob(TEMP_PATTERN):
                leftover.unlink(missing_ok=True)
            if features is not None:
                features.directory.mkdir(parents=True, exist_ok=True)
                for leftover in features.directory.glob(".shard_*.f16.tmp-*"):
                    leftover.unlink(missing_ok=True)
            if src.listing is not None:

                atomic_write_text(out / IMAGE_LIST_NAME, src.listing)
            _prepare_directory(out, shards, src, settings, latent_shape, features)
        env.barrier()  # leftovers are gone and the request is recorded before anyone writes
        mine = [s for s in shards if s[0] % env.world_size == env.rank]
        todo = []  # (shard, latents to encode, features to encode)
        for shard in mine:
            latents = bool(_shard_problem(out, shard, src, settings, latent_shape, report=True))
            feats = features is not None and (latents or bool(features.problem(out, shard, settings, report=True)))
            if latents or feats:
                todo.append((shard, latents, feats))
        _encode(out, todo, src, vae, settings, latent_shape, bad_images, batch_size, workers,
                _Progress(sum(hi - lo for _, lo, hi in mine), sum(hi - lo for (_, lo, hi), _, _ in todo),
                          progress and env.is_main, env.world_size), features)
        env.barrier()
        if not env.is_main:
            return None
        how = {"bad_images": bad_images, "batch_size": batch_size, "device": str(env.device),
               "world_size": env.world_size}  # not in the request: they change the floats, not the data
        if features is not None:
            _write_feature_set(out, shards, settings, features)
        return _write_manifest(out, shards, src, vae, vae_record, settings, latent_shape, how)


def _latent_shape(vae, resolution: int) -> tuple[int, int, int]:
    config = vae.model.config
    factor = 2 ** (len(config.block_out_channels) - 1)  # each down block but the last halves the side
    if resolution % factor:
        raise ValueError(f"--resolution {resolution} is not a multiple of the VAE's downsampling factor {factor}")
    return (int(config.latent_channels), resolution // factor, resolution // factor)


def _vae_identity(vae) -> dict:
    """vae.record() with the folder's absolute path, after a warning if the scale factor given differs
    from the one the VAE's config names."""
    record = vae.record()
    if Path(record["source"]).exists():
        record["source"] = str(Path(record["source"]).resolve())
    configured = record["config"].get("scaling_factor")
    if configured is not None and abs(configured - vae.scale_factor) > 1e-9:
        print(f"warning: --scale-factor {vae.scale_factor} differs from the VAE config's scaling_factor "
              f"{configured}; the manifest records {vae.scale_factor}", file=sys.stderr)
    return record


def _check_request(out: Path, request: dict) -> None:
    """Finished shards are reused only by the same request; anything else would mix two data sets."""

    path = out / REQUEST_NAME
    request = json.loads(json.dumps(request))  # tuples -> lists, as stored
    if not path.exists():
        foreign = sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors" or p.name == MANIFEST_NAME)
        if foreign:
            raise ValueError(f"{out} holds {', '.join(foreign[:3])} but no {REQUEST_NAME}: not a directory this "
                             "command made; use another --out directory")
        atomic_write_text(path, json.dumps(request, indent=2))
        return
    try:
        previous = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is unreadable ({error}); use another --out directory") from None
    if previous != request:
        changed = sorted(k for k in set(previous) | set(request)
                         if not isinstance(previous, dict) or previous.get(k) != request.get(k))
        raise ValueError(f"{out} holds latents made with different settings or inputs ({', '.join(changed)}); "
                         "use another --out directory, or the original settings to continue")


def _prepare_directory(out: Path, shards: list, src, settings: Settings, latent_shape: tuple,
                       features: _FeatureSet | None = None) -> None:
    """Rank 0, before any shard is written: a manifest that no longer describes the shards goes first,
    and the disk must hold what is left to write."""
    from dar.data.encoders.cache import SET_MANIFEST

    missing = [s for s in shards if _shard_problem(out, s, src, settings, latent_shape, report=False)]
    needed = 0
    if missing:
        (out / MANIFEST_NAME).unlink(missing_ok=True)
        per_example = int(np.prod(latent_shape)) * 2 * len(data_names(settings.store)) + 17
        needed = sum(hi - lo for _, lo, hi in missing) * settings.copies * per_example
    if features is not None:
        no_features = [s for s in shards if s in missing or features.problem(out, s, settings, report=False)]
        if no_features:
            (features.directory / SET_MANIFEST).unlink(missing_ok=True)
            needed += sum(features.missing_bytes(lo, hi, settings) for _, lo, hi in no_features)
    if needed:
        check_free_space(out, needed, "the latents" + (" and their encoder features" if features else ""))


def _expected_rows(lo: int, hi: int, skipped: set[int], src, settings: Settings) -> dict:
    kept = torch.tensor([i for i in range(lo, hi) if i not in skipped], dtype=torch.int64)
    index = kept.repeat_interleave(settings.copies)
    flipped = torch.tensor([False, True], dtype=torch.bool).repeat(len(kept)) if settings.flip \
        else torch.zeros(len(kept), dtype=torch.bool)
    return {"index": index, "flipped": flipped, "labels": src.labels[index]}


def _shard_problem(out: Path, shard: tuple, src, settings: Settings, latent_shape: tuple, report: bool) -> str:
    """"" when shard ``(k, lo, hi)`` exists and holds exactly its examples; otherwise why not (reported
    on stderr when ``report`` and the file exists: it is recomputed)."""
    k, lo, hi = shard
    path = out / shard_name(k)
    if not path.exists():
        return "missing"
    try:
        header = read_shard_header(path, settings.store)
        meta = header["meta"]
        if (meta.get("version"), meta.get("shard"), meta.get("images")) != (FORMAT_VERSION, k, [lo, hi]):
            raise ValueError(f"it is shard {meta.get('shard')} of images {meta.get('images')}, "
                             f"expected shard {k} of [{lo}, {hi}]")
        expected = _expected_rows(lo, hi, {int(i) for i, _ in meta.get("skipped", [])}, src, settings)
        for name, tensor in expected.items():
            if not (header[name].dtype == tensor.dtype and header[name].shape == tensor.shape
                    and bool((header[name] == tensor).all())):
                raise ValueError(f"its '{name}' are not the expected ones")
        for name, (shape, dtype) in header["data"].items():
            if shape != (len(expected["index"]), *latent_shape) or dtype != "F16":
                raise ValueError(f"its '{name}' is {dtype} {list(shape)}, expected F16 "
                                 f"{[len(expected['index']), *latent_shape]}")
    except ValueError as error:
        if report:
            print(f"{path}: {str(error).removeprefix(f'{path}: ')}; recomputing it", file=sys.stderr)
        return str(error)
    return ""


def _sample_generator(seed: int, index: int):
    """The generator of source image ``index``'s stored samples: independent of batching and ranks."""
    return seeded_generator(seed, index, Stream.PREPARED_LATENT_SAMPLES)


def _encode(out: Path, todo: list, src, vae, settings: Settings, latent_shape: tuple, bad_images: str,
            batch_size: int, workers: int, progress: "_Progress", features: _FeatureSet | None = None) -> None:
    from dar.data.encoders.cache import feature_writer, sidecar_of, write_sidecar
    from dar.data.latents import save_shard

    chunk = max(1, batch_size // settings.copies)  # source images per VAE call
    try:
        with ThreadPoolExecutor(workers) as pool:
            for (k, lo, hi), need_latents, need_features in todo:
                keep_skipped = None
                if not need_latents:  # features only: exactly the rows of the finished latent shard
                    header = read_shard_header(out / shard_name(k), settings.store)
                    keep_skipped = {int(i) for i, _ in header["meta"].get("skipped", [])}
                with contextlib.ExitStack() as stack:
                    writer = None
                    if need_features:
                        sidecar_of(features.file(k)).unlink(missing_ok=True)
                        writer = stack.enter_context(feature_writer(features.file(k), features.row_shape))
                    tensors, skipped = _encode_shard(lo, hi, src, vae if need_latents else None, settings,
                                                     latent_shape, bad_images, chunk, pool, progress,
                                                     features.encoder if need_features else None, writer,
                                                     keep_skipped)
                if need_features:  # first the features, then the latent shard they are aligned with
                    write_sidecar(features.file(k), features.shard_key(k, lo, hi, tensors["index"], tensors["flipped"]),
                                  writer, {"latent_shard": shard_name(k)})
                if need_latents:
                    meta = {"format": FORMAT, "version": FORMAT_VERSION, "shard": k, "images": [lo, hi],
                            "store": settings.store, "flip": settings.flip, "skipped": skipped}
                    with atomic_path(out / shard_name(k)) as tmp:  # a kill leaves a temporary file, never a torn shard
                        save_shard(tmp, tensors, meta)
    finally:
        progress.close()


def _load(src, i: int, left_out: set | None = None):
    """(image, None), or (None, why) when the file cannot be decoded (or was left out before)."""
    if left_out is not None and i in left_out:
        return None, "left out when the latents were made"
    try:
        return src.load(i), None
    except ValueError as error:
        return None, str(error)


def _encode_shard(lo: int, hi: int, src, vae, settings: Settings, latent_shape: tuple, bad_images: str,
                  chunk: int, pool, progress: "_Progress", encoder=None, writer=None,
                  left_out: set | None = None) -> tuple[dict, list]:
    """Shard [lo, hi)'s tensors and the images left out. The next chunk's images are decoded (threads)
    while the VAE encodes this one. ``vae`` None: no latents (features only); ``encoder``: its features of
    every stored example go to ``writer``, in the latents' order. ``left_out``: the images a finished
    latent shard left out (they are not read; any other image must decode)."""
    parts: dict[str, list] = {name: [] for name in data_names(settings.store)}
    skipped: list[list] = []
    starts = list(range(lo, hi, chunk))
    load_chunk = lambda start: pool.map(lambda i: _load(src, i, left_out), range(start, min(start + chunk, hi)))  # noqa: E731
    pending = load_chunk(starts[0])
    for n, start in enumerate(starts):
        loaded = list(pending)
        if n + 1 < len(starts):
            pending = load_chunk(starts[n + 1])
        ids = [i for i, (image, _) in zip(range(start, hi), loaded) if image is not None]
        for i, (image, why) in zip(range(start, hi), loaded):
            if image is None and left_out is not None:
                if i not in left_out:
                    raise ValueError(f"{why}; its latent is stored, so its features cannot be left out: restore "
                                     "the file, or recompute the latents into a new --out directory")
                skipped.append([i, why])
                continue
            if image is None and bad_images == "error":
                raise ValueError(f"{why}; rerun with --bad-images skip to leave it out (finished shards are kept)")
            if image is None:
                print(f"leaving out {src.name(i)}: {why}", file=sys.stderr)
                skipped.append([i, why])
        if ids:
            x = torch.stack([image for image, _ in loaded if image is not None])
            if settings.flip:  # example 2j: image j; 2j + 1: its mirror image
                x = torch.stack([x, x.flip(-1)], 1).flatten(0, 1)
            if writer is not None:
                writer.append(encoder(x)[:, None])  # [n, 1, tokens, dim]: one row per stored example
            if vae is None:
                progress.update(len(loaded))
                continue
            mean, std = (t.cpu() for t in vae.encode_moments(x))
            if settings.store == "moments":
                # fp16 std: where it falls below fp16's normal range (6e-5) its rounding error is far
                # below the mean's own, so nothing the model sees changes
                parts["mean"].append(mean.half())
                parts["std"].append(std.half())
            else:
                draws = (settings.copies, *latent_shape)  # one generator per source image: batching never matters
                eps = torch.cat([torch.randn(draws, generator=_sample_generator(settings.seed, i)) for i in ids])
                parts["latents"].append((mean + std * eps).half())
        progress.update(len(loaded))
    tensors = {name: torch.cat(p) if p else torch.zeros((0, *latent_shape), dtype=torch.float16)
               for name, p in parts.items()}
    return {**tensors, **_expected_rows(lo, hi, {i for i, _ in skipped}, src, settings)}, skipped


def _write_feature_set(out: Path, shards: list, settings: Settings, features: _FeatureSet) -> None:
    """Rank 0, after every rank finished: check every feature shard once more, then write the set's
    features.json (its presence means the set is complete)."""
    from dar.data.encoders.cache import FORMAT as FEATURE_FORMAT, FORMAT_VERSION as FEATURE_VERSION, SET_MANIFEST
    from dar.data.encoders.cache import sidecar_of

    entries = []
    for shard in shards:
        k = shard[0]
        problem = features.problem(out, shard, settings, report=False)
        if problem:
            raise ValueError(f"{features.file(k)}: {problem}; rerun the same command to recompute it")
        sidecar = json.loads(sidecar_of(features.file(k)).read_text())
        entries.append({"file": features.file(k).name, "latent_shard": shard_name(k), "examples": sidecar["shape"][0],
                        "sha256": sidecar["sha256"]})
    record = {"format": FEATURE_FORMAT, "version": FEATURE_VERSION, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
              "key": features.key, "encoder": features.encoder.record(), "tokens": features.row_shape[1],
              "dim": features.row_shape[2], "dtype": "float16", "shards": entries}
    atomic_write_text(features.directory / SET_MANIFEST, json.dumps(record, indent=2))


def _feature_sets(out: Path) -> dict:
    """The complete encoder feature sets of ``out`` (for the manifest; readers check each set's own files)."""
    from dar.data.encoders.cache import FEATURES_DIR, SET_MANIFEST

    sets = {}
    for path in sorted((out / FEATURES_DIR).glob(f"*/{SET_MANIFEST}")):
        try:
            key = json.loads(path.read_text())["key"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            continue
        sets[path.parent.name] = {"dir": str(path.parent.relative_to(out)),
                                  **{k: key.get(k) for k in ("encoder", "weights_sha256", "grid", "dim", "resolution")}}
    return sets


def _write_manifest(out: Path, shards: list, src, vae, vae_record: dict, settings: Settings, latent_shape: tuple,
                    how: dict) -> dict:
    """Rank 0, after every rank finished: check every shard once more, hash it, write manifest.json last."""
    from dar.provenance import file_sha256, package_versions

    entries, skipped = [], list(src.skipped)
    for shard in shards:
        k, lo, hi = shard
        problem = _shard_problem(out, shard, src, settings, latent_shape, report=False)
        if problem:  # changed on disk after its rank wrote or checked it
            raise ValueError(f"{out / shard_name(k)}: {problem}; rerun the same command to recompute it")
        header = read_shard_header(out / shard_name(k), settings.store)
        skipped += [{"index": int(i), "path": src.name(int(i)), "reason": why} for i, why in header["meta"]["skipped"]]
        entries.append({"file": shard_name(k), "images": [lo, hi], "examples": len(header["index"]),
                        "sha256": file_sha256(out / shard_name(k))})
    try:
        import diffusers

        versions = {**package_versions(), "diffusers": diffusers.__version__}
    except ImportError:
        versions = package_versions()
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "store": settings.store, "dtype": STORED_DTYPE_NAME, "stored_scaled": False,
        "scale_factor": vae.scale_factor, "resolution": settings.resolution, "flip": settings.flip,
        "seed": settings.seed, "shard_size": settings.shard_size, "latent_shape": list(latent_shape),
        "count": sum(e["examples"] for e in entries), "class_names": list(src.class_names),
        "source": {"path": str(Path(src.path if src.kind == "npz" else src.dataset.root).resolve()),
                   "kind": src.kind, "sha256": src.sha256, "images": len(src),
                   "list_file": IMAGE_LIST_NAME if src.listing is not None else None,
                   "bad_images": how["bad_images"], "skipped": skipped},
        "vae": vae_record,
        "shards": entries,
        "encoding": {k: how[k] for k in ("batch_size", "device", "world_size")},  # of the last run
        "versions": versions,
    }
    repa = _feature_sets(out)
    if repa:  # encoder features stored beside the latents (not part of the latents' identity)
        manifest["repa_features"] = repa
    if settings.store == "samples":
        manifest["sample_rng"] = (f"image i: numpy SeedSequence([seed, {int(Stream.PREPARED_LATENT_SAMPLES)}, i]) -> torch.Generator, "
                                  "eps = randn([copies, C, h, w]) (copy 1: the flipped image)")
    atomic_write_text(out / MANIFEST_NAME, json.dumps(manifest, indent=2))
    return manifest


class _Progress:
    """images/s: a tqdm bar on a terminal, a plain line every 30 s otherwise (logs of batch jobs)."""

    def __init__(self, total: int, todo: int, enabled: bool, world_size: int):
        self.total, self.done, self.bar = total, total - todo, None
        self.plain = enabled and not sys.stderr.isatty()
        self.what = "images" + (f" (rank 0 of {world_size})" if world_size > 1 else "")
        self.started = self.last = time.perf_counter()
        self.start_done = self.done
        if enabled and not self.plain:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=self.done, unit="img", dynamic_ncols=True, desc="encoding")

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.plain and (time.perf_counter() - self.last >= PLAIN_PROGRESS_EVERY_S or self.done == self.total):
            self.last = time.perf_counter()
            rate = (self.done - self.start_done) / max(self.last - self.started, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            print(f"[dar] prepare-latents: {self.done:,}/{self.total:,} {self.what}, {rate:.1f} images/s, "
                  f"eta {int(eta // 60)}m{int(eta % 60):02d}s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
