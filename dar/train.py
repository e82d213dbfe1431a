"""Training: SiT's recipe (AdamW, EMA, label dropout, velocity loss) on 1..N processes.

Determinism is by construction: every random number of step ``s`` (which examples, flips, label
drops, t, noise) comes from a generator seeded by ``(seed, s)`` and is drawn for the whole global
batch, of which each process takes its slice. So the data position is the step, a resumed run
repeats exactly what an uninterrupted one would have done, and N processes see the same batch as
one process with the same global batch.

Launch: ``dar train`` (one process) or ``torchrun --nproc_per_node N -m dar.cli train`` (DDP; nccl on
GPU, gloo on CPU).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from dar.checkpoint import CheckpointError, latest_checkpoint, load_training_state, save_checkpoint
from dar.config import RunConfig
from dar.models.sit import build_model, count_parameters
from dar.transport import Transport


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left untouched."""


# Config fields that may differ when a run is resumed: they change bookkeeping, not the trajectory.
RESUMABLE_CHANGES = {"train.steps", "train.log_every", "train.ckpt_every", "train.sample_every",
                     "train.eval_every", "train.eval_samples", "train.keep_checkpoints", "train.compile",
                     "train.grad_checkpointing", "train.routing_backend", "data.num_workers",
                     "data.path"}


class Distributed:
    """World size, rank and device for 1..N processes (torchrun sets RANK/WORLD_SIZE/LOCAL_RANK)."""

    def __init__(self, device: str | None = None):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
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


STEP_STREAM, EPOCH_STREAM = 0, 1


def step_generator(seed: int, index: int, stream: int = STEP_STREAM) -> torch.Generator:
    """An independent, reproducible random stream per (seed, stream, index)."""
    entropy = np.random.SeedSequence([seed, stream, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(entropy[0]) << 32 | int(entropy[1]))


class EpochSampler:
    """The global index stream: a fresh seeded permutation of the dataset each epoch; the global batch
    of step s is positions [s*B, (s+1)*B) of that stream."""

    def __init__(self, size: int, global_batch: int, seed: int):
        self.size, self.global_batch, self.seed = size, global_batch, seed
        self._cache: dict[int, torch.Tensor] = {}

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            self._cache = {e: p for e, p in self._cache.items() if e >= epoch - 1}
            self._cache[epoch] = torch.randperm(self.size, generator=step_generator(self.seed, epoch, EPOCH_STREAM))
        return self._cache[epoch]

    def indices(self, step: int) -> torch.Tensor:
        positions = torch.arange(step * self.global_batch, (step + 1) * self.global_batch)
        epochs, offsets = positions // self.size, positions % self.size
        return torch.stack([self.permutation(int(e))[o] for e, o in zip(epochs, offsets)])


def load_batch(dataset, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(dataset, "get_batch"):
        return dataset.get_batch(indices)
    items = [dataset[int(i)] for i in indices]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


def make_step_inputs(dataset, sampler: EpochSampler, config: RunConfig, step: int, num_classes: int):
    """Everything random about step ``step`` for the whole global batch: (x1, y, x0, t)."""
    g = step_generator(config.train.seed, step)
    x1, y = load_batch(dataset, sampler.indices(step))
    B = x1.shape[0]
    if config.data.hflip:
        flip = torch.rand(B, generator=g) < 0.5
        x1 = torch.where(flip[:, None, None, None], x1.flip(-1), x1)
    drop = torch.rand(B, generator=g) < config.train.label_dropout
    y = torch.where(drop, torch.full_like(y, num_classes), y)
    t = torch.rand(B, generator=g)
    x0 = torch.randn(x1.shape, generator=g)
    return x1, y, x0, t


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


def config_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_differences(va, vb, f"{prefix}{k}.")
        elif va != vb and not (isinstance(va, (list, tuple)) and list(va) == list(vb or [])):
            out.append(f"{prefix}{k}")
    return out


class MetricsLog:
    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        self.tensorboard = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(path.parent / "tensorboard"))
            except Exception:  # tensorboard is optional: JSONL is the record
                self.tensorboard = None

    def write(self, record: dict):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tensorboard.add_scalar(k, v, record["step"])

    def truncate_after(self, step: int):
        """On resume, drop records past the checkpoint so the log matches the replayed steps."""
        if not self.enabled or not self.path.exists():
            return
        lines = [l for l in self.path.read_text().splitlines() if l.strip()]
        kept = [l for l in lines if json.loads(l).get("step", 0) <= step]
        self.path.write_text("".join(l + "\n" for l in kept))


def train(config: RunConfig, run_dir: str | Path, resume: bool = False, device: str | None = None,
          progress: bool = True, stop_after: int | None = None) -> dict:
    """Train (or continue) the run in ``run_dir``. A run dir with checkpoints is always continued from
    its latest one (the config must agree, see RESUMABLE_CHANGES); ``resume=True`` additionally
    requires that a checkpoint exists. ``stop_after`` ends the process after that step (tests use it to
    simulate an interruption). Returns a summary dict."""
    from dar.data import make_dataset

    run_dir = Path(run_dir)
    env = Distributed(device)
    try:
        return _train(config, run_dir, resume, env, progress, stop_after, make_dataset)
    finally:
        env.close()


def _train(config, run_dir, resume, env, progress, stop_after, make_dataset):
    tc = config.train
    if tc.global_batch % env.world_size:
        raise ValueError(f"train.global_batch={tc.global_batch} is not divisible by {env.world_size} processes")
    local_batch = tc.global_batch // env.world_size
    dataset = make_dataset(config.data.name, config.data.path, "train", config.data.image_size)
    _check_data_fits_model(dataset, config)

    torch.manual_seed(tc.seed)
    model = build_model(config.model).to(env.device)
    model.gradient_checkpointing = tc.grad_checkpointing
    model.router.set_backend(tc.routing_backend)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, betas=tc.betas)
    transport = Transport(config.transport_path)

    step = 0
    latest = latest_checkpoint(run_dir)
    if resume and latest is None:
        raise CheckpointError(f"--resume given but {run_dir} has no checkpoint")
    if latest is not None:
        saved = json.loads((latest / "state.json").read_text())["config"]
        changed = [k for k in config_differences(saved, config.to_dict()) if k not in RESUMABLE_CHANGES]
        if changed:
            raise ValueError(
                f"{run_dir} was started with a different config ({', '.join(changed)}); "
                "use a new run directory or the original settings"
            )
        state = load_training_state(latest, model, ema, optimizer)
        step = state["step"]
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(config.to_json())
    log = MetricsLog(run_dir / "metrics.jsonl", env.is_main)
    log.truncate_after(step)
    if env.is_main:
        params = count_parameters(model)
        print(f"[dar] {config.model.arch} {config.model.routing.describe}: {params['total']:,} parameters "
              f"({params['routing']:,} routing); {len(dataset):,} training examples; "
              f"{'resuming at' if step else 'starting from'} step {step} of {tc.steps}; "
              f"{env.world_size} process(es) on {env.device}", flush=True)

    train_model = torch.compile(model) if tc.compile else model
    if env.world_size > 1:
        train_model = DistributedDataParallel(
            train_model, device_ids=[env.local_rank] if env.device.type == "cuda" else None
        )
    sampler = EpochSampler(len(dataset), tc.global_batch, tc.seed)
    autocast = (torch.autocast(env.device.type, dtype=torch.bfloat16) if tc.precision == "bf16"
                else contextlib.nullcontext())
    grids = _SampleGrid(config, dataset, env, run_dir) if env.is_main and tc.sample_every else None
    evaluator = _PeriodicEval(config, env) if env.is_main and tc.eval_every else None

    bar = None
    if env.is_main and progress:
        from tqdm import tqdm

        bar = tqdm(total=tc.steps, initial=step, unit="step", dynamic_ncols=True)
    window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
    last_saved = step
    model.train()
    final_loss = float("nan")
    while step < tc.steps:
        x1, y, x0, t = make_step_inputs(dataset, sampler, config, step, config.model.num_classes)
        rows = slice(env.rank * local_batch, (env.rank + 1) * local_batch)
        x1, y, x0, t = (v[rows].to(env.device, non_blocking=True) for v in (x1, y, x0, t))
        with autocast:
            loss = transport.loss(train_model, x1, y, x0, t).mean()
        global_loss = env.all_mean(loss.detach()).item()
        if not math.isfinite(global_loss):
            raise TrainingDiverged(
                f"loss is {global_loss} at step {step + 1}; stopped before the update. The last good "
                f"checkpoint (step {last_saved}) is intact. Lower train.lr, set train.grad_clip or use "
                "train.precision=fp32."
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip).item()
                     if tc.grad_clip > 0 else None)
        optimizer.step()
        update_ema(ema, model, min(tc.ema_decay, (1 + step) / (10 + step)) if tc.ema_warmup else tc.ema_decay)
        step += 1
        final_loss = global_loss
        window_loss += global_loss
        window_steps += 1

        if env.is_main:
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{global_loss:.4f}")
            if step % tc.log_every == 0 or step == tc.steps:
                elapsed = time.perf_counter() - window_start
                record = {"step": step, "loss": window_loss / window_steps, "lr": tc.lr,
                          "steps_per_s": window_steps / max(elapsed, 1e-9), "time": time.time()}
                if grad_norm is not None:
                    record["grad_norm"] = grad_norm
                log.write(record)
                window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
        if grids is not None and (step % tc.sample_every == 0 or step == tc.steps):
            grids.save(ema, step)
        if evaluator is not None and (step % tc.eval_every == 0 or step == tc.steps):
            log.write({"step": step, **evaluator(ema)})
        if (tc.ckpt_every and step % tc.ckpt_every == 0) or step == tc.steps or step == stop_after:
            if env.is_main:
                save_checkpoint(run_dir, step, config, model, ema, optimizer,
                                {"data_position": step * tc.global_batch, "world_size": env.world_size},
                                keep=tc.keep_checkpoints)
            env.barrier()
            last_saved = step
        if stop_after is not None and step >= stop_after:
            break
    if bar is not None:
        bar.close()
    return {"step": step, "final_loss": final_loss, "run_dir": str(run_dir)}


def _check_data_fits_model(dataset, config: RunConfig) -> None:
    m = config.model
    problems = []
    if dataset.channels != m.in_channels:
        problems.append(f"model.in_channels={m.in_channels} but the data has {dataset.channels} channels")
    if dataset.image_size != m.input_size:
        problems.append(f"model.input_size={m.input_size} but the data is {dataset.image_size}x{dataset.image_size}")
    if dataset.num_classes > m.num_classes:
        problems.append(f"model.num_classes={m.num_classes} but the data has {dataset.num_classes} classes")
    if problems:
        raise ValueError("data and model disagree: " + "; ".join(problems))


class _SampleGrid:
    """EMA samples on fixed noise and labels (8 per class, at most 10 classes), saved as labelled PNGs
    under RUN/samples/. Latent models need a VAE decoder to show pixels, so they get no grid."""

    def __init__(self, config: RunConfig, dataset, env: Distributed, run_dir: Path):
        m = config.model
        self.config, self.env, self.run_dir = config, env, run_dir
        classes = min(m.num_classes, 10)
        self.labels = torch.arange(classes).repeat_interleave(8)
        g = torch.Generator().manual_seed(config.train.seed + 12345)
        self.noise = torch.randn(len(self.labels), m.in_channels, m.input_size, m.input_size, generator=g)
        self.class_names = list(dataset.class_names)[:classes]
        self.enabled = m.in_channels in (1, 3)

    def save(self, ema, step: int) -> None:
        from dar.data import to_uint8
        from dar.images import save_labelled_grid
        from dar.sampling import sample

        if not self.enabled:
            return
        x, _ = sample(ema, self.noise.to(self.env.device), self.labels.to(self.env.device), self.config.sampler)
        save_labelled_grid(to_uint8(x.cpu()), self.labels.tolist(), self.class_names,
                           self.run_dir / "samples" / f"step_{step:07d}.png")


class _PeriodicEval:
    """FD-FMNIST / precision / recall / class accuracy of EMA samples, for FID-vs-iteration curves.
    Uses the in-domain classifier shipped for the built-in dataset; fixed noise and balanced labels."""

    def __init__(self, config: RunConfig, env: Distributed):
        from dar.evaluate import InDomainEvaluator

        m = config.model
        self.config, self.env = config, env
        self.evaluator = InDomainEvaluator()
        n = config.train.eval_samples
        self.labels = torch.arange(n) % m.num_classes
        g = torch.Generator().manual_seed(config.train.seed + 54321)
        self.noise = torch.randn(n, m.in_channels, m.input_size, m.input_size, generator=g)

    def __call__(self, ema) -> dict:
        from dar.data import to_uint8
        from dar.sampling import sample

        started = time.perf_counter()
        images, nfe = [], 0
        for noise, labels in zip(self.noise.split(256), self.labels.split(256)):
            x, info = sample(ema, noise.to(self.env.device), labels.to(self.env.device), self.config.sampler)
            images.append(to_uint8(x.cpu()))
            nfe = info["nfe"]
        metrics = self.evaluator(np.concatenate([np.asarray(i) for i in images]), self.labels.numpy())
        return {**{f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))},
                "eval/num_samples": len(self.labels), "eval/nfe": nfe, "eval/sampler": self.config.sampler.method,
                "eval/seconds": time.perf_counter() - started}
