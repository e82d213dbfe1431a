"""The configuration of ``dar distill``: typed, frozen, validated; ``key=value`` overrides.

Two sections take overrides: ``distill.KEY=VALUE`` (:class:`DistillConfig`) and
``student.routing.KEY=VALUE`` (the student's :class:`~dar.routing.RoutingConfig`, applied on top of the
teacher's routing, so a student without overrides has the teacher's architecture). Anything else is
an error that names the key. The resolved config (every value, the student's routing in full) is
stored in the run directory and in every checkpoint; a resumed run must agree with it except for the
bookkeeping fields of :data:`RESUMABLE_CHANGES`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field

from dar.routing import RoutingConfig
from dar.training.config import from_dict, nest

WEIGHTS = ("ema", "model")

# Fields that may differ when a run is resumed: they change bookkeeping, not the trajectory.
RESUMABLE_CHANGES = {"distill.steps", "distill.log_every", "distill.ckpt_every", "distill.sample_every",
                     "distill.eval_every", "distill.eval_samples", "distill.keep_checkpoints", "teacher"}


@dataclass(frozen=True)
class DistillConfig:
    """DMD2 (Yin et al., 2024); docs/DISTILLATION.md explains every field.

    generator_steps: 1 (a one-step generator) or N (a few-step generator with backward simulation).
    update_ratio: the fake score is updated every step, the generator every ``update_ratio``-th.
    cfg_scale: classifier-free guidance of the real score (the frozen teacher); 1 = none.
    t_min, t_max: the DM gradient's times, uniform in [t_min, t_max] (our t: 0 noise, 1 data).
    ema_decay: EMA of the generator, one update per generator update; 0 keeps no average (EMA = weights).
    warmup_steps: linear learning-rate warm-up of both optimisers (0: constant from the first step).
    teacher_weights: which weights of the teacher checkpoint are the teacher: ema (default) | model.
    lora_rank: 0 trains the generator in full; r > 0 trains rank-r LoRA adapters of its blocks' linear
        layers instead (their base weights frozen, the rest, a DAR router included, in full; see
        :mod:`dar.distillation.lora`). fake_lora_rank: the same for the fake score.
    lora_alpha: the LoRA scaling is alpha / rank, for both models; 0 (the default) means alpha = rank,
        i.e. scaling 1, whatever the rank.
    gan_generator_weight, gan_fake_weight: DMD2's GAN term (:mod:`dar.distillation.gan`), on when either
        is > 0: the weight of the generator's GAN loss (added to the DM loss) and of the discriminator's
        (added to the fake score's loss). gan_depth: the block whose routed input D's head reads; 0
        (the default) means half the blocks.
    """

    steps: int = 2000
    generator_steps: int = 1
    update_ratio: int = 5
    cfg_scale: float = 1.5
    student_lr: float = 1e-4
    fake_lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    grad_clip: float = 10.0
    global_batch: int = 32
    seed: int = 0
    t_min: float = 0.02
    t_max: float = 0.98
    ema_decay: float = 0.99
    ema_warmup: bool = True
    teacher_weights: str = "ema"
    lora_rank: int = 0
    fake_lora_rank: int = 0
    lora_alpha: float = 0.0
    gan_generator_weight: float = 0.0
    gan_fake_weight: float = 0.0
    gan_depth: int = 0
    log_every: int = 50
    ckpt_every: int = 500
    sample_every: int = 500
    eval_every: int = 0
    eval_samples: int = 1000
    keep_checkpoints: int = 2

    def __post_init__(self):
        for name in ("steps", "generator_steps", "update_ratio", "global_batch", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"distill.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "ckpt_every", "sample_every", "eval_every", "eval_samples", "keep_checkpoints",
                     "lora_rank", "fake_lora_rank", "gan_depth"):
            if getattr(self, name) < 0:
                raise ValueError(f"distill.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("cfg_scale", "student_lr", "fake_lr", "weight_decay", "grad_clip", "t_min", "t_max", "ema_decay",
                     "lora_alpha", "gan_generator_weight", "gan_fake_weight"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"distill.{name} must be a finite number, got {getattr(self, name)}")
        for name in ("student_lr", "fake_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"distill.{name} must be > 0, got {getattr(self, name)}")
        if self.cfg_scale < 0:
            raise ValueError(f"distill.cfg_scale must be >= 0 (1 = no guidance), got {self.cfg_scale}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(f"distill.weight_decay and distill.grad_clip must be >= 0 (grad_clip 0 disables "
                             f"clipping), got {self.weight_decay} and {self.grad_clip}")
        if not 0.0 <= self.t_min < self.t_max < 1.0:
            raise ValueError(f"distill.t_min and distill.t_max must satisfy 0 <= t_min < t_max < 1 (t = 1 is data, "
                             f"where the data prediction is undefined), got {self.t_min} and {self.t_max}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"distill.ema_decay must be in [0, 1) (0: no average), got {self.ema_decay}")
        if not all(math.isfinite(b) and 0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"distill.betas must both lie in [0, 1), got {self.betas}")
        if self.lora_alpha < 0:
            raise ValueError(f"distill.lora_alpha must be >= 0 (0: alpha = rank), got {self.lora_alpha}")
        if self.lora_alpha and not (self.lora_rank or self.fake_lora_rank):
            raise ValueError(f"distill.lora_alpha={self.lora_alpha} has no effect without LoRA: set distill.lora_rank "
                             "and/or distill.fake_lora_rank > 0, or leave lora_alpha out")
        if self.gan_generator_weight < 0 or self.gan_fake_weight < 0:
            raise ValueError(f"distill.gan_generator_weight and distill.gan_fake_weight must be >= 0 (0: no GAN term), "
                             f"got {self.gan_generator_weight} and {self.gan_fake_weight}")
        if self.gan_depth and not self.gan:
            raise ValueError(f"distill.gan_depth={self.gan_depth} has no effect without the GAN term: set "
                             "distill.gan_generator_weight and/or distill.gan_fake_weight > 0, or leave gan_depth out")
        if self.teacher_weights not in WEIGHTS:
            raise ValueError(f"distill.teacher_weights={self.teacher_weights!r} is not one of {', '.join(WEIGHTS)}")

    def lora_alpha_for(self, rank: int) -> float:
        """The LoRA alpha of adapters of rank ``rank``: ``lora_alpha``, or ``rank`` when it is 0."""
        return self.lora_alpha or float(rank)

    @property
    def gan(self) -> bool:
        """DMD2's GAN term is on: either of its weights is > 0."""
        return self.gan_generator_weight > 0 or self.gan_fake_weight > 0

    def gan_block(self, depth: int) -> int:
        """The block (0-based) whose routed input D's head reads in a model of ``depth`` blocks."""
        if not 0 <= self.gan_depth < depth:
            raise ValueError(f"distill.gan_depth={self.gan_depth} must lie in [0, {depth - 1}] for the teacher's "
                             f"{depth} blocks (0: half of them)")
        return self.gan_depth or depth // 2

    @property
    def generator_update_steps(self) -> int:
        """How many generator updates ``steps`` steps make (steps k, 2k, ... counted from 1)."""
        return self.steps // self.update_ratio


@dataclass(frozen=True)
class StudentConfig:
    """The student's (generator's) architecture: the teacher's, with its routing replaced."""

    routing: RoutingConfig = field(default_factory=RoutingConfig)


@dataclass(frozen=True)
class DistillRunConfig:
    teacher: str  # the teacher as given: a `dar train` run dir, checkpoint dir or weights file
    distill: DistillConfig = field(default_factory=DistillConfig)
    student: StudentConfig = field(default_factory=StudentConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "DistillRunConfig":
        return from_dict(cls, data)


def resolve_distill(teacher: str, teacher_routing: RoutingConfig, overrides: typing.Sequence[str] = (),
                    stored: DistillRunConfig | None = None) -> DistillRunConfig:
    """``distill.KEY=VALUE`` and ``student.routing.KEY=VALUE`` overrides -> a validated config. The
    overrides apply to ``stored`` (the config of a run being continued) or, for a new run, to the
    defaults with the student's routing set to ``teacher_routing``."""
    if stored is not None:
        flat = {k: v for k, v in _flatten(stored.to_dict()).items() if k != "teacher"}
    else:
        flat = {f"student.routing.{k}": v for k, v in dataclasses.asdict(teacher_routing).items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"override {item!r} must look like key=value, e.g. distill.steps=1000")
        if not (key.startswith("distill.") or key.startswith("student.routing.")):
            raise ValueError(f"unknown config key {key}: `dar distill` takes distill.KEY=VALUE and "
                             "student.routing.KEY=VALUE overrides (docs/DISTILLATION.md lists them)")
        flat[key] = value.strip()
    return from_dict(DistillRunConfig, nest(flat, {"teacher": str(teacher)}))


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
