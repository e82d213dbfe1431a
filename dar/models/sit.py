"""SiT (Ma et al., 2024) with a pluggable depth stream: the plain residual (``routing.mode="residual"``,
bit for bit the official SiT) or Diffusion-Adaptive Routing.

Parameter names, shapes, initialisation and forward semantics follow the official SiT ``models.py``,
so its checkpoints load directly (:func:`load_official_sit_state_dict`). DAR models add only the
``router.*`` parameters. The forward loop runs sublayer by sublayer because DAR gives every
sublayer (attention and MLP separately) its own input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dar.routing import RoutingConfig, build_router

# depth, hidden size, heads. SiT's four sizes, plus small CPU sizes (head dim 32) for laptops and tests.
ARCHITECTURES = {
    "SiT-S": (12, 384, 6),
    "SiT-B": (12, 768, 12),
    "SiT-L": (24, 1024, 16),
    "SiT-XL": (28, 1152, 16),
    "SiT-Pico": (12, 64, 2),
    "SiT-Nano": (6, 128, 4),
    "SiT-Micro": (12, 128, 4),
}
PATCH_SIZES = (2, 4, 8)
ARCH_NAMES = tuple(f"{name}/{p}" for name in ARCHITECTURES for p in PATCH_SIZES)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model; stored inside every checkpoint."""

    arch: str = "SiT-XL/2"
    input_size: int = 32  # spatial size of the model input (latent or pixel grid)
    in_channels: int = 4
    num_classes: int = 1000
    learn_sigma: bool = False  # official SiT checkpoints: True (extra, unused output channels)
    mlp_ratio: float = 4.0
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    depth: int | None = None  # number of blocks; None = the architecture's (depth studies at fixed width)

    def __post_init__(self):
        if self.arch not in ARCH_NAMES:
            raise ValueError(f"model.arch={self.arch!r} is unknown; choose one of {', '.join(ARCH_NAMES)}")
        if self.input_size % self.patch_size:
            raise ValueError(f"model.input_size={self.input_size} is not divisible by patch size {self.patch_size}")
        for name in ("input_size", "in_channels", "num_classes"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.depth is not None and self.depth < 1:
            raise ValueError(f"model.depth must be >= 1 (or none for the architecture's), got {self.depth}")
        if not (math.isfinite(self.mlp_ratio) and self.mlp_ratio * self.dims[1] >= 1):
            raise ValueError(f"model.mlp_ratio must give an MLP of at least one hidden unit, got {self.mlp_ratio}")
        self.routing.check_depth(2 * self.dims[0])

    @property
    def is_latent(self) -> bool:
        """Models of other than 1 (grey) or 3 (RGB) channels make latents that a VAE decodes to pixels."""
        return self.in_channels not in (1, 3)

    @property
    def patch_size(self) -> int:
        return int(self.arch.split("/")[1])

    @property
    def dims(self) -> tuple[int, int, int]:
        """(blocks, hidden size, heads)."""
        depth, dim, heads = ARCHITECTURES[self.arch.split("/")[0]]
        return (self.depth or depth), dim, heads


@dataclass(frozen=True)
class ProjectorConfig:
    """REPA's alignment head (Yu et al., 2024): an MLP applied per token to the input of block ``depth``
    (0-based, i.e. the state after ``depth`` blocks), mapping it to the ``dim``-dimensional features of a
    frozen image encoder. Part of the model's weights so that it trains, averages and resumes with them;
    sampling never calls it."""

    depth: int
    hidden: int
    dim: int


def _xavier_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Scalar t in [0, 1] (not rescaled, as SiT) -> sinusoidal features -> MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        dtype = torch.promote_types(t.dtype, torch.float32)  # fp32 as SiT; fp64 stays fp64
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / half)
        args = t[:, None].to(dtype) * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    """Class table with one extra row (index ``num_classes``) for the unconditional / dropped label.
    Label dropout happens in the trainer, where its randomness is controlled."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Token-major memory: left as a transposed view, the whole stream inherits the conv's [D, T] layout
        # (elementwise ops keep their first input's layout), so every LayerNorm copies its input and every
        # add reads its other operand across strides.
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()  # [B, C, H, W] -> [B, T, D]


class Attention(nn.Module):
    """Multi-head self-attention with timm's parameter layout (qkv rows [q; k; v], head-major)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # 3 x [B, H, T, D/H]; (indexing qkv[i] would zero-fill [3, ...] thrice in backward)
        x = F.scaled_dot_product_attention(q, k, v)  # [B, H, T, D/H], scale (D/H)^-0.5
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiTBlock(nn.Module):
    """adaLN-Zero block, exposed as its two gated sublayers: the stream (residual or DAR) decides what
    each sublayer reads; the block only computes v = gate * Sublayer(modulate(LN(h), shift, scale))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def attn_update(self, h, shift, scale, gate):
        return gate.unsqueeze(1) * self.attn(modulate(self.norm1(h), shift, scale))

    def mlp_update(self, h, shift, scale, gate):
        return gate.unsqueeze(1) * self.mlp(modulate(self.norm2(h), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SiT(nn.Module):
    def __init__(self, config: ModelConfig, projector: ProjectorConfig | None = None):
        super().__init__()
        self.config = config
        depth, dim, heads = config.dims
        p, C = config.patch_size, config.in_channels
        self.in_channels = C
        self.out_channels = 2 * C if config.learn_sigma else C
        self.patch_size = p
        self.num_classes = config.num_classes
        self.x_embedder = PatchEmbed(p, C, dim)
        self.t_embedder = TimestepEmbedder(dim)
        self.y_embedder = LabelEmbedder(config.num_classes, dim)
        num_patches = (config.input_size // p) ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, dim), requires_grad=False)  # fixed sin-cos
        self.blocks = nn.ModuleList(SiTBlock(dim, heads, config.mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(dim, p, self.out_channels)
        self.router = build_router(dim, 2 * depth, config.routing)  # every sublayer is one routed layer
        self.gradient_checkpointing = False
        self.initialize_weights()
        self.align_depth = None
        if projector is not None:
            # Built and initialised after the network, and registered last: every other weight is drawn
            # and ordered exactly as without it (same init per seed, same optimizer-state positions).
            if not 1 <= projector.depth < depth:
                raise ValueError(f"the alignment depth must lie in [1, {depth - 1}] for {depth} blocks, got {projector.depth}")
            self.align_depth = projector.depth
            self.projector = nn.Sequential(
                nn.Linear(dim, projector.hidden), nn.SiLU(), nn.Linear(projector.hidden, projector.hidden), nn.SiLU(),
                nn.Linear(projector.hidden, projector.dim),
            )
            self.projector.apply(_xavier_linear)  # as REPA, whose SiT initialises its projectors with the rest

    def initialize_weights(self):
        """SiT's initialisation, then the router's own (zero queries -> uniform routing)."""
        self.apply(_xavier_linear)
        grid = int(self.pos_embed.shape[1] ** 0.5)
        self.pos_embed.data.copy_(torch.from_numpy(sincos_pos_embed_2d(self.pos_embed.shape[-1], grid)).unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        self.router.reset_parameters()

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        p, C = self.patch_size, self.out_channels
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], C, h * p, w * p)

    def _sublayer(self, fn, h, shift, scale, gate):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, h, shift, scale, gate, use_reentrant=False)
        return fn(h, shift, scale, gate)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        return_routing: bool = False,
        inspect: Callable | None = None,
        align: bool = False,
        features_at: int | None = None,
    ):
        """Velocity prediction. x: [B, C, H, W], t: [B] in [0, 1], y: [B] class ids (num_classes = null).

        return_routing: also return the routing weights, a list with one [B, T, |S_l|] tensor per
            aggregator (empty for residual models).
        inspect: optional ``stream -> stream`` wrapper used by diagnostics to observe or gate the
            sublayer inputs without changing the model.
        align: also return the projector's output [B, T, z_dim] for REPA. It reads the input of block
            ``align_depth``: under the residual stream the hidden state after that many blocks (REPA's
            choice), under DAR the routed mixture that block itself consumes (there is no single stream).
        features_at: also return, last, the input of block ``features_at`` [B, T, D] (0-based; the same
            state ``align`` projects, read at any block): the features DMD2's discriminator head reads
            (:mod:`dar.distillation.gan`).
        """
        v0 = self.x_embedder(x) + self.pos_embed  # [B, T, D]
        t_emb = self.t_embedder(t)  # [B, D]
        c = t_emb + self.y_embedder(y)  # [B, D]
        routed = self.router.begin(v0, t_emb, record_weights=return_routing)
        stream = inspect(routed) if inspect is not None else routed
        if align and self.align_depth is None:
            raise ValueError("align=True needs a model built with a projector (repa.enabled=true)")
        if features_at is not None and not 0 <= features_at < len(self.blocks):
            raise ValueError(f"features_at must lie in [0, {len(self.blocks) - 1}] for {len(self.blocks)} blocks, "
                             f"got {features_at}")
        aligned = features = None
        for index, block in enumerate(self.blocks):
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.adaLN_modulation(c).chunk(6, dim=1)
            h = stream.next_input()  # [B, T, D]
            if align and index == self.align_depth:
                aligned = self.projector(h)  # [B, T, z_dim]
            if index == features_at:
                features = h
            stream.push(self._sublayer(block.attn_update, h, shift_msa, scale_msa, gate_msa))
            stream.push(self._sublayer(block.mlp_update, stream.next_input(), shift_mlp, scale_mlp, gate_mlp))
        out = self.final_layer(stream.final_input(), c)  # [B, T, p*p*C_out]
        out = self.unpatchify(out)  # [B, C_out, H, W]
        if self.config.learn_sigma:
            out = out[:, : self.in_channels]  # SiT returns the velocity half only
        extras = (([routed.weights or []] if return_routing else []) + ([aligned] if align else [])
                  + ([features] if features_at is not None else []))
        return (out, *extras) if extras else out


def sincos_pos_embed_2d(dim: int, grid_size: int) -> np.ndarray:
    """MAE-style 2-D sin-cos embedding, [grid_size**2, dim] for row-major tokens: the first half of the
    channels encodes the column index, the second half the row index (as SiT/MAE)."""
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
    emb = [_sincos_1d(dim // 2, cols.reshape(-1)), _sincos_1d(dim // 2, rows.reshape(-1))]
    return np.concatenate(emb, axis=1).astype(np.float32)


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def build_model(config: ModelConfig, projector: ProjectorConfig | None = None) -> SiT:
    return SiT(config, projector)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total (as SiT reports it, fixed pos_embed included), trainable, and routing parameters."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    routing = sum(p.numel() for n, p in model.named_parameters() if n.startswith("router."))
    projector = sum(p.numel() for n, p in model.named_parameters() if n.startswith("projector."))
    return {"total": total, "trainable": trainable, "routing": routing, "projector": projector}


def load_official_sit_state_dict(model: SiT, state_dict: dict[str, torch.Tensor]) -> None:
    """Load an official SiT/DiT-style state dict (e.g. SiT-XL-2-256x256.pt, learn_sigma=True) into a
    residual or DAR model. Sigma output rows are dropped when the target predicts velocity only:
    the final linear's rows are ordered (p, q, c), so the velocity rows are those with r % 2C < C."""
    state_dict = dict(state_dict)
    if "ema" in state_dict and isinstance(state_dict["ema"], dict):
        state_dict = dict(state_dict["ema"])
    C = model.in_channels
    w = state_dict.get("final_layer.linear.weight")
    expected = model.final_layer.linear.weight.shape[0]
    if w is not None and w.shape[0] == 2 * expected and not model.config.learn_sigma:
        keep = torch.arange(w.shape[0]) % (2 * C) < C
        state_dict["final_layer.linear.weight"] = w[keep]
        state_dict["final_layer.linear.bias"] = state_dict["final_layer.linear.bias"][keep]
    own = model.state_dict()
    unexpected = sorted(set(state_dict) - set(own))
    missing = sorted(k for k in set(own) - set(state_dict) if not k.startswith("router."))
    if unexpected or missing:
        raise ValueError(f"state dict does not match {model.config.arch}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, value in state_dict.items():
        if value.shape != own[key].shape:
            raise ValueError(f"{key}: checkpoint shape {tuple(value.shape)} != model shape {tuple(own[key].shape)}")
    model.load_state_dict(state_dict, strict=False)
