"""Mass sampling for evaluation: sharded, resumable, multi-process, ADM-format output.

Sample i always gets the same initial noise (seeded by (seed, i)) and label, whatever the batch size
or number of processes. Each batch is one shard file written atomically; a rerun checks the shards
already there and recomputes only the missing or unreadable ones. Process r of N takes shards r,
r+N, ... (torchrun). Rank 0 holds the output directory's lock for the whole job, merges the shards
into ``samples.npz`` (arr_0: uint8 NHWC, labels) and writes ``samples.json`` with every setting.

Latent models (SiT on SD-VAE latents) are decoded to pixels shard by shard on the sampling device,
``DECODE_CHUNK`` images at a time, so memory stays bounded whatever the batch size; the VAE that
decoded them (source, scale, weights hash, config) is part of the request and of the record.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import typing
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dar.diffusion.samplers import SamplerConfig, sample
from dar.files import atomic_path, atomic_write_text, job_directory_lock
from dar.provenance import package_versions, weights_sha256
from dar.training.config import RunConfig
from dar.seeds import Stream, seeded_generator
from dar.training.runtime import Distributed

if typing.TYPE_CHECKING:
    from dar.data.vae import VAE

LABEL_MODES = ("balanced", "random")
# What a kill mid-write leaves in the output directory: temporary names of atomic_path (and of the
# tmp-then-rename writes of earlier versions, ".shard_000001.tmp-PID.npz" and ".samples.tmp-PID.npz")
LEFTOVER_PATTERNS = ("shards/.shard_*.tmp-*", ".samples*.tmp-*", ".request.json.tmp-*")
DECODE_CHUNK = 16  # latents decoded per VAE call: bounds the decoder's activation memory
PRECISIONS = ("fp32", "tf32", "bf16")


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint read once: the model on its device, and what the sample record names."""

    model: torch.nn.Module
    config: RunConfig
    step: int
    path: Path  # the resolved checkpoint: a checkpoint directory or a weights file
    weights_file: Path
    which: str  # ema | model


def sample_labels(num: int, num_classes: int, mode: str, seed: int) -> torch.Tensor:
    if mode == "balanced":  # every class num/num_classes times (+1 for the first num % num_classes)
        return torch.arange(num) % num_classes
    if mode == "random":
        return torch.randint(num_classes, (num,), generator=seeded_generator(seed, 0, Stream.SAMPLE_LABELS))
    raise ValueError(f"labels={mode!r} is not one of {', '.join(LABEL_MODES)}")


def initial_noise(indices: range, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=seeded_generator(seed, i, Stream.SAMPLE_NOISE)) for i in indices])


@contextlib.contextmanager
def sampling_precision(precision: str, device: torch.device):
    """The arithmetic of the diffusion model's forward passes while sampling (the VAE decodes outside).
    fp32: as the process is set (full-precision matmuls by default); tf32: TF32 matmuls on CUDA, what
    SiT's and DiT's sample_ddp.py use by default (no effect on a CPU); bf16: autocast, parameters and
    the sampler's state stay fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "bf16":
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            yield
    elif precision == "tf32":
        saved = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(saved)
    else:
        yield


def check_decoder(config: RunConfig, vae: "VAE | None") -> None:
    """A latent model needs a VAE whose latents it models; a pixel model takes none."""
    m = config.model
    if not m.is_latent:
        if vae is not None:
            raise ValueError(f"the checkpoint models {m.in_channels}-channel pixels, which need no VAE; "
                             f"leave out --vae (got {vae.source})")
        return
    if vae is None:
        raise ValueError(f"the checkpoint models {m.in_channels}-channel latents and names no VAE to decode them "
                         "(its data.vae is not set): pass --vae FOLDER_OR_HUB_ID, e.g. --vae stabilityai/sd-vae-ft-ema")
    vae.check_decodes(m.in_channels, "the checkpoint")


def vae_request(record: dict) -> dict:
    """What makes two VAEs decode alike (weights, scale, config, dtype): a rerun into the same output
    must match it. The source is left out, so a moved copy of the same folder still matches."""
    return {key: value for key, value in record.items() if key != "source"}


def sample_shape(config: RunConfig, vae: "VAE | None") -> tuple[int, int, int]:
    """(H, W, C) of one stored uint8 sample: the model's own for pixel models, the decoded image's
    (8x the latent side for the SD-VAE) for latent models."""
    m = config.model
    if vae is None:
        return (m.input_size, m.input_size, m.in_channels)
    vae_config = vae.model.config
    side = m.input_size * 2 ** (len(vae_config.block_out_channels) - 1)
    return (side, side, vae_config.out_channels)


def to_images(x: torch.Tensor, vae: "VAE | None") -> np.ndarray:
    """Samples in model space [B, C, h, w] -> uint8 [B, H, W, C] on the CPU: pixels directly, latents
    decoded by ``vae`` (on its device, ``DECODE_CHUNK`` at a time)."""
    from dar.data import to_uint8

    images = to_uint8(x).cpu() if vae is None else vae.decode(x, chunk=DECODE_CHUNK)
    return images.numpy()


def generate(
    checkpoint: LoadedCheckpoint,
    out_dir: str | Path,
    num: int,
    sampler: SamplerConfig,
    env: Distributed,
    batch_size: int = 64,
    seed: int = 0,
    labels: str = "balanced",
    progress: bool = True,
    vae: "VAE | None" = None,
    precision: str = "fp32",
) -> Path:
    """Sample ``num`` images of ``checkpoint`` (already on ``env.device``) into ``out_dir``; every
    process of the job calls this. A latent model needs ``vae`` (loaded on ``env.device``), which
    decodes each shard before it is stored. ``precision``: see :func:`sampling_precision`. Returns
    the path of ``samples.npz``."""
    if num < 1 or batch_size < 1:
        raise ValueError(f"--num and --batch-size must be positive, got {num} and {batch_size}")
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    check_decoder(checkpoint.config, vae)
    out_dir = Path(out_dir)
    with job_directory_lock(out_dir, "dar sample", env):
        return _generate_locked(checkpoint, out_dir, num, sampler, env, batch_size, seed, labels, progress, vae,
                                precision)


def _generate_locked(checkpoint: LoadedCheckpoint, out_dir: Path, num: int, sampler: SamplerConfig,
                     env: Distributed, batch_size: int, seed: int, labels: str, progress: bool,
                     vae: "VAE | None", precision: str) -> Path:
    m = checkpoint.config.model
    shard_dir = out_dir / "shards"
    weights_hash = weights_sha256(checkpoint.weights_file)
    request = {"weights_sha256": weights_hash,
               "num": num, "batch_size": batch_size, "seed": seed, "labels": labels, "sampler": sampler.to_dict()}
    vae_record = vae.record() if vae is not None else None
    # keys added only when used, so that requests of earlier versions still match their reruns
    if vae_record is not None:
        request["vae"] = vae_request(vae_record)
    if precision != "fp32":
        request["precision"] = precision
    if env.is_main:
        shard_dir.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(out_dir)
    _check_same_request(out_dir / "request.json", request, env)  # ends with a barrier: leftovers are gone
    all_labels = sample_labels(num, m.num_classes, labels, seed)
    shape = sample_shape(checkpoint.config, vae)  # of one stored sample: NHWC
    shards = [_Shard(k, lo, min(lo + batch_size, num), shard_dir) for k, lo in enumerate(range(0, num, batch_size))]
    mine = [s for s in shards if s.index % env.world_size == env.rank]
    todo = [s for s in mine if not _shard_is_reusable(s, shape, all_labels)]
    bar = None
    if progress and env.is_main:
        from tqdm import tqdm

        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="shard")
    started = time.perf_counter()
    for shard in todo:
        noise = initial_noise(range(shard.lo, shard.hi), (m.in_channels, m.input_size, m.input_size), seed)
        y = all_labels[shard.lo:shard.hi].to(env.device)
        with sampling_precision(precision, env.device):
            x, info = sample(checkpoint.model, noise.to(env.device), y, sampler,
                             generator=seeded_generator(seed, shard.index, Stream.SAMPLE_SDE))
        images = to_images(x.float(), vae)
        del x
        if images.shape[1:] != shape:  # only a VAE of unusual structure can do this
            raise ValueError(f"the VAE {vae.source} decoded {m.input_size}x{m.input_size} latents to images of "
                             f"shape {images.shape[1:]}, not {shape}")
        with atomic_path(shard.path) as tmp, open(tmp, "wb") as handle:  # a handle: np.savez would add ".npz"
            np.savez(handle, arr_0=images, labels=y.cpu().numpy(), nfe=np.array(info["nfe"]))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    env.barrier()
    if not env.is_main:
        return out_dir / "samples.npz"
    parts = [_read_valid_shard(s, shape, all_labels) for s in shards]
    images = np.concatenate([p["arr_0"] for p in parts])
    sample_label_array = np.concatenate([p["labels"] for p in parts])
    record = {
        "num_samples": int(len(images)),
        "checkpoint": str(checkpoint.path),
        "weights_file": str(checkpoint.weights_file),
        "weights_sha256": weights_hash,
        "weights": checkpoint.which,
        "step": checkpoint.step,
        "model": checkpoint.config.to_dict()["model"],
        "sampler": sampler.to_dict(),
        "precision": precision,
        "vae": vae_record,
        "image_shape": list(shape),
        "nfe": int(parts[0]["nfe"]),
        "seed": seed,
        "batch_size": batch_size,
        "labels": labels,
        "class_counts": np.bincount(sample_label_array, minlength=m.num_classes).tolist(),
        "world_size": env.world_size,
        "seconds_this_call": time.perf_counter() - started,
        "versions": package_versions(),
    }
    # samples.json last: its presence means samples.npz is complete and belongs to it
    with atomic_path(out_dir / "samples.npz") as tmp, open(tmp, "wb") as handle:
        np.savez(handle, arr_0=images, labels=sample_label_array)
    atomic_write_text(out_dir / "samples.json", json.dumps(record, indent=2))
    return out_dir / "samples.npz"


@dataclass(frozen=True)
class _Shard:
    index: int
    lo: int  # first sample index
    hi: int  # one past the last
    shard_dir: Path

    @property
    def path(self) -> Path:
        return self.shard_dir / f"shard_{self.index:06d}.npz"


def _check_shard(shard: _Shard, sample_shape: tuple[int, ...], all_labels: torch.Tensor) -> tuple[dict | None, str]:
    """(the shard's arrays, "") if the file holds exactly the samples it should, else (None, why): a copy
    truncated on disk or a foreign file must not reach the merge."""
    try:
        with np.load(shard.path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in ("arr_0", "labels", "nfe")}
    except KeyError as error:
        return None, f"missing array {error}"
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        return None, f"unreadable ({error})"
    expected_shape = (shard.hi - shard.lo, *sample_shape)
    if arrays["arr_0"].shape != expected_shape or arrays["arr_0"].dtype != np.uint8:
        return None, f"holds {arrays['arr_0'].dtype} {arrays['arr_0'].shape}, expected uint8 {expected_shape}"
    if not np.array_equal(arrays["labels"], all_labels[shard.lo:shard.hi].numpy()):
        return None, "its labels are not the requested ones"
    if arrays["nfe"].shape != () or not np.issubdtype(arrays["nfe"].dtype, np.integer):
        return None, f"its nfe is not an integer ({arrays['nfe'].dtype} {arrays['nfe'].shape})"
    return arrays, ""


def _shard_is_reusable(shard: _Shard, sample_shape: tuple[int, ...], all_labels: torch.Tensor) -> bool:
    if not shard.path.exists():
        return False
    arrays, why = _check_shard(shard, sample_shape, all_labels)
    if arrays is None:
        print(f"{shard.path}: {why}; recomputing it", file=sys.stderr)
    return arrays is not None


def _read_valid_shard(shard: _Shard, sample_shape: tuple[int, ...], all_labels: torch.Tensor) -> dict:
    arrays, why = _check_shard(shard, sample_shape, all_labels)
    if arrays is None:  # changed on disk after its rank wrote or checked it
        raise ValueError(f"{shard.path}: {why}; rerun the same command to recompute it")
    return arrays


def _remove_leftovers(out_dir: Path) -> None:
    """Delete the temporary files of writes that a kill interrupted (only the lock holder may)."""
    for pattern in LEFTOVER_PATTERNS:
        for path in out_dir.glob(pattern):
            path.unlink(missing_ok=True)


def _check_same_request(path: Path, request: dict, env: Distributed) -> None:
    """Finished shards are only reused by the same request; anything else would mix two experiments."""
    request = json.loads(json.dumps(request))  # tuples -> lists, as stored
    if path.exists():
        try:
            previous = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is unreadable ({error}); use another --out directory") from None
        if not isinstance(previous, dict):
            raise ValueError(f"{path} is not a sample request (a JSON object); use another --out directory")
        if previous != request:
            changed = sorted(k for k in set(previous) | set(request) if previous.get(k) != request.get(k))
            raise ValueError(f"{path.parent} holds samples made with different settings ({', '.join(changed)}); "
                             "use another --out directory")
    elif env.is_main:
        atomic_write_text(path, json.dumps(request, indent=2))
    env.barrier()
