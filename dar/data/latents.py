"""Pre-computed VAE latents on disk: the format ``dar prepare-latents`` writes, and :class:`LatentShards`,
the dataset that trains on it without loading it into memory.

A latent directory holds

* ``shard_000000.safetensors``, ... : shard ``k`` covers source images ``[k*S, (k+1)*S)`` (``S`` = the
  shard size) and holds, per example, ``mean`` + ``std`` (``store=moments``) or ``latents``
  (``store=samples``), fp16 ``[n, C, h, w]``, plus ``labels`` int64, ``index`` int64 (the source image)
  and ``flipped`` bool (the horizontally flipped copy of that image). Its metadata key ``dar`` (JSON)
  names the shard, its image range and the images left out as unreadable.
* ``manifest.json``: written last, so its presence means every shard is complete; it records the VAE,
  the scale factor, the settings, the source's identity, the shards' counts and SHA-256.
* ``request.json`` (the settings a rerun must repeat), ``images.txt`` (an image folder's file list).

Latents are stored **unscaled** (the VAE's own units) and multiplied by the manifest's
``scale_factor`` when read, so that one number, recorded once, decides the scale the model sees.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

FORMAT = "dar-latents"
FORMAT_VERSION = 1
STORE_MODES: tuple[str, ...] = ("moments", "samples")
"""``moments``: the posterior's mean and std, a fresh latent drawn every time an example is used (REPA);
``samples``: one latent drawn once per example at preparation (fast-DiT), half the disk."""

MANIFEST_NAME = "manifest.json"
REQUEST_NAME = "request.json"
IMAGE_LIST_NAME = "images.txt"
STORED_DTYPE = torch.float16
STORED_DTYPE_NAME = "float16"
METADATA_KEY = "dar"  # one key: safetensors writes a metadata map in hash order, several keys would
#                       make two writes of the same shard differ byte for byte
TEMP_PATTERN = ".shard_*.safetensors.tmp-*"  # what dar.files.atomic_path leaves when a write is killed

# manifest fields that define the data (not where or when they were made): the fingerprint's input
_IDENTITY_FIELDS = ("format_version", "store", "dtype", "resolution", "flip", "shard_size", "latent_shape",
                    "scale_factor", "count", "class_names")


def data_names(store: str) -> tuple[str, ...]:
    """The per-example float tensors of a shard."""
    return ("mean", "std") if store == "moments" else ("latents",)


def shard_name(k: int) -> str:
    return f"shard_{k:06d}.safetensors"


def save_shard(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write one shard file (callers write to a temporary name and rename: see dar.files.atomic_path).
    Written through Python's open so the file gets the umask's permissions (safetensors' own writer
    makes it owner-only, which hides a shared data set from the other users of a cluster)."""
    data = save({name: t.contiguous() for name, t in tensors.items()},
                metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
    Path(path).write_bytes(data)


def read_shard_header(path: str | Path, store: str) -> dict:
    """A shard's metadata, its small tensors (``index``, ``labels``, ``flipped``) and its data tensors'
    shapes and dtypes, without reading the data. Raises ValueError naming the file when it is
    unreadable, torn (safetensors checks the file covers every tensor) or lacks a tensor."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {}).get(METADATA_KEY, "null"))
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise ValueError("it is not a dar latent shard (no 'dar' metadata)")
            missing = {"index", "labels", "flipped", *data_names(store)} - set(handle.keys())
            if missing:
                raise ValueError(f"it lacks tensor(s) {sorted(missing)}")
            small = {name: handle.get_tensor(name).clone() for name in ("index", "labels", "flipped")}
            data = {name: (tuple(handle.get_slice(name).get_shape()), handle.get_slice(name).get_dtype())
                    for name in data_names(store)}
    except (SafetensorError, OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: unreadable ({error})") from None
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return {"meta": meta, **small, "data": data}


def read_manifest(directory: str | Path) -> dict:
    """``directory/manifest.json``, checked for the fields :class:`LatentShards` relies on."""
    path = Path(directory) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: unreadable ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a dar latent manifest (format {FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format version {manifest.get('format_version')}, this dar reads "
                         f"{FORMAT_VERSION}; rerun `dar prepare-latents` into a new directory")
    missing = [k for k in (*_IDENTITY_FIELDS, "shards", "source", "vae") if k not in manifest]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}")
    if manifest["store"] not in STORE_MODES:
        raise ValueError(f"{path}: store {manifest['store']!r} is not one of {', '.join(STORE_MODES)}")
    return manifest


def manifest_identity(manifest: dict) -> dict:
    """What makes two latent sets the same data: the source's and the VAE's identity, the settings and
    the shards' contents. Paths, dates and package versions are left out, so a moved copy matches."""
    identity = {key: manifest[key] for key in _IDENTITY_FIELDS}
    identity["seed"] = manifest.get("seed") if manifest["store"] == "samples" else None
    identity["source"] = {k: manifest["source"].get(k) for k in ("kind", "sha256", "images")}
    identity["vae"] = {k: manifest["vae"].get(k) for k in ("weights_sha256", "config", "dtype")}
    identity["shards"] = [{k: s.get(k) for k in ("file", "examples", "sha256")} for s in manifest["shards"]]
    return identity


class LatentShards(torch.utils.data.Dataset):
    """The latents ``dar prepare-latents`` wrote, read through memory maps: each shard's tensors are
    mapped on first use (safetensors maps the file; nothing is copied until a batch gathers its rows),
    so a 1.28M-image ImageNet set costs page cache, not process memory.

    ``get_batch(indices, generator)`` returns ``(x, y)`` with ``x = scale_factor * (mean + std * eps)``
    (``store=moments``; ``eps ~ N(0, I)`` drawn from ``generator`` for the whole batch in index order,
    so the batch depends only on the indices and the generator, not on how many processes load it) or
    ``scale_factor * latents`` (``store=samples``). Without a generator, ``eps`` is that of a generator
    seeded 0 (deterministic). ``dataset[i]`` gives the scaled posterior mean (moments) or the stored
    sample, for inspection.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        m = self.manifest
        self.store = m["store"]
        self.scale_factor = float(m["scale_factor"])
        self.channels, self.image_size, width = (int(v) for v in m["latent_shape"])
        if width != self.image_size:
            raise ValueError(f"{self.path}: latents must be square, the manifest says {m['latent_shape']}")
        # with --flip, example i's mirror image is a stored example of its own: flipping a latent is not
        # the latent of the flipped image, so such sets train with data.hflip=false
        self.flipped_copies = bool(m["flip"])
        self.class_names = [str(name) for name in m["class_names"]]
        self.num_classes = len(self.class_names)
        counts = [int(s["examples"]) for s in m["shards"]]
        if sum(counts) != m["count"]:
            raise ValueError(f"{self.path / MANIFEST_NAME}: shard counts add up to {sum(counts)}, not {m['count']}")
        self._files = [self.path / s["file"] for s in m["shards"]]
        self._starts = torch.tensor([0, *counts[:-1]], dtype=torch.int64).cumsum(0)
        self._count = sum(counts)
        self._mapped: dict[int, dict[str, torch.Tensor]] = {}
        self.labels = self._read_labels(counts)

    def _read_labels(self, counts: list[int]) -> torch.Tensor:
        """Every shard's labels (8 bytes an example), checking on the way that each shard is there and
        holds what the manifest says: a missing or replaced file fails now, not mid-training."""
        labels = []
        for file, count in zip(self._files, counts):
            if not file.is_file():
                raise ValueError(f"{file} is missing (listed in {self.path / MANIFEST_NAME}); rerun the "
                                 "`dar prepare-latents` command that made this directory")
            header = read_shard_header(file, self.store)
            for name, (shape, dtype) in header["data"].items():
                if shape != (count, self.channels, self.image_size, self.image_size) or dtype != "F16":
                    raise ValueError(f"{file}: '{name}' is {dtype} {list(shape)}, the manifest says F16 "
                                     f"[{count}, {self.channels}, {self.image_size}, {self.image_size}]")
            labels.append(header["labels"])
        all_labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)
        if len(all_labels) and (all_labels.min() < 0 or all_labels.max() >= self.num_classes):
            raise ValueError(f"{self.path}: labels outside [0, {self.num_classes})")
        return all_labels

    def _shard(self, k: int) -> dict[str, torch.Tensor]:
        """Shard ``k``'s data tensors, mapped on first use. safetensors' ``get_tensor`` returns a tensor
        on the file's memory map (no copy), which stays valid after the handle is closed."""
        if k not in self._mapped:
            with safe_open(str(self._files[k]), framework="pt") as handle:
                self._mapped[k] = {name: handle.get_tensor(name) for name in data_names(self.store)}
        return self._mapped[k]

    def __getstate__(self):  # DataLoader workers re-map the files instead of receiving copies of them
        state = dict(self.__dict__)
        state["_mapped"] = {}
        return state

    def __len__(self) -> int:
        return self._count

    def _gather(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored fp16 rows of ``indices``: the indices sorted by shard, one index_select per shard
        touched (a random batch of 256 touches most of ImageNet's ~128 shards), one scatter back."""
        shard = torch.searchsorted(self._starts, indices, right=True) - 1  # empty shards are skipped over
        order = torch.argsort(shard, stable=True)
        local = (indices - self._starts[shard])[order]
        shards, counts = torch.unique_consecutive(shard[order], return_counts=True)
        pieces: dict[str, list[torch.Tensor]] = {name: [] for name in data_names(self.store)}
        for k, part in zip(shards.tolist(), local.split(counts.tolist())):
            for name, tensor in self._shard(k).items():
                pieces[name].append(tensor.index_select(0, part))
        shape = (len(indices), self.channels, self.image_size, self.image_size)
        rows = {}
        for name, parts in pieces.items():
            rows[name] = torch.empty(shape, dtype=STORED_DTYPE)
            if parts:
                rows[name][order] = torch.cat(parts)
        return rows

    def get_batch(self, indices, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x [B, C, h, w] float32, y [B] int64)`` for a 1-D tensor of example indices."""
        indices = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"example index out of range [0, {len(self)})")
        rows = self._gather(indices)
        if self.store == "moments":
            if generator is None:
                generator = torch.Generator().manual_seed(0)
            eps = torch.randn(rows["mean"].shape, generator=generator)
            x = eps.mul_(rows["std"]).add_(rows["mean"])  # in place: fp32 (mean + std * eps), no fp32 copies
        else:
            x = rows["latents"].float()
        return x.mul_(self.scale_factor), self.labels[indices]

    def __getitem__(self, i) -> tuple[torch.Tensor, int]:
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"example {i} out of range [0, {len(self)})")
        rows = self._gather(torch.tensor([i % len(self)]))
        x = rows["mean" if self.store == "moments" else "latents"][0].float() * self.scale_factor
        return x, int(self.labels[i])

    def fingerprint(self) -> str:
        """SHA-256 of :func:`manifest_identity`: a resumed run checks it trains on the same latents. The
        shards' own SHA-256 are part of it, computed once when the manifest was written."""
        text = json.dumps(manifest_identity(self.manifest), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()
