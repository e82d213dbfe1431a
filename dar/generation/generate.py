"""Mass sampling for evaluation: sharded, resumable, multi-process, ADM-format output.

Sample i always gets the same initial noise (seeded by (seed, i)) and label, whatever the batch size
or number of processes. Each batch is one shard file written atomically; a rerun checks the shards
already there and recomputes only the missing or unreadable ones. Process r of N takes shards r,
r+N, ... (torchrun). Rank 0 holds the output directory's lock for the whole job, merges the shards
into ``samples.npz`` (arr_0: uint8 NHWC, labels) and writes ``samples.json`` with every setting.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dar.diffusion.samplers import SamplerConfig, sample
from dar.errors import RunDirBusy
from dar.files import atomic_path, atomic_write_text, directory_lock
from dar.provenance import package_versions, weights_sha256
from dar.training.config import RunConfig
from dar.training.runtime import Distributed, Stream, seeded_generator

LABEL_MODES = ("balanced", "random")
# What a kill mid-write leaves in the output directory: temporary names of atomic_path (and of the
# tmp-then-rename writes of earlier versions, ".shard_000001.tmp-PID.npz" and ".samples.tmp-PID.npz")
LEFTOVER_PATTERNS = ("shards/.shard_*.tmp-*", ".samples*.tmp-*", ".request.json.tmp-*")


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


def check_pixel_model(config: RunConfig) -> None:
    if config.model.in_channels not in (1, 3):
        raise ValueError(f"the checkpoint models {config.model.in_channels}-channel latents; decoding them to "
                         "images needs a VAE, which `dar sample` does not provide yet")


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
) -> Path:
    """Sample ``num`` images of ``checkpoint`` (already on ``env.device``) into ``out_dir``; every
    process of the job calls this. Returns the path of ``samples.npz``."""
    if num < 1 or batch_size < 1:
        raise ValueError(f"--num and --batch-size must be positive, got {num} and {batch_size}")
    check_pixel_model(checkpoint.config)
    out_dir = Path(out_dir)
    with _output_lock(out_dir, env):
        return _generate_locked(checkpoint, out_dir, num, sampler, env, batch_size, seed, labels, progress)


def _generate_locked(checkpoint: LoadedCheckpoint, out_dir: Path, num: int, sampler: SamplerConfig,
                     env: Distributed, batch_size: int, seed: int, labels: str, progress: bool) -> Path:
    from dar.data import to_uint8

    m = checkpoint.config.model
    shard_dir = out_dir / "shards"
    weights_hash = weights_sha256(checkpoint.weights_file)
    request = {"weights_sha256": weights_hash,
               "num": num, "batch_size": batch_size, "seed": seed, "labels": labels, "sampler": sampler.to_dict()}
    if env.is_main:
        shard_dir.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(out_dir)
    _check_same_request(out_dir / "request.json", request, env)  # ends with a barrier: leftovers are gone
    all_labels = sample_labels(num, m.num_classes, labels, seed)
    shape = (m.input_size, m.input_size, m.in_channels)  # of one stored sample: NHWC
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
        x, info = sample(checkpoint.model, noise.to(env.device), y, sampler,
                         generator=seeded_generator(seed, shard.index, Stream.SAMPLE_SDE))
        with atomic_path(shard.path) as tmp, open(tmp, "wb") as handle:  # a handle: np.savez would add ".npz"
            np.savez(handle, arr_0=to_uint8(x.cpu()), labels=y.cpu().numpy(), nfe=np.array(info["nfe"]))
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


@contextlib.contextmanager
def _output_lock(out_dir: Path, env: Distributed):
    """Rank 0 holds ``out_dir`` for the whole job, so a second `dar sample` on it fails instead of
    mixing shards; every rank learns whether it got the lock (none may write, none may wait at a
    barrier for a rank that gave up)."""
    with contextlib.ExitStack() as stack:
        busy = None
        if env.is_main:
            try:
                stack.enter_context(directory_lock(out_dir, "dar sample"))
            except RunDirBusy as error:
                busy = error
        acquired = env.all_mean(torch.tensor(float(busy is None), device=env.device)).item() == 1.0
        if not acquired:
            raise busy or RunDirBusy(f"{out_dir} is in use by another process (rank 0 names it)")
        yield


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
