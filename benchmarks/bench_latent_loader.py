"""Throughput of the latent loader (`dar.data.latents.LatentShards.get_batch`) from disk, against what
SiT-XL/2 training consumes.

A synthetic data set in the exact format `dar prepare-latents` writes (fp16 posterior moments,
4 x 32 x 32 per example, the ImageNet-256 SD-VAE shape) is written to a temporary directory; then
random-index batches are drawn as the trainer draws them (`get_batch(indices, generator)` with a fresh
seeded generator per step, moments -> scale * (mean + std * eps)):

* cold: the shard files' pages are first evicted from the page cache (posix_fadvise DONTNEED on our
  own files; no system-wide cache drop), so the first pass reads from the disk;
* warm: every page is in the page cache (the steady state once an epoch has passed, if RAM allows).

What a training step consumes (printed, and in the JSON): SiT-XL/2's forward pass is 118.6 GFLOPs
per 256 px image (the DiT paper's figure); a training step is about 3x the forward; at 40 % MFU of an
H100's 989 TFLOP/s dense bf16 that is 0.4 * 989e12 / (3 * 118.6e9) = 1,112 images/s per GPU, 8,895
per 8-GPU node. Every trainer process loads the whole global batch (the trainer draws each step's
inputs for the global batch, then takes its slice), so each process must deliver the node's rate.
If DiT's figure counts multiply-adds, as fvcore-style counters do, the FLOPs double and the demand
halves; the number used here is the higher demand.

    python benchmarks/bench_latent_loader.py --examples 50000 --json bench_latents.json

(one torch thread by default: the loader runs inside the trainer's process, beside everything else).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from dar.data.latents import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    STORED_DTYPE_NAME,
    LatentShards,
    save_shard,
    shard_name,
)

SIT_XL2_FORWARD_GFLOPS = 118.6  # per 256 px image, the DiT paper's figure
TRAIN_OVER_FORWARD = 3.0  # forward + backward (about twice the forward)
H100_BF16_TFLOPS = 989.0  # dense, SXM data sheet
MFU = 0.40
GPUS_PER_NODE = 8


def demand() -> dict:
    per_gpu = MFU * H100_BF16_TFLOPS * 1e12 / (TRAIN_OVER_FORWARD * SIT_XL2_FORWARD_GFLOPS * 1e9)
    return {"images_per_s_per_gpu": per_gpu, "images_per_s_per_node": per_gpu * GPUS_PER_NODE,
            "assumptions": f"SiT-XL/2 {SIT_XL2_FORWARD_GFLOPS} GFLOPs forward x {TRAIN_OVER_FORWARD}, "
                           f"{MFU:.0%} MFU of {H100_BF16_TFLOPS} TFLOP/s bf16, {GPUS_PER_NODE} GPUs"}


def make_synthetic(directory: Path, examples: int, shard_size: int, seed: int = 0,
                   latent_shape: tuple[int, int, int] = (4, 32, 32), num_classes: int = 1000) -> Path:
    """Shards + manifest in the `dar prepare-latents` format, filled with random moments."""
    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    shards = []
    for k, lo in enumerate(range(0, examples, shard_size)):
        n = min(shard_size, examples - lo)
        tensors = {"mean": (4 * torch.randn((n, *latent_shape), generator=g)).half(),
                   "std": (0.05 * torch.rand((n, *latent_shape), generator=g)).half(),
                   "labels": torch.randint(num_classes, (n,), generator=g), "index": torch.arange(lo, lo + n),
                   "flipped": torch.zeros(n, dtype=torch.bool)}
        save_shard(directory / shard_name(k), tensors, {"format": FORMAT, "version": FORMAT_VERSION, "shard": k,
                                                        "images": [lo, lo + n], "skipped": []})
        with open(directory / shard_name(k), "rb") as handle:
            os.fsync(handle.fileno())  # on disk, so evicting the pages makes the next read a real one
        shards.append({"file": shard_name(k), "images": [lo, lo + n], "examples": n, "sha256": None})
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "store": "moments", "dtype": STORED_DTYPE_NAME,
                "resolution": 256, "flip": False, "seed": None, "shard_size": shard_size,
                "latent_shape": list(latent_shape), "scale_factor": 0.18215, "count": examples,
                "class_names": [str(c) for c in range(num_classes)], "shards": shards,
                "source": {"kind": "synthetic", "sha256": None, "images": examples},
                "vae": {"weights_sha256": None, "config": {}, "dtype": "float32"}}
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))
    return directory


def evict(directory: Path) -> None:
    for path in directory.glob("shard_*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure(dataset: LatentShards, batch: int, batches: int, seed: int, part: str = "get_batch") -> float:
    """Latents/s over ``batches`` random-index batches (a new seeded generator per step, as training)."""
    order = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for step in range(batches):
        indices = torch.randint(len(dataset), (batch,), generator=order)
        if part == "gather":
            dataset._gather(indices)
        else:
            dataset.get_batch(indices, torch.Generator().manual_seed(seed * 100_003 + step))
    return batch * batches / (time.perf_counter() - started)


def machine() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} CPUs visible"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=50_000)
    p.add_argument("--shard-size", type=int, default=400,
                   help="examples per shard; 400 gives 50k examples ImageNet's ~128 shards (1.28M / 10k), and a "
                        "random batch touches as many shards as it would there")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the loader runs in the trainer's process)")
    p.add_argument("--dir", help="where to write the synthetic set (default: a temporary directory, removed)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    temporary = args.dir is None
    directory = Path(tempfile.mkdtemp(prefix="dar_latents_") if temporary else args.dir)
    try:
        started = time.perf_counter()
        make_synthetic(directory, args.examples, args.shard_size)
        size = sum(f.stat().st_size for f in directory.glob("shard_*.safetensors"))
        print(f"wrote {args.examples:,} examples ({size / 2**20:.0f} MiB) in {time.perf_counter() - started:.1f} s")
        evict(directory)
        cold = measure(LatentShards(directory), args.batch, args.batches, seed=1)
        dataset = LatentShards(directory)
        for path in directory.glob("shard_*.safetensors"):  # the whole set into the page cache
            path.read_bytes()
        warm = measure(dataset, args.batch, args.batches, seed=2)
        gather = measure(dataset, args.batch, args.batches, seed=3, part="gather")
    finally:
        if temporary:
            shutil.rmtree(directory, ignore_errors=True)
    need = demand()
    result = {"examples": args.examples, "shard_size": args.shard_size, "batch": args.batch, "batches": args.batches,
              "threads": args.threads, "bytes": size, "machine": machine(),
              "latents_per_s": {"cold": cold, "warm": warm, "warm_gather_only": gather},
              "demand": need, "headroom_warm": warm / need["images_per_s_per_node"],
              "headroom_cold": cold / need["images_per_s_per_node"],
              "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    print(f"machine: {result['machine']}, torch threads {args.threads}")
    print(f"latents/s at batch {args.batch}: cold {cold:,.0f}, warm {warm:,.0f} (gather alone {gather:,.0f})")
    print(f"SiT-XL/2 consumes {need['images_per_s_per_node']:,.0f} latents/s per 8-GPU node "
          f"({need['images_per_s_per_gpu']:,.0f}/GPU): headroom warm {result['headroom_warm']:.1f}x, "
          f"cold {result['headroom_cold']:.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
