"""What every process of a run shares: its place in the world (rank, device) and its random numbers.

Every random number of the project comes from :func:`seeded_generator` with a ``(seed, stream, index)``
triple, or from :func:`fixed_noise_generator`; the streams are listed once, in :class:`Stream`, so no
two uses can collide and a new use cannot change an old one's numbers.
"""

from __future__ import annotations

import enum
import os

import numpy as np
import torch
import torch.distributed as dist


class Stream(enum.IntEnum):
    """Independent random streams; the values are part of every recorded result, never renumber them."""

    TRAIN_STEP = 0  # index = step: examples' flips, label drops, t, noise
    TRAIN_EPOCH = 1  # index = epoch: the data permutation
    TRAIN_LATENTS = 2  # index = step: latents drawn from stored VAE posteriors
    SAMPLE_NOISE = 10  # index = sample: the initial noise of `dar sample`
    SAMPLE_LABELS = 11  # the labels of `dar sample --labels random`
    SAMPLE_SDE = 12  # index = shard: the SDE's Brownian increments
    DIAGNOSE_IMAGES = 20
    DIAGNOSE_NOISE = 21
    PROBE_IMAGES = 22
    PROBE_NOISE = 23
    PROBE_T = 24
    PROBE_SPLIT = 25


# Fixed noise of the training-time sample grids and periodic evaluation: seed + offset, as every
# recorded run was made (changing them would change the study's evaluation noise).
FIXED_NOISE_SEED_OFFSETS = {"sample_grid": 12345, "periodic_eval": 54321}


def seeded_generator(seed: int, index: int, stream: Stream) -> torch.Generator:
    """An independent, reproducible CPU generator per (seed, stream, index)."""
    entropy = np.random.SeedSequence([seed, int(stream), index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(entropy[0]) << 32 | int(entropy[1]))


def fixed_noise_generator(seed: int, purpose: str) -> torch.Generator:
    """The generator of one of :data:`FIXED_NOISE_SEED_OFFSETS`' purposes."""
    return torch.Generator().manual_seed(seed + FIXED_NOISE_SEED_OFFSETS[purpose])


DEVICES = ("cpu", "cuda")


def resolve_device(device: str | None) -> torch.device:
    """``None`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``, checked against this machine."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind, _, index = device.partition(":")
    if kind not in DEVICES or (index and not index.isdigit()) or (index and kind != "cuda"):
        raise ValueError(f"--device {device!r} is not one of cpu, cuda, cuda:N")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available (torch {torch.__version__}, "
                             f"{'a CPU-only build' if torch.version.cuda is None else 'no visible GPU'})")
        if index and int(index) >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return torch.device(device)


class Distributed:
    """World size, rank and device for 1..N processes (torchrun sets RANK/WORLD_SIZE/LOCAL_RANK)."""

    def __init__(self, device: str | None = None):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = resolve_device(device).type == "cuda"
        if use_cuda:
            torch.cuda.set_device(self.local_rank)  # the LOCAL rank: multi-node safe
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        self.initialized_here = False
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
            self.initialized_here = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world_size
        return value

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()

    def close(self):
        if self.initialized_here:
            dist.destroy_process_group()


class EpochSampler:
    """The global index stream: a fresh seeded permutation of the dataset each epoch; the global batch
    of step s is positions [s*B, (s+1)*B) of that stream."""

    def __init__(self, size: int, global_batch: int, seed: int):
        self.size, self.global_batch, self.seed = size, global_batch, seed
        self._cache: dict[int, torch.Tensor] = {}

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            self._cache = {e: p for e, p in self._cache.items() if e >= epoch - 1}
            generator = seeded_generator(self.seed, epoch, Stream.TRAIN_EPOCH)
            self._cache[epoch] = torch.randperm(self.size, generator=generator)
        return self._cache[epoch]

    def indices(self, step: int) -> torch.Tensor:
        positions = torch.arange(step * self.global_batch, (step + 1) * self.global_batch)
        epochs, offsets = positions // self.size, positions % self.size
        return torch.stack([self.permutation(int(e))[o] for e, o in zip(epochs, offsets)])


def load_batch(dataset, indices: torch.Tensor, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [B, C, H, W], y [B])`` of the examples at ``indices``, in one gather when the dataset can
    (``dataset.get_batch(indices, generator)``; a dataset that draws, e.g. latents from stored posterior
    moments, draws from ``generator``)."""
    if hasattr(dataset, "get_batch"):
        return dataset.get_batch(indices, generator)
    items = [dataset[int(i)] for i in indices]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])
