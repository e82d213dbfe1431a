"""What every process of a run shares: its place in the world (rank, device, process group) and the
order of its data (seeded per epoch with the streams of :mod:`dar.seeds`)."""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist

from dar.seeds import Stream, seeded_generator

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


def _env_int(environ, name: str, default: int | None) -> int:
    value = environ.get(name)
    if value is None or value == "":
        if default is None:
            raise ValueError(f"{name} is not set; launch several processes with torchrun, which sets RANK, "
                             "WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


@dataclasses.dataclass(frozen=True)
class Launch:
    """This process's place in the world, as a launcher describes it in the environment (torchrun sets
    all of these): RANK (global, 0..WORLD_SIZE-1), WORLD_SIZE (all processes on all nodes), LOCAL_RANK
    (on this node: its GPU index), LOCAL_WORLD_SIZE (processes on this node) and GROUP_RANK (this
    node's index). Without a launcher: one process. LOCAL_WORLD_SIZE and GROUP_RANK may be missing
    (one node is assumed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0

    @classmethod
    def from_env(cls, environ=None) -> "Launch":
        environ = os.environ if environ is None else environ
        world = _env_int(environ, "WORLD_SIZE", 1)
        if world < 1:
            raise ValueError(f"WORLD_SIZE={world} must be at least 1")
        single = world == 1
        rank = _env_int(environ, "RANK", 0 if single else None)
        local_rank = _env_int(environ, "LOCAL_RANK", 0 if single else None)
        local_world = _env_int(environ, "LOCAL_WORLD_SIZE", world)
        if not 0 <= rank < world:
            raise ValueError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world})")
        if not 1 <= local_world <= world:
            raise ValueError(f"LOCAL_WORLD_SIZE={local_world} must be in 1..WORLD_SIZE={world}")
        if not 0 <= local_rank < local_world:
            raise ValueError(f"LOCAL_RANK={local_rank} is outside 0..{local_world - 1} "
                             f"(LOCAL_WORLD_SIZE={local_world})")
        node_rank = _env_int(environ, "GROUP_RANK", rank // local_world)
        return cls(rank, world, local_rank, local_world, node_rank)

    @property
    def num_nodes(self) -> int:
        """Nodes of equal size (torchrun's --nproc_per_node); ceil for uneven ones."""
        return -(-self.world_size // self.local_world_size)

    def batch_rows(self, global_batch: int) -> slice:
        """The rows of the global batch this rank trains on: the global rank's contiguous slice, the
        same on any number of nodes (rank r of N takes rows [r*B/N, (r+1)*B/N))."""
        if global_batch % self.world_size:
            raise ValueError(f"train.global_batch={global_batch} is not divisible by {self.world_size} processes")
        local = global_batch // self.world_size
        return slice(self.rank * local, (self.rank + 1) * local)


class Distributed:
    """World size, rank and device for 1..N processes on 1..M nodes (from :class:`Launch`: torchrun's
    RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE). The device is ``cuda:LOCAL_RANK`` (the rank on
    this node, not the global one) or the CPU. A process group (nccl on GPU, gloo on CPU) is started
    when there are several processes, and for ``parallel="fsdp"`` also with one: FSDP always needs one;
    under torchrun it uses torchrun's rendezvous, otherwise a private in-memory store, so that
    ``train.parallel=fsdp`` trains sharded (with one shard) however it is launched."""

    def __init__(self, device: str | None = None, parallel: str = "ddp"):
        self.launch = Launch.from_env()
        self.world_size, self.rank = self.launch.world_size, self.launch.rank
        self.local_rank = self.launch.local_rank
        use_cuda = resolve_device(device).type == "cuda"
        if use_cuda:
            if self.local_rank >= torch.cuda.device_count():
                raise ValueError(f"LOCAL_RANK={self.local_rank} but only {torch.cuda.device_count()} CUDA device(s) "
                                 "are visible on this node: start at most that many processes per node "
                                 "(torchrun --nproc_per_node)")
            torch.cuda.set_device(self.local_rank)  # the LOCAL rank: multi-node safe
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        self.initialized_here = False
        self._mesh = None
        if dist.is_available() and dist.is_initialized():
            if dist.get_world_size() != self.world_size:
                raise ValueError(f"WORLD_SIZE={self.world_size} but the running process group has "
                                 f"{dist.get_world_size()} processes")
        elif self.world_size > 1 or parallel == "fsdp":
            backend = "nccl" if use_cuda else "gloo"
            if self.world_size == 1 and "MASTER_ADDR" not in os.environ:  # not under torchrun
                dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
            else:
                dist.init_process_group(backend=backend)
            self.initialized_here = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def mesh(self):
        """The 1-D device mesh of all processes (for FSDP), on this process's device type."""
        if self._mesh is None:
            from dar.training.parallel import device_mesh

            self._mesh = device_mesh(self.device, self.world_size)
        return self._mesh

    def batch_rows(self, global_batch: int) -> slice:
        return self.launch.batch_rows(global_batch)

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
