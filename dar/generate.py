"""Mass sampling for evaluation: sharded, resumable, multi-process, ADM-format output.

Sample i always gets the same initial noise (seeded by (seed, i)) and label, whatever the batch size
or number of processes. Each batch is one shard file written atomically; a rerun skips finished
shards. Process r of N takes shards r, r+N, ... (torchrun). Rank 0 merges the shards into
``samples.npz`` (arr_0: uint8 NHWC, labels) and writes ``samples.json`` with every setting.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from dar.checkpoint import load_model, resolve_checkpoint
from dar.provenance import file_sha256, package_versions
from dar.sampling import SamplerConfig, sample
from dar.train import Distributed, step_generator

LABEL_MODES = ("balanced", "random")
NOISE_STREAM, LABEL_STREAM, SDE_STREAM = 10, 11, 12




def sample_labels(num: int, num_classes: int, mode: str, seed: int) -> torch.Tensor:
    if mode == "balanced":  # every class num/num_classes times (+1 for the first num % num_classes)
        return torch.arange(num) % num_classes
    if mode == "random":
        return torch.randint(num_classes, (num,), generator=step_generator(seed, 0, LABEL_STREAM))
    raise ValueError(f"labels={mode!r} is not one of {', '.join(LABEL_MODES)}")


def initial_noise(indices: range, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=step_generator(seed, i, NOISE_STREAM)) for i in indices])


def generate(
    checkpoint: str | Path,
    out_dir: str | Path,
    num: int,
    sampler: SamplerConfig,
    batch_size: int = 64,
    seed: int = 0,
    labels: str = "balanced",
    which: str = "ema",
    device: str | None = None,
    progress: bool = True,
) -> Path:
    from dar.data import to_uint8

    if num < 1 or batch_size < 1:
        raise ValueError(f"--num and --batch-size must be positive, got {num} and {batch_size}")
    env = Distributed(device)
    try:
        ckpt_path = resolve_checkpoint(checkpoint)
        model, run_config, step = load_model(ckpt_path, which=which, device=env.device)
        m = run_config.model
        if m.in_channels not in (1, 3):
            raise ValueError(f"the checkpoint models {m.in_channels}-channel latents; decoding them to images "
                             "needs a VAE, which `dar sample` does not provide yet")
        out_dir = Path(out_dir)
        shard_dir = out_dir / "shards"
        shard_dir.mkdir(parents=True, exist_ok=True)
        weights_file = ckpt_path if ckpt_path.is_file() else ckpt_path / f"{which}.safetensors"
        weights_sha256 = file_sha256(weights_file)
        request = {"weights_sha256": weights_sha256,
                   "num": num, "batch_size": batch_size, "seed": seed, "labels": labels, "sampler": sampler.to_dict()}
        _check_same_request(out_dir / "request.json", request, env)
        all_labels = sample_labels(num, m.num_classes, labels, seed)
        shape = (m.in_channels, m.input_size, m.input_size)
        shards = range(0, num, batch_size)
        mine = [k for k, _ in enumerate(shards) if k % env.world_size == env.rank]
        todo = [k for k in mine if not (shard_dir / f"shard_{k:06d}.npz").exists()]
        bar = None
        if progress and env.is_main:
            from tqdm import tqdm

            bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="shard")
        nfe, started = None, time.perf_counter()
        for k in todo:
            lo = k * batch_size
            hi = min(lo + batch_size, num)
            noise = initial_noise(range(lo, hi), shape, seed).to(env.device)
            y = all_labels[lo:hi].to(env.device)
            x, info = sample(model, noise, y, sampler, generator=step_generator(seed, k, SDE_STREAM))
            nfe = info["nfe"]
            target = shard_dir / f"shard_{k:06d}.npz"
            tmp = shard_dir / f".shard_{k:06d}.tmp-{os.getpid()}.npz"
            np.savez(tmp, arr_0=to_uint8(x.cpu()), labels=y.cpu().numpy(), nfe=np.array(nfe))
            os.replace(tmp, target)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        env.barrier()
        if not env.is_main:
            return out_dir / "samples.npz"
        parts = [np.load(shard_dir / f"shard_{k:06d}.npz") for k in range(len(shards))]
        images = np.concatenate([p["arr_0"] for p in parts])
        sample_label_array = np.concatenate([p["labels"] for p in parts])
        nfe = int(parts[0]["nfe"])
        record = {
            "num_samples": int(len(images)),
            "checkpoint": str(ckpt_path),
            "weights_file": str(weights_file),
            "weights_sha256": weights_sha256,
            "weights": which,
            "step": step,
            "model": run_config.to_dict()["model"],
            "sampler": sampler.to_dict(),
            "nfe": nfe,
            "seed": seed,
            "batch_size": batch_size,
            "labels": labels,
            "class_counts": np.bincount(sample_label_array, minlength=m.num_classes).tolist(),
            "world_size": env.world_size,
            "seconds_this_call": time.perf_counter() - started,
            "versions": package_versions(),
        }
        tmp = out_dir / f".samples.tmp-{os.getpid()}.npz"
        np.savez(tmp, arr_0=images, labels=sample_label_array)
        os.replace(tmp, out_dir / "samples.npz")
        (out_dir / "samples.json").write_text(json.dumps(record, indent=2))
        return out_dir / "samples.npz"
    finally:
        env.close()


def _check_same_request(path: Path, request: dict, env: Distributed) -> None:
    """Finished shards are only reused by the same request; anything else would mix two experiments."""
    request = json.loads(json.dumps(request))  # tuples -> lists, as stored
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != request:
            changed = sorted(k for k in set(previous) | set(request) if previous.get(k) != request.get(k))
            raise ValueError(f"{path.parent} holds samples made with different settings ({', '.join(changed)}); "
                             "use another --out directory")
    elif env.is_main:
        path.write_text(json.dumps(request, indent=2))
    env.barrier()
