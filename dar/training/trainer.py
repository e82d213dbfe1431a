"""Training: SiT's recipe (AdamW, EMA, label dropout, velocity loss) on 1..N processes.

Determinism is by construction: every random number of step ``s`` (which examples, flips, label
drops, t, noise) comes from a generator seeded by ``(seed, s)`` and is drawn for the whole global
batch, of which each process takes its slice. So the data position is the step, a resumed run
repeats exactly what an uninterrupted one would have done, and N processes see the same batch as
one process with the same global batch.

Launch: ``dar train`` (one process) or ``torchrun --nproc_per_node N -m dar.cli train`` (nccl on GPU,
gloo on CPU). ``train.parallel`` chooses how several processes share the model: ``ddp`` (a full
replica per process, gradients all-reduced) or ``fsdp`` (FSDP2: parameters, gradients, optimizer state
and EMA sharded per block; see :mod:`dar.training.parallel`). ``fsdp`` shards with one process too
(launched by torchrun or not). Checkpoints are the same full files either way, so a run may switch
between one process, ddp and fsdp, and change its number of processes, when it resumes.

N nodes x 8 GPUs (run the same command on every node; HOST is node 0's address, RUN any id shared by
the nodes of one job)::

    torchrun --nnodes N --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 --rdzv_id RUN \
        -m dar.cli train --preset imagenet256-xl --run-dir RUN_DIR train.parallel=fsdp data.path=LATENTS

The run dir must be on a file system all nodes share (rank 0 writes checkpoints, every rank reads them
on resume). ``train.global_batch`` must be divisible by the number of processes (N x 8).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
from torch.nn.parallel import DistributedDataParallel

from dar.diffusion.transport import Transport
from dar.errors import CheckpointError, TrainingDiverged
from dar.files import atomic_write_text, directory_lock
from dar.models.sit import build_model, count_parameters
from dar.seeds import Stream, seeded_generator
from dar.training.checkpoint import (
    clear_earlier_records,
    latest_checkpoint,
    load_pretrained,
    load_training_state,
    read_state,
    remove_partial_checkpoints,
    save_checkpoint,
)
from dar.training.config import RunConfig
from dar.training.monitors import PeriodicEval, SampleGrid
from dar.training.repa import alignment_loss, alignment_targets
from dar.training.parallel import (
    full_optimizer_state_dict,
    full_state_dict,
    local_tensor,
    gather_into,
    shard_like,
    shard_model,
)
from dar.training.runtime import (
    Distributed,
    EpochSampler,
    load_batch,
)


# Config fields that may differ when a run is resumed: they change bookkeeping, not the trajectory.
RESUMABLE_CHANGES = {"train.steps", "train.log_every", "train.ckpt_every", "train.sample_every",
                     "train.eval_every", "train.eval_samples", "train.keep_checkpoints", "train.compile",
                     "train.grad_checkpointing", "train.routing_backend", "train.parallel", "data.num_workers",
                     "data.bad_images", "data.vae", "repa.cache_dir",
                     "data.path"}  # data.path, data.bad_images: only to the same data (checked by fingerprint)


class StepInputs(NamedTuple):
    """Everything random about one step, for the whole global batch."""

    x1: torch.Tensor  # [B, C, H, W] data (flipped where ``flipped``)
    y: torch.Tensor  # [B] labels, num_classes where dropped
    x0: torch.Tensor  # [B, C, H, W] noise
    t: torch.Tensor  # [B]
    indices: torch.Tensor  # [B] dataset positions of the examples
    flipped: torch.Tensor  # [B] bool


def make_step_inputs(dataset, sampler: EpochSampler, config: RunConfig, step: int, num_classes: int) -> StepInputs:
    g = seeded_generator(config.train.seed, step, Stream.TRAIN_STEP)
    indices = sampler.indices(step)
    x1, y = load_batch(dataset, indices, seeded_generator(config.train.seed, step, Stream.TRAIN_LATENTS))
    B = x1.shape[0]
    flip = torch.zeros(B, dtype=torch.bool)
    if config.data.hflip:
        flip = torch.rand(B, generator=g) < 0.5
        x1 = torch.where(flip[:, None, None, None], x1.flip(-1), x1)
    drop = torch.rand(B, generator=g) < config.train.label_dropout
    y = torch.where(drop, torch.full_like(y, num_classes), y)
    t = torch.rand(B, generator=g)
    x0 = torch.randn(x1.shape, generator=g)
    return StepInputs(x1, y, x0, t, indices, flip)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model. Sharded (FSDP) modules: each rank lerps its own shard
    (EMA and model are sharded alike), the same elementwise update, with no communication."""
    torch._foreach_lerp_([local_tensor(p) for p in ema.parameters()],
                         [local_tensor(p) for p in model.parameters()], 1.0 - decay)


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
    """RUN/metrics.jsonl, one JSON record per line (plus TensorBoard when installed). A kill during an
    append can leave a torn last line: it is dropped when the log is opened, never blocking a resume."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        self.tensorboard = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(path.parent / "tensorboard"))
            except Exception:  # tensorboard is optional: JSONL is the record
                self.tensorboard = None

    def records(self) -> list[dict]:
        """Every complete record; a line that does not parse (a torn append) is skipped."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

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
        """On resume, keep the complete records up to the checkpoint's step (the replayed steps log
        again); torn lines go too."""
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in self.records() if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def last(self, key: str):
        values = [r[key] for r in self.records() if key in r]
        return values[-1] if values else None


class ProgressReport:
    """A progress bar on a terminal; otherwise one plain line per ``log_every`` steps (a bar written to a
    file or pipe is two frames per step). Events (checkpoints, grids) are printed as lines either way."""

    def __init__(self, enabled: bool, total: int, initial: int):
        self.bar = None
        self.plain = enabled and not sys.stderr.isatty()
        self.total = total
        if enabled and not self.plain:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def step(self, loss: float):
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}")

    def window(self, step: int, loss: float, steps_per_s: float):
        if self.plain:
            eta = (self.total - step) / max(steps_per_s, 1e-9)
            print(f"[dar] step {step}/{self.total}  loss {loss:.4f}  {steps_per_s:.2f} steps/s  "
                  f"eta {int(eta // 60)}m{int(eta % 60):02d}s", flush=True)

    def event(self, text: str):
        if self.bar is not None:
            self.bar.write(f"[dar] {text}")
        elif self.plain:
            print(f"[dar] {text}", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def data_record(config: RunConfig, dataset) -> dict:
    """What identifies the training data of a run: stored in every checkpoint, checked on resume."""
    return {"name": config.data.name, "path": config.data.path, "size": len(dataset),
            "sha256": dataset.fingerprint()}


def train(config: RunConfig, run_dir: str | Path, resume: bool = False, device: str | None = None,
          progress: bool = True, stop_after: int | None = None, overwrite: bool = False,
          allow_data_change: bool = False) -> dict:
    """Train (or continue) the run in ``run_dir``. A run dir with checkpoints is always continued from
    its latest one (the config must agree, see RESUMABLE_CHANGES, and the data must be the same unless
    ``allow_data_change``, which is recorded); ``resume=True`` additionally requires that a checkpoint
    exists. A run dir with an earlier run's records but no checkpoint is refused unless ``overwrite``.
    ``stop_after`` ends the process after that step (tests use it to simulate an interruption).
    Returns a summary dict."""
    run_dir = Path(run_dir)
    env = Distributed(device, parallel=config.train.parallel)
    try:
        with directory_lock(run_dir, "dar train") if env.is_main else contextlib.nullcontext():
            return Trainer(config, run_dir, env, progress).run(resume, stop_after, overwrite, allow_data_change)
    finally:
        env.close()


class Trainer:
    """One run: the model, its EMA and optimizer, the data, and the loop that steps them."""

    def __init__(self, config: RunConfig, run_dir: Path, env: Distributed, progress: bool):
        from dar.data import make_dataset

        tc = config.train
        if tc.global_batch % env.world_size:
            raise ValueError(f"train.global_batch={tc.global_batch} is not divisible by {env.world_size} processes")
        self.config, self.run_dir, self.env, self.progress = config, run_dir, env, progress
        self.local_batch = tc.global_batch // env.world_size
        self.dataset = make_dataset(config.data.name, config.data.path, "train", config.data.image_size,
                                    bad_images=config.data.bad_images)
        _check_data_fits_model(self.dataset, config)
        torch.manual_seed(tc.seed)
        self.model = build_model(config.model, config.projector).to(env.device)
        self.model.gradient_checkpointing = tc.grad_checkpointing
        self.model.router.set_backend(tc.routing_backend)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.sharded = tc.parallel == "fsdp"
        # Under FSDP the grids and evaluation (rank 0) read an unsharded copy of the EMA, refreshed from
        # the shards when they run (a copy, not a new model: building one would draw from the RNG)
        monitored = env.is_main and bool(tc.sample_every or tc.eval_every)
        self._ema_replica = copy.deepcopy(self.ema) if self.sharded and monitored else None
        if self.sharded:  # before the optimizer, which must hold the sharded parameters
            shard_model(self.model, env.mesh, tc.precision)
            shard_like(self.ema, self.model, env.mesh)
        self.optimizer = torch.optim.AdamW(parameter_groups(self.model, tc), lr=tc.lr, weight_decay=tc.weight_decay,
                                           betas=tc.betas)
        # REPA: the encoder's features of every training example (computed once, then read from disk)
        self.targets = alignment_targets(config, self.dataset, progress and env.is_main) if config.repa.enabled else None
        self.transport = Transport(config.transport_path)
        self.log = MetricsLog(run_dir / "metrics.jsonl", env.is_main)
        self.data = data_record(config, self.dataset)
        self.data_changes: list[dict] = []
        self.init_record: dict | None = None  # train.init_from: what a new run was initialised from

    # -- the run directory ------------------------------------------------------------------------

    def restore(self, resume: bool, overwrite: bool, allow_data_change: bool) -> int:
        """The step to start from: 0 for a new run, the latest checkpoint's step otherwise."""
        run_dir, tc = self.run_dir, self.config.train
        if self.env.is_main:
            for partial in remove_partial_checkpoints(run_dir):
                print(f"[dar] removed {partial}, left by an interrupted checkpoint write", flush=True)
        latest = latest_checkpoint(run_dir)
        if latest is None:
            if resume:
                raise CheckpointError(f"--resume given but {run_dir} has no checkpoint")
            self._claim_fresh_run_dir(overwrite)
            if tc.init_from is not None:
                self.init_record = load_pretrained(tc.init_from, self.model, self.ema, self.config)
                if self.env.is_main:
                    print(f"[dar] initialised from {self.init_record['file']} "
                          f"({self.init_record['router_weights_initialised']} router tensors at their init)", flush=True)
            return 0
        state = read_state(latest)
        # through RunConfig, so that fields added since the checkpoint was written compare at their defaults
        saved = RunConfig.from_dict(state["config"]).to_dict()
        changed = [k for k in config_differences(saved, self.config.to_dict()) if k not in RESUMABLE_CHANGES]
        if changed:
            raise ValueError(f"{run_dir} was started with a different config ({', '.join(changed)}); "
                             "use a new run directory or the original settings")
        if tc.steps < state["step"]:
            raise ValueError(f"train.steps={tc.steps} is below the step of {latest} ({state['step']}): a run "
                             "cannot be shortened; use a new run directory, or give train.steps >= "
                             f"{state['step']} to continue")
        self.data_changes = list(state.get("data_changes", []))
        self.init_record = state.get("init_from")
        self._check_same_data(state.get("data"), latest, allow_data_change)
        load_training_state(latest, self.model, self.ema, self.optimizer)
        return state["step"]

    def _claim_fresh_run_dir(self, overwrite: bool) -> None:
        clear_earlier_records(self.run_dir, ("metrics.jsonl", "config.json", "samples", "tensorboard"), overwrite,
                              remove=self.env.is_main)
        self.env.barrier()

    def _check_same_data(self, saved: dict | None, checkpoint: Path, allow_change: bool) -> None:
        if saved is None:  # checkpoints written before data was recorded: nothing to compare
            return
        if (saved.get("size"), saved.get("sha256")) == (self.data["size"], self.data["sha256"]):
            return
        if not allow_change:
            raise ValueError(
                f"the training data differ from those of {checkpoint}: it was trained on {saved.get('name')} "
                f"{saved.get('path')} ({saved.get('size'):,} examples, sha256 {str(saved.get('sha256'))[:12]}...), "
                f"now {self.data['name']} {self.data['path']} ({self.data['size']:,} examples, sha256 "
                f"{self.data['sha256'][:12]}...); use the original data, or --allow-data-change to continue on "
                "these (the change is recorded in the checkpoints and metrics.jsonl)")
        self.data_changes.append({"from": saved, "to": self.data})

    # -- the loop ---------------------------------------------------------------------------------

    def run(self, resume: bool, stop_after: int | None, overwrite: bool, allow_data_change: bool) -> dict:
        config, tc, env, run_dir = self.config, self.config.train, self.env, self.run_dir
        step = self.restore(resume, overwrite, allow_data_change)
        if step == tc.steps:
            last_loss = MetricsLog(run_dir / "metrics.jsonl", True).last("loss")
            if env.is_main:
                print(f"[dar] {run_dir} already finished at step {step} (train.steps={tc.steps}); "
                      "raise train.steps to continue it", flush=True)
            return {"step": step, "final_loss": last_loss, "run_dir": str(run_dir), "already_finished": True}
        if env.is_main:
            atomic_write_text(run_dir / "config.json", config.to_json())
        self.log.truncate_after(step)
        if env.is_main and self.data_changes and self.data_changes[-1]["to"] == self.data:
            self.log.write({"step": step, "event": "data_change", **self.data_changes[-1]})
        self._announce(step)

        train_model = torch.compile(self.model) if tc.compile else self.model
        if env.world_size > 1 and not self.sharded:
            train_model = DistributedDataParallel(
                train_model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
        sampler = EpochSampler(len(self.dataset), tc.global_batch, tc.seed)
        autocast = (torch.autocast(env.device.type, dtype=torch.bfloat16) if tc.precision == "bf16"
                    else contextlib.nullcontext())
        grids = SampleGrid(config, self.dataset, env, run_dir) if env.is_main and tc.sample_every else None
        evaluator = PeriodicEval(config, env) if env.is_main and tc.eval_every else None
        report = ProgressReport(env.is_main and self.progress, tc.steps, step)

        if step == 0 and tc.init_from is not None and tc.eval_every:
            # the initialised model's quality (e.g. a converted residual model before any fine-tuning)
            ema = self._full_ema()
            if evaluator is not None:
                self.log.write({"step": 0, **evaluator(ema)})
        window, window_steps, window_start = {}, 0, time.perf_counter()
        last_saved = step if step > 0 else None
        self.model.train()
        final_loss = None
        try:
            while step < tc.steps:
                losses, grad_norm = self._step(train_model, sampler, autocast, step, last_saved)
                step += 1
                final_loss = losses["loss"]
                for name, value in losses.items():
                    window[name] = window.get(name, 0.0) + value
                window_steps += 1
                report.step(final_loss)
                if env.is_main and (step % tc.log_every == 0 or step == tc.steps):
                    steps_per_s = window_steps / max(time.perf_counter() - window_start, 1e-9)
                    means = {name: total / window_steps for name, total in window.items()}
                    record = {"step": step, "loss": means.pop("loss"), "lr": tc.lr, **means,
                              "steps_per_s": steps_per_s, "time": time.time()}
                    if grad_norm is not None:
                        record["grad_norm"] = grad_norm
                    self.log.write(record)
                    report.window(step, record["loss"], steps_per_s)
                    window, window_steps, window_start = {}, 0, time.perf_counter()
                # every rank evaluates these conditions alike: gathering a sharded EMA takes them all
                grid_due = tc.sample_every and (step % tc.sample_every == 0 or step == tc.steps)
                eval_due = tc.eval_every and (step % tc.eval_every == 0 or step == tc.steps)
                if grid_due or eval_due:
                    ema = self._full_ema()
                    if grids is not None and grid_due:
                        grid = grids.save(ema, step)
                        if grid is not None:
                            report.event(f"wrote sample grid {grid}")
                    if evaluator is not None and eval_due:
                        self.log.write({"step": step, **evaluator(ema)})
                if (tc.ckpt_every and step % tc.ckpt_every == 0) or step == tc.steps or step == stop_after:
                    self._save(step, report)
                    last_saved = step
                if stop_after is not None and step >= stop_after:
                    break
        finally:
            report.close()
        return {"step": step, "final_loss": final_loss, "run_dir": str(run_dir)}

    def _step(self, train_model, sampler, autocast, step: int, last_saved: int | None) -> tuple[dict, float | None]:
        """One optimisation step on the global batch of ``step``: ({"loss": the global loss, and with REPA
        its velocity and alignment parts}, grad norm or None)."""
        config, tc, env = self.config, self.config.train, self.env
        inputs = make_step_inputs(self.dataset, sampler, config, step, config.model.num_classes)
        rows = env.batch_rows(tc.global_batch)
        x1, y, x0, t = (v[rows].to(env.device, non_blocking=True) for v in inputs[:4])
        losses = {}
        with autocast:
            if self.targets is None:
                loss = self.transport.loss(train_model, x1, y, x0, t).mean()
            else:
                xt, ut = self.transport.interpolate(x1, x0, t)
                prediction, projected = train_model(xt, t, y, align=True)
                features = self.targets.lookup(inputs.indices[rows], inputs.flipped[rows]).to(env.device)
                velocity = self.transport.velocity_loss(prediction, ut).mean()
                align = alignment_loss(projected, features).mean()
                loss = velocity + config.repa.weight * align
                losses = {"velocity_loss": velocity.detach(), "align_loss": align.detach()}
        global_loss = env.all_mean(loss.detach()).item()
        losses = {name: env.all_mean(value).item() for name, value in losses.items()}
        if not math.isfinite(global_loss):
            kept = (f"the last good checkpoint (step {last_saved}) is intact" if last_saved is not None else
                    "no checkpoint had been written yet")
            raise TrainingDiverged(f"loss is {global_loss} at step {step + 1}; stopped before the update, {kept}. "
                                   "Lower train.lr, set train.grad_clip or use train.precision=fp32.")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = None
        if tc.grad_clip > 0:  # sharded gradients: the norm of the full gradient (a DTensor, reduced over ranks)
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
            grad_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()
        self.optimizer.step()
        decay = min(tc.ema_decay, (1 + step) / (10 + step)) if tc.ema_warmup else tc.ema_decay
        update_ema(self.ema, self.model, decay)
        return {"loss": global_loss, **losses}, grad_norm

    def _full_ema(self) -> torch.nn.Module | None:
        """The EMA as one unsharded module for the sample grids and evaluation (rank 0 only): the EMA
        itself, or under FSDP rank 0's copy refreshed from all ranks' shards (every rank calls)."""
        return gather_into(self.ema, self._ema_replica) if self.sharded else self.ema

    def _save(self, step: int, report: ProgressReport) -> None:
        """Write checkpoint ``step``: full state dicts (gathered from every rank under FSDP), written by
        rank 0 alone."""
        env, tc = self.env, self.config.train
        if self.sharded or env.is_main:
            model, ema = full_state_dict(self.model), full_state_dict(self.ema)
            optimizer = full_optimizer_state_dict(self.optimizer)
        if env.is_main:
            parallel = tc.parallel if env.world_size > 1 or self.sharded else "single"
            path = save_checkpoint(self.run_dir, step, self.config, model, ema, optimizer,
                                   {"data_position": step * tc.global_batch, "world_size": env.world_size,
                                    "parallel": parallel, "data": self.data, "data_changes": self.data_changes,
                                    "init_from": self.init_record,
                                    # REPA: which encoder, weights and preprocessing made the alignment targets
                                    "repa_features": self.targets.key if self.targets is not None else None},
                                   keep=tc.keep_checkpoints)
            report.event(f"wrote checkpoint {path}")
        env.barrier()

    def _announce(self, step: int) -> None:
        if not self.env.is_main:
            return
        config, tc = self.config, self.config.train
        params = count_parameters(self.model)
        sharing = " (FSDP, sharded)" if self.sharded else " (DDP)" if self.env.world_size > 1 else ""
        print(f"[dar] {config.model.arch} {config.model.routing.describe}: {params['total']:,} parameters "
              f"({params['routing']:,} routing); {len(self.dataset):,} training examples; "
              f"{'resuming at' if step else 'starting from'} step {step} of {tc.steps}; "
              f"{self.env.world_size} process(es) on {self.env.device}"
              f"{sharing}; checkpoints {f'every {tc.ckpt_every} steps and ' if tc.ckpt_every else ''}at the "
              f"end in {self.run_dir / 'checkpoints'}", flush=True)
        if config.repa.enabled:
            print(f"[dar] REPA: {config.repa.encoder} features aligned with the input of block {config.repa.depth}, "
                  f"weight {config.repa.weight}, projector {params['projector']:,} parameters", flush=True)


def parameter_groups(model: torch.nn.Module, tc) -> list[dict]:
    """One group, or with ``train.router_lr_scale`` != 1 two: the router's parameters at that multiple of
    train.lr, after the rest (a single group keeps the optimizer-state layout of earlier checkpoints)."""
    if tc.router_lr_scale == 1.0:
        return [{"params": list(model.parameters())}]
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if not n.startswith("router.")]},
            {"params": [p for n, p in named if n.startswith("router.")], "lr": tc.lr * tc.router_lr_scale}]


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
