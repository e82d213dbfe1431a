"""``dar distill``: DMD2 distillation of a ``dar train`` teacher into a one- or few-step generator.

Three models: the frozen teacher (the real score, with classifier-free guidance), the fake score (a
trainable copy of the teacher that learns the generator's distribution, updated every step) and the
generator G (the student: the teacher's weights under the student's routing; a DAR student converted
from a residual teacher keeps the router at its initialisation, as ``train.init_from`` does), updated
every ``distill.update_ratio``-th step, with an EMA. :mod:`dar.distillation.dmd` holds the equations.

Step s (0-based) does, with every random number drawn from generators seeded by (seed, s):

1. labels y and noise z; for a few-step generator a step k and the noise of the rollout to it;
2. x = G's sample of step k (with gradients when s + 1 is a multiple of update_ratio);
3. on those steps: the DM loss of x, one AdamW step of G (clipped), one EMA update;
4. always: the fake score's velocity loss on x.detach(), one AdamW step of the fake score (clipped).

With DMD2's GAN term (``distill.gan_generator_weight``, ``distill.gan_fake_weight``; :mod:`dar.distillation.gan`)
step 3 adds the generator's GAN loss to the DM loss and step 4 the discriminator's loss, on x.detach() and
a batch of the teacher's training data, to the fake score's; D's head is trained by the fake score's
optimizer (after the fake score's own parameters) and saved in ``disc.safetensors``. Off by default, and
then nothing of it runs: no parameters, random numbers, files or metrics of it.

A run directory is laid out as `dar train`'s: ``config.json`` (:class:`DistillRunConfig`),
``generator_config.json`` (the RunConfig that rebuilds and samples the generator), ``metrics.jsonl``,
``samples/step_*.png`` and ``checkpoints/step_*/`` with ``model.safetensors`` / ``ema.safetensors``
(the generator, raw and EMA, with the generator's RunConfig, whose ``sampler`` is the few-step
``generator`` sampler, so `dar sample`, `dar eval` and `dar info` read them as any run), ``fake.safetensors``
(the fake score, with the teacher's RunConfig), ``optimizer.pt`` (both AdamW states) and ``state.json``.
A resumed run continues bit for bit; the teacher is the weights file recorded at the start, checked by
its SHA-256.

With LoRA (``distill.lora_rank``, ``distill.fake_lora_rank``; :mod:`dar.distillation.lora`) a model
trains adapters on frozen base weights, the teacher's. Its weights file then holds the merged model (a
plain SiT: every reader is unchanged) and ``lora.safetensors`` / ``fake_lora.safetensors`` what was
trained; a resume rebuilds the base from the teacher file and loads those. The EMA is always a plain
SiT, averaged from the merged generator.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

from dar.diffusion.samplers import SamplerConfig
from dar.diffusion.transport import Transport
from dar.distillation.config import RESUMABLE_CHANGES, DistillRunConfig, resolve_distill
from dar.distillation.dmd import distribution_matching, fake_score_loss, generator_output
from dar.distillation.gan import (
    DiscriminatorHead,
    RealData,
    discriminator_logits,
    discriminator_loss,
    frozen,
    generator_loss as gan_generator_loss,
)
from dar.distillation.lora import add_lora, load_trainable_state, merged_state_dict, trainable_state_dict
from dar.errors import CheckpointError, TrainingDiverged
from dar.files import atomic_write_text, directory_lock
from dar.models.sit import build_model, count_parameters
from dar.provenance import weights_sha256
from dar.seeds import Stream, seeded_generator
from dar.training.checkpoint import (
    FORMAT,
    clear_earlier_records,
    optimizer_state_errors,
    latest_checkpoint,
    load_model,
    load_pretrained,
    load_state_into,
    read_state,
    read_weights,
    remove_partial_checkpoints,
    save_weights,
    write_checkpoint_dir,
    weights_file,
)
from dar.training.config import RunConfig
from dar.training.monitors import PeriodicEval, SampleGrid
from dar.training.runtime import Distributed
from dar.training.trainer import MetricsLog, ProgressReport, config_differences

RUN_RECORDS = ("metrics.jsonl", "config.json", "generator_config.json", "samples", "tensorboard")
# the checkpoint file of each trained model's adapters, when it is trained with LoRA
ADAPTER_FILES = {"model": "lora.safetensors", "fake": "fake_lora.safetensors"}
DISC_FILE = "disc.safetensors"  # D's head (DMD2's GAN term), written only when the term is on


def distill(teacher: str | Path | None, run_dir: str | Path, overrides=(), device: str | None = None,
            progress: bool = True, stop_after: int | None = None, overwrite: bool = False) -> dict:
    """Distil ``teacher`` (a `dar train` run dir, checkpoint dir or weights file) into the generator of
    ``run_dir`` with ``distill.KEY=VALUE`` / ``student.routing.KEY=VALUE`` ``overrides``, or continue
    the run there (``teacher`` may then be None: the recorded one is used). ``stop_after`` ends after
    that step (tests simulate an interruption with it). Returns a summary dict."""
    run_dir = Path(run_dir)
    env = Distributed(device)
    try:
        if env.world_size > 1:
            raise ValueError("dar distill runs in one process (no torchrun); it holds three models on one device")
        with directory_lock(run_dir, "dar distill"):
            return Distiller(teacher, run_dir, list(overrides), env, progress, overwrite).run(stop_after)
    finally:
        env.close()


def load_teacher(path: str | Path, which: str, device) -> tuple[torch.nn.Module, RunConfig, dict]:
    """The teacher (not yet frozen) with the record that identifies it (weights file, SHA-256, step)."""
    file = weights_file(path, which)
    teacher, config, step = load_model(file, which, device)
    return teacher, config, {"path": str(path), "file": str(file), "weights": which, "step": step,
                             "weights_sha256": weights_sha256(file)}


def generator_run_config(teacher_config: RunConfig, config: DistillRunConfig, teacher_file: str) -> RunConfig:
    """The RunConfig stored with the generator's weights: the teacher's model under the student's routing,
    the few-step ``generator`` sampler, and the distillation's settings where a RunConfig has them."""
    d = config.distill
    try:
        model = dataclasses.replace(teacher_config.model, routing=config.student.routing)
    except ValueError as error:
        raise ValueError(f"student.routing does not fit the teacher's {teacher_config.model.arch}: {error}") from None
    train = dataclasses.replace(
        teacher_config.train, steps=d.steps, global_batch=d.global_batch, lr=d.student_lr,
        weight_decay=d.weight_decay, betas=d.betas, ema_decay=d.ema_decay, ema_warmup=d.ema_warmup,
        grad_clip=d.grad_clip, seed=d.seed, log_every=d.log_every, ckpt_every=d.ckpt_every,
        sample_every=d.sample_every, eval_every=d.eval_every, eval_samples=d.eval_samples,
        keep_checkpoints=d.keep_checkpoints, init_from=teacher_file, router_lr_scale=1.0)
    # a REPA teacher's alignment head is not part of the generator (load_pretrained leaves it out)
    repa = dataclasses.replace(teacher_config.repa, enabled=False)
    return dataclasses.replace(teacher_config, model=model, train=train, repa=repa,
                               sampler=SamplerConfig(method="generator", steps=d.generator_steps))


class Distiller:
    """One distillation run: teacher, fake score, generator and its EMA, two optimisers, the loop."""

    def __init__(self, teacher: str | Path | None, run_dir: Path, overrides: list[str], env: Distributed,
                 progress: bool, overwrite: bool):
        self.run_dir, self.env, self.progress, self.overwrite = run_dir, env, progress, overwrite
        for partial in remove_partial_checkpoints(run_dir):
            print(f"[dar] removed {partial}, left by an interrupted checkpoint write", flush=True)
        latest = latest_checkpoint(run_dir)
        self.state = read_state(latest) if latest is not None else None
        self.latest = latest
        if self.state is None and teacher is None:
            raise ValueError(f"{run_dir} holds no distillation to continue: give --teacher RUN_OR_CHECKPOINT")
        if self.state is not None and "distill" not in self.state:
            raise CheckpointError(f"{latest} is not a `dar distill` checkpoint (a `dar train` run?): use another --run-dir")

        if self.state is None:
            which = _teacher_weights(overrides)
            self.teacher, teacher_config, self.teacher_record = load_teacher(teacher, which, env.device)
            self.config = resolve_distill(str(teacher), teacher_config.model.routing, overrides)
        else:
            self.teacher, teacher_config, self.teacher_record = self._recorded_teacher(teacher)
            try:
                stored = DistillRunConfig.from_dict(self.state["distill"])
            except ValueError as error:
                raise CheckpointError(f"{latest}/state.json: field distill is not a valid config: {error}") from None
            self.config = resolve_distill(stored.teacher if teacher is None else str(teacher),
                                          stored.student.routing, overrides, stored=stored)
            # the stored config as parsed, so that fields added since the run started compare at their defaults
            changed = [k for k in config_differences(stored.to_dict(), self.config.to_dict())
                       if k not in RESUMABLE_CHANGES]
            if changed:
                raise ValueError(f"{run_dir} was started with a different config ({', '.join(changed)}); use a new "
                                 "run directory or the original settings")
            if self.config.distill.steps < self.state["step"]:
                raise ValueError(f"distill.steps={self.config.distill.steps} is below the step of {latest} "
                                 f"({self.state['step']}): a run cannot be shortened")
        # the fake score: a trainable copy of the teacher (fixed buffers-as-parameters such as pos_embed stay
        # fixed: the copy keeps the flags the model was built with); then the teacher is frozen
        self.fake = copy.deepcopy(self.teacher).train()
        self.teacher.requires_grad_(False).eval()
        d = self.config.distill
        self.teacher_config = teacher_config
        self._check_teacher(teacher_config)
        self.generator_config = generator_run_config(teacher_config, self.config, self.teacher_record["file"])
        self.transport = Transport(teacher_config.transport_path)

        torch.manual_seed(d.seed)
        self.student = build_model(self.generator_config.model).to(env.device)
        self.ema = copy.deepcopy(self.student).requires_grad_(False).eval()
        # the student starts as the teacher (a converted DAR student: routers at their init), as train.init_from
        self.init_record = load_pretrained(self.teacher_record["file"], self.student, self.ema, self.generator_config)
        # adapters on the teacher's weights (after the seed: their random init is the run's, fresh or resumed)
        for model, rank in ((self.student, d.lora_rank), (self.fake, d.fake_lora_rank)):
            if rank:
                add_lora(model, rank, d.lora_alpha_for(rank))
        # DMD2's GAN term: D's head, made after every other weight so that each is drawn as without it
        self.head = self.real = None
        if d.gan:
            depth, dim, _ = teacher_config.model.dims
            self.gan_block = d.gan_block(depth)
            self.head = DiscriminatorHead(dim).to(env.device)
            self.real = RealData(teacher_config)
        self.student.train()
        self.opt_student = self._adamw(self.student, d.student_lr, d.lora_rank)
        self.opt_fake = self._adamw(self.fake, d.fake_lr, d.fake_lora_rank, self.head)
        self.generator_updates = 0

    # -- set-up -----------------------------------------------------------------------------------

    def _adamw(self, model: torch.nn.Module, lr: float, lora_rank: int,
               head: torch.nn.Module | None = None) -> torch.optim.AdamW:
        """A LoRA model's optimizer holds its trainable parameters only. A fully trained model's holds all of
        them, as it always has: the fixed pos_embed never has a gradient (AdamW skips it), and keeping its
        place keeps the layout of earlier runs' optimizer.pt. D's ``head`` (the fake score's, with the GAN
        term) comes after the model's own parameters, so a run without it keeps that layout."""
        d = self.config.distill
        params = [p for p in model.parameters() if p.requires_grad] if lora_rank else list(model.parameters())
        if head is not None:
            params += list(head.parameters())
        return torch.optim.AdamW(params, lr=lr, betas=d.betas, weight_decay=d.weight_decay)

    def _fake_side(self) -> list[torch.nn.Parameter]:
        """The parameters of the fake score's optimizer step, clipped together: the fake score's, D's head's."""
        return [*self.fake.parameters(), *(self.head.parameters() if self.head is not None else ())]

    def _trained(self) -> tuple[tuple[str, torch.nn.Module, RunConfig, int], ...]:
        """The trained models: (checkpoint name, model, the RunConfig of its weights file, LoRA rank)."""
        d = self.config.distill
        return (("model", self.student, self.generator_config, d.lora_rank),
                ("fake", self.fake, self.teacher_config, d.fake_lora_rank))

    def _recorded_teacher(self, given: str | Path | None):
        """On resume: the teacher file of the first checkpoint, unchanged (SHA-256), and if ``given``,
        the same weights as it resolves to now."""
        record = self.state["teacher"]
        file = Path(record["file"])
        if not file.is_file():
            raise CheckpointError(f"the teacher of this run, {file}, is gone: restore it to continue the run")
        teacher, config, step = load_model(file, record["weights"], self.env.device)
        if weights_sha256(file) != record["weights_sha256"]:
            raise CheckpointError(f"the teacher of this run, {file}, has changed since the run started (its weights' "
                                  "SHA-256 differs): restore the original to continue, or start a new run")
        if given is not None:
            now = weights_file(given, record["weights"])
            if weights_sha256(now) != record["weights_sha256"]:
                raise ValueError(f"--teacher {given} is now {now}, not the teacher this run started from ({file}); "
                                 "leave out --teacher to continue with the recorded one")
        return teacher, config, record

    def _check_teacher(self, teacher_config: RunConfig) -> None:
        d = self.config.distill
        if d.cfg_scale != 1.0 and teacher_config.train.label_dropout == 0.0:
            raise ValueError(f"distill.cfg_scale={d.cfg_scale} needs a teacher trained with label dropout, but the "
                             "teacher's train.label_dropout is 0 (its unconditional prediction is untrained); use "
                             "distill.cfg_scale=1")
        if d.eval_every and teacher_config.data.name != "builtin":
            raise ValueError("distill.eval_every needs a teacher trained on data.name=builtin (the in-domain "
                             "evaluator's reference); evaluate other data with `dar sample` + `dar eval`")
        routing, base = self.config.student.routing, teacher_config.model.routing
        if (routing.mode == "dar" and base.mode == "residual" and routing.chunk_size > 1 and routing.summary != "sum"
                and self.state is None):
            print(f"[dar] note: a DAR student with chunk_size={routing.chunk_size} and summary={routing.summary} does "
                  "not compute the residual teacher's function at step 0; student.routing.summary=sum does "
                  "(docs/METHOD.md §12)", flush=True)

    def restore(self) -> int:
        if self.state is None:
            clear_earlier_records(self.run_dir, RUN_RECORDS, self.overwrite)
            return 0
        path = self.latest
        for name, module, _, rank in self._trained():
            # a LoRA model's base weights are the teacher's, loaded at set-up; its weights file is derived
            file = path / (ADAPTER_FILES[name] if rank else f"{name}.safetensors")
            tensors, _ = read_weights(file)
            (load_trainable_state if rank else load_state_into)(module, tensors, file)
        if self.head is not None:  # read_weights and load_state_into name the file if missing or mismatched
            tensors, _ = read_weights(path / DISC_FILE)
            load_state_into(self.head, tensors, path / DISC_FILE)
        tensors, _ = read_weights(path / "ema.safetensors")
        load_state_into(self.ema, tensors, path / "ema.safetensors")
        file = path / "optimizer.pt"
        with optimizer_state_errors(file):
            states = torch.load(file, map_location="cpu", weights_only=True)
            self.opt_student.load_state_dict(states["generator"])
            self.opt_fake.load_state_dict(states["fake"])
        self.generator_updates = int(self.state["generator_updates"])
        return int(self.state["step"])

    # -- the loop ---------------------------------------------------------------------------------

    def run(self, stop_after: int | None) -> dict:
        d, run_dir = self.config.distill, self.run_dir
        step = self.restore()
        self.log = MetricsLog(run_dir / "metrics.jsonl", True)
        if step == d.steps:
            print(f"[dar] {run_dir} already finished at step {step} (distill.steps={d.steps}); raise distill.steps "
                  "to continue it", flush=True)
            return {"step": step, "run_dir": str(run_dir), "already_finished": True}
        atomic_write_text(run_dir / "config.json", self.config.to_json())
        atomic_write_text(run_dir / "generator_config.json", self.generator_config.to_json())
        self.log.truncate_after(step)
        self._announce(step)
        grids = None
        if d.sample_every:
            grids = SampleGrid(self.generator_config, types.SimpleNamespace(class_names=_class_names(self.generator_config)),
                               self.env, run_dir)
        evaluator = PeriodicEval(self.generator_config, self.env) if d.eval_every else None
        report = ProgressReport(self.progress, d.steps, step)
        window: dict[str, list[float]] = {}
        window_start = time.perf_counter()
        last_saved = step if step > 0 else None
        try:
            while step < d.steps:
                record = self._step(step, last_saved)
                step += 1
                for key, value in record.items():
                    window.setdefault(key, []).append(value)
                report.step(record["fake_loss"])
                if step % d.log_every == 0 or step == d.steps:
                    steps_per_s = len(window["fake_loss"]) / max(time.perf_counter() - window_start, 1e-9)
                    self.log.write({"step": step, **{k: sum(v) / len(v) for k, v in window.items()},
                                    "generator_updates": self.generator_updates, "lr_student": self._lr(d.student_lr, step - 1),
                                    "lr_fake": self._lr(d.fake_lr, step - 1), "steps_per_s": steps_per_s,
                                    "time": time.time()})
                    report.window(step, sum(window["fake_loss"]) / len(window["fake_loss"]), steps_per_s)
                    window, window_start = {}, time.perf_counter()
                if grids is not None and (step % d.sample_every == 0 or step == d.steps):
                    with self._monitor_rng():
                        grid = grids.save(self.ema, step)
                    if grid is not None:
                        report.event(f"wrote sample grid {grid}")
                if evaluator is not None and (step % d.eval_every == 0 or step == d.steps):
                    with self._monitor_rng():
                        self.log.write({"step": step, **evaluator(self.ema)})
                if (d.ckpt_every and step % d.ckpt_every == 0) or step == d.steps or step == stop_after:
                    path = self._save(step)
                    report.event(f"wrote checkpoint {path}")
                    last_saved = step
                if stop_after is not None and step >= stop_after:
                    break
        finally:
            report.close()
        return {"step": step, "generator_updates": self.generator_updates, "run_dir": str(run_dir),
                "final_fake_loss": self.log.last("fake_loss"), "final_generator_loss": self.log.last("generator_loss")}

    def _lr(self, base: float, step: int) -> float:
        warmup = self.config.distill.warmup_steps
        return base * min(1.0, (step + 1) / warmup) if warmup else base

    def is_generator_step(self, step: int) -> bool:
        """Step ``step`` (0-based) updates the generator: steps k, 2k, ... counted from 1, so the fake
        score has taken k - 1 updates on the generator's samples before the first generator update."""
        return (step + 1) % self.config.distill.update_ratio == 0

    def step_inputs(self, step: int) -> dict:
        """Every random number of step ``step``, for the whole batch, from generators seeded by (seed, step)."""
        d, m = self.config.distill, self.generator_config.model
        B, shape = d.global_batch, (d.global_batch, m.in_channels, m.input_size, m.input_size)
        g = seeded_generator(d.seed, step, Stream.DISTILL_GENERATOR)
        y = torch.randint(m.num_classes, (B,), generator=g)
        z = torch.randn(shape, generator=g)
        k = int(torch.randint(d.generator_steps, (1,), generator=g)) if d.generator_steps > 1 else 0
        rollout = [torch.randn(shape, generator=g) for _ in range(k)]
        g = seeded_generator(d.seed, step, Stream.DISTILL_DM)
        dm_t = d.t_min + (d.t_max - d.t_min) * torch.rand(B, generator=g)
        dm_noise = torch.randn(shape, generator=g)
        g = seeded_generator(d.seed, step, Stream.DISTILL_FAKE)
        fake_t = torch.rand(B, generator=g)
        fake_noise = torch.randn(shape, generator=g)
        device = self.env.device
        inputs = {"y": y.to(device), "z": z.to(device), "k": k, "rollout": [r.to(device) for r in rollout],
                  "dm_t": dm_t.to(device), "dm_noise": dm_noise.to(device), "fake_t": fake_t.to(device),
                  "fake_noise": fake_noise.to(device)}
        if self.real is not None:  # the GAN term: D's times (as the DM gradient's) and noises, then real images
            g = seeded_generator(d.seed, step, Stream.DISTILL_GAN)
            for side in ("gan_generator", "gan_fake", "gan_real"):
                inputs[f"{side}_t"] = (d.t_min + (d.t_max - d.t_min) * torch.rand(B, generator=g)).to(device)
                inputs[f"{side}_noise"] = torch.randn(shape, generator=g).to(device)
            real_x, real_y = self.real.draw(B, g)
            inputs.update(real_x=real_x.to(device), real_y=real_y.to(device))
        return inputs

    def _step(self, step: int, last_saved: int | None) -> dict[str, float]:
        d = self.config.distill
        inputs = self.step_inputs(step)
        update_generator = self.is_generator_step(step)
        x = generator_output(self.student, inputs["z"], inputs["y"], self.transport, d.generator_steps, inputs["k"],
                             inputs["rollout"], grad=update_generator)
        record: dict[str, float] = {"sample_std": x.detach().float().std().item()}
        if update_generator:
            loss, grad = distribution_matching(x, inputs["y"], self.teacher, self.fake, self.transport,
                                               inputs["dm_t"], inputs["dm_noise"], d.cfg_scale)
            if d.gan_generator_weight > 0:
                gan_loss = self._generator_gan_loss(x, inputs)
                record["gan_generator_loss"] = gan_loss.item()
                loss = loss + d.gan_generator_weight * gan_loss
            self._check_finite("generator loss", loss, step, last_saved)
            self._set_lr(self.opt_student, d.student_lr, step)
            self.opt_student.zero_grad(set_to_none=True)
            loss.backward()
            record["generator_grad_norm"] = _clip(self.student.parameters(), d.grad_clip)
            self.opt_student.step()
            decay = min(d.ema_decay, (1 + self.generator_updates) / (10 + self.generator_updates)) if d.ema_warmup \
                else d.ema_decay
            _update_ema(self.ema, _plain_weights(self.student, d.lora_rank), decay)
            self.generator_updates += 1
            record.update(generator_loss=loss.item(), dm_grad_norm=grad.norm().item())
        fake_loss = fake_score_loss(self.fake, x, inputs["y"], self.transport, inputs["fake_noise"], inputs["fake_t"])
        record["fake_loss"] = fake_loss.item()  # the denoising loss alone, with or without the GAN term
        if d.gan_fake_weight > 0:
            fake_loss = fake_loss + d.gan_fake_weight * self._discriminator_loss(x, inputs, record)
        self._check_finite("fake-score loss", fake_loss, step, last_saved)
        self._set_lr(self.opt_fake, d.fake_lr, step)
        self.opt_fake.zero_grad(set_to_none=True)
        fake_loss.backward()
        record["fake_grad_norm"] = _clip(self._fake_side(), d.grad_clip)
        self.opt_fake.step()
        return record

    def _generator_gan_loss(self, x: torch.Tensor, inputs: dict) -> torch.Tensor:
        """softplus(-D(G(z))) of the generator's samples ``x`` (with grad): the fake score and the head are
        frozen while D runs, so the gradient reaches G only and nothing leaks into the fake score's step."""
        with frozen(self.fake, self.head):
            logits = discriminator_logits(self.fake, self.head, self.gan_block, x, inputs["y"], self.transport,
                                          inputs["gan_generator_t"], inputs["gan_generator_noise"])
        return gan_generator_loss(logits)

    def _discriminator_loss(self, x: torch.Tensor, inputs: dict, record: dict[str, float]) -> torch.Tensor:
        """D's loss on the generator's samples (detached) and a real batch; logs it and D's mean logits."""
        def logits(images, labels, side):
            return discriminator_logits(self.fake, self.head, self.gan_block, images, labels, self.transport,
                                        inputs[f"{side}_t"], inputs[f"{side}_noise"])

        fake_logits = logits(x.detach(), inputs["y"], "gan_fake")
        real_logits = logits(inputs["real_x"], inputs["real_y"], "gan_real")
        loss = discriminator_loss(fake_logits, real_logits)
        record.update(gan_fake_loss=loss.item(), gan_fake_logit=fake_logits.mean().item(),
                      gan_real_logit=real_logits.mean().item())
        return loss

    def _set_lr(self, optimizer, base: float, step: int) -> None:
        for group in optimizer.param_groups:
            group["lr"] = self._lr(base, step)

    @staticmethod
    def _check_finite(what: str, loss: torch.Tensor, step: int, last_saved: int | None) -> None:
        value = loss.item()
        if not math.isfinite(value):
            kept = (f"the last good checkpoint (step {last_saved}) is intact" if last_saved is not None else
                    "no checkpoint had been written yet")
            raise TrainingDiverged(f"the {what} is {value} at step {step + 1}; stopped before the update, {kept}. "
                                   "Lower distill.student_lr / distill.fake_lr or distill.cfg_scale.")

    @contextlib.contextmanager
    def _monitor_rng(self):
        """Grids and evaluation of a multi-step generator re-noise with the global RNG (as `dar sample
        --grid` does): seed it per run, and leave the process's RNG as it was."""
        devices = [self.env.device] if self.env.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seeded_generator(self.config.distill.seed, 0, Stream.DISTILL_MONITOR).initial_seed())
            yield

    # -- checkpoints ------------------------------------------------------------------------------

    def _save(self, step: int) -> Path:
        """checkpoints/step_N/: generator, its EMA, the fake score (merged, when trained with LoRA, plus
        their adapters), D's head (with the GAN term), both optimizers, all or nothing."""
        weights = {"ema.safetensors": (self.ema.state_dict(), self.generator_config)}  # file -> (SiT state, config)
        parts = {}  # file -> trained state that is not a SiT: a LoRA model's, D's head
        for name, module, config, rank in self._trained():
            weights[f"{name}.safetensors"] = (_plain_weights(module, rank), config)
            if rank:
                parts[ADAPTER_FILES[name]] = trainable_state_dict(module)
        if self.head is not None:
            parts[DISC_FILE] = self.head.state_dict()
        # the files, plus AdamW's two moments of every trained parameter
        trained = sum(p.numel() * p.element_size() for module in (self.student, self.fake, self.head)
                      if module is not None for p in module.parameters() if p.requires_grad)
        size = sum(_nbytes(t) for t, _ in weights.values()) + sum(map(_nbytes, parts.values())) + 2 * trained

        def write(tmp: Path) -> dict:
            for file, (tensors, config) in weights.items():
                save_weights(tensors, tmp / file, config, step)
            for file, tensors in parts.items():  # no run config: not a model that dar sample could load
                save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp / file),
                          metadata={"format": FORMAT, "step": str(step)})
            torch.save({"generator": self.opt_student.state_dict(), "fake": self.opt_fake.state_dict()},
                       tmp / "optimizer.pt")
            return {"kind": "distill", "generator_updates": self.generator_updates,
                    "config": self.generator_config.to_dict(), "distill": self.config.to_dict(),
                    "teacher": self.teacher_record, "init_from": self.init_record}

        return write_checkpoint_dir(self.run_dir, step, write, size, self.config.distill.keep_checkpoints)

    def _announce(self, step: int) -> None:
        d, m = self.config.distill, self.generator_config.model
        params = count_parameters(self.ema)  # the generator as saved: a plain SiT
        kind = "one-step" if d.generator_steps == 1 else f"{d.generator_steps}-step"
        lora = "".join(f"; {what} trained with LoRA rank {rank}, alpha {d.lora_alpha_for(rank):g} "
                       f"({count_parameters(model)['trainable']:,} trainable parameters)"
                       for what, model, rank in (("generator", self.student, d.lora_rank),
                                                 ("fake score", self.fake, d.fake_lora_rank)) if rank)
        gan = (f"; GAN term on (D's head at block {self.gan_block} of the fake score, weights "
               f"{d.gan_generator_weight:g} generator / {d.gan_fake_weight:g} fake score, "
               f"{len(self.real.dataset):,} real images)" if self.head is not None else "")
        print(f"[dar] distilling {self.teacher_record['file']} ({self.teacher_config.model.routing.describe}, step "
              f"{self.teacher_record['step']}) into a {kind} {m.arch} {m.routing.describe} generator "
              f"({params['total']:,} parameters){lora}{gan}; "
              f"cfg {d.cfg_scale}, generator updated every {d.update_ratio} steps; "
              f"{'resuming at' if step else 'starting from'} step {step} of {d.steps} on {self.env.device}; "
              f"checkpoints {f'every {d.ckpt_every} steps and ' if d.ckpt_every else ''}at the end in "
              f"{self.run_dir / 'checkpoints'}", flush=True)


def _plain_weights(model: torch.nn.Module, lora_rank: int) -> dict[str, torch.Tensor]:
    """The model's weights as a plain SiT's state dict: with LoRA, the adapters merged in."""
    return merged_state_dict(model) if lora_rank else model.state_dict()


def _update_ema(ema: torch.nn.Module, weights: dict[str, torch.Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * weights, parameter by parameter (the same lerp as
    :func:`dar.training.trainer.update_ema`, from a plain state dict such as the merged generator's)."""
    params = dict(ema.named_parameters())
    torch._foreach_lerp_(list(params.values()), [weights[name] for name in params], 1.0 - decay)


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _clip(params, max_norm: float) -> float:
    """Clip the global gradient norm of ``params`` to ``max_norm`` (0: no clipping); returns the norm before
    clipping."""
    return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf")).item()


def _class_names(config: RunConfig) -> list[str]:
    from dar.generation.grid import class_names

    return class_names(config)


def _teacher_weights(overrides: list[str]) -> str:
    """distill.teacher_weights among the overrides (needed before the teacher, hence the config, is loaded)."""
    from dar.distillation.config import DistillConfig
    from dar.training.config import from_dict

    values = {"teacher_weights": v.strip() for k, _, v in (o.partition("=") for o in overrides)
              if k.strip() == "distill.teacher_weights"}
    return from_dict(DistillConfig, values, "distill.").teacher_weights

