"""DenseFormer's Depth-Weighted Averaging (Pagliardini et al. 2024, "DenseFormer: Enhancing Information
Flow in Transformers via Depth Weighted Averaging"), behind DAR's stream protocol.

The paper works on blocks. With ``X_0`` the embedding, block ``i`` (1-based) reads ``Y_{i-1}`` and its
output is ``X_i = B_i(Y_{i-1})``, the block's own residual adds included; after it a Depth-Weighted
Average (DWA) forms the next block's input

    Y_i = sum_{j in S_i} alpha_{i,j} X_j    if period | i,      Y_i = X_i otherwise,
    S_i = { j : 0 <= j <= i, j = i (mod dilation) },

with learned scalars ``alpha_{i,j}`` (one per source, shared by tokens and channels), initialised to the
identity ``alpha_{i,i} = 1``, ``alpha_{i,j<i} = 0``, so that the model starts as the plain residual
transformer. The network's output head reads ``Y_N``, the DWA after the last block (``X_N`` when
``period`` does not divide ``N``, as the paper's rule gives). ``dilation`` = ``period`` = 1 is the dense
DenseFormer ("1x1"); the paper's "k x p" sparsification is ``dilation=k, period=p``.

Mapping onto our sublayers: a "block" is ``config.block_size`` consecutive routed sublayers (2 = one SiT
block: attention + MLP, the unit the paper averages over). Inside a block the stream is the plain
residual, ``h <- h + v`` after every sublayer; when the ``block_size``-th sublayer of block ``i`` has
been pushed, ``h`` is ``X_i`` (= ``Y_{i-1}`` plus the block's gated sublayer outputs) and is replaced by
``Y_i``. So with ``L`` sublayers there are ``N = L / block_size`` blocks, ``X_j`` is the stream after
sublayer ``j * block_size`` (before that boundary's averaging), and ``final_input()`` is ``Y_N``.
Parameters: ``sum_{i <= N, period | i} (floor(i / dilation) + 1)``, i.e. ``N (N + 3) / 2`` dense
(SiT-XL/2: N = 28, 434 scalars).

Parameters live in ``alphas`` (an ``nn.ParameterList``): ``alphas[m]`` holds the weights of the m-th
DWA (after block ``averaged_blocks[m]``), ordered as its sources ``block_sources[m]`` (increasing j, the
newest block output last). Numerics: the weighted sum accumulates in fp32 at least and is rounded once
to the stream's dtype (the promoted dtype of the block outputs, as the residual adds give: fp32 under
bf16 autocast when ``v0`` is fp32). With the identity weights every product is exact (``1 * x``,
``0 * x``), so at initialisation the stream is bit for bit the residual one.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from dar.routing.comparison import ComparisonRouter
from dar.routing.config import RoutingConfig
from dar.routing.ops import compiling, stat_dtype

__all__ = ["DenseFormerRouter", "DenseFormerStream", "depth_weighted_average"]


def _wide_dtype(alpha: torch.Tensor, sources) -> tuple[torch.dtype, torch.dtype]:
    """(accumulation dtype, output dtype): fp32 at least; the output keeps the sources' promoted dtype."""
    out = sources[0].dtype
    for x in sources[1:]:
        out = torch.promote_types(out, x.dtype)
    return torch.promote_types(stat_dtype(out), alpha.dtype), out


def _dwa_forward(alpha: torch.Tensor, sources) -> torch.Tensor:
    """sum_j alpha_j X_j, accumulated in the wide dtype and rounded once to the sources' dtype."""
    wide, out = _wide_dtype(alpha, sources)
    a = alpha.to(wide)
    h = sources[0].to(wide) * a[0]
    for j in range(1, len(sources)):  # in fp32: a bf16 source times a 0-dim fp32 weight would stay bf16
        h = h.addcmul_(sources[j], a[j]) if not h.requires_grad else torch.addcmul(h, sources[j], a[j])
    return h.to(out)


class _DepthWeightedAverage(torch.autograd.Function):
    """``Y = sum_j alpha_j X_j`` as one autograd node. Recorded op by op, every source adds a multiply
    and an add node (and a full-size temporary each); here the backward is one scaling per source,
    ``dL/dX_j = alpha_j dL/dY``, and one dot product per weight, ``dL/dalpha_j = <dL/dY, X_j>`` (fp32 or
    wider). The sources are saved by reference only: the stream keeps them anyway."""

    @staticmethod
    def forward(ctx, alpha: torch.Tensor, *sources: torch.Tensor):
        ctx.save_for_backward(alpha, *sources)
        return _dwa_forward(alpha, sources)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        alpha, *sources = ctx.saved_tensors
        wide, _ = _wide_dtype(alpha, sources)
        g = grad_out.to(wide)
        grad_alpha = None
        if ctx.needs_input_grad[0]:
            flat = g.reshape(-1)
            grad_alpha = torch.stack([torch.dot(flat, x.to(wide).reshape(-1)) for x in sources]).to(alpha.dtype)
        a = alpha.to(wide)
        grad_sources = [
            (g * a[j]).to(x.dtype) if ctx.needs_input_grad[1 + j] else None for j, x in enumerate(sources)
        ]
        return (grad_alpha, *grad_sources)


def depth_weighted_average(alpha: torch.Tensor, sources) -> torch.Tensor:
    """``sum_j alpha[j] * sources[j]``: alpha [K], K sources [B, T, D] -> [B, T, D] in the sources'
    (promoted) dtype, accumulated in fp32 or wider."""
    if alpha.shape != (len(sources),):
        raise ValueError(f"{len(sources)} sources but weights of shape {tuple(alpha.shape)}")
    if compiling() or not torch.is_grad_enabled():  # Inductor derives the backward itself; sampling needs none
        return _dwa_forward(alpha, sources)
    return _DepthWeightedAverage.apply(alpha, *sources)


class DenseFormerRouter(ComparisonRouter):
    """The DWA weights of a stack of ``num_layers`` sublayers grouped into ``num_layers / block_size``
    blocks (module docstring). Attributes besides the protocol's:

    * ``num_blocks`` N; ``averaged_blocks``: the blocks i (1-based) followed by a DWA (``period | i``);
    * ``block_sources[m]``: the indices j of the X_j the m-th DWA averages (``S_i``, increasing);
    * ``alphas[m]``: its weights, [|S_i|].
    """

    def __init__(self, dim: int, num_layers: int, config: RoutingConfig):
        super().__init__(dim, num_layers, config)
        self.block_size = config.block_size
        self.num_blocks = N = num_layers // config.block_size
        k, p = config.dilation, config.period
        if p > N:
            raise ValueError(f"routing.period={p} is larger than the {N} blocks: no block would be averaged; "
                             f"use 1..{N}")
        if k > N:
            raise ValueError(f"routing.dilation={k} is larger than the {N} blocks: every average would hold its "
                             f"newest block output only; use 1..{N}")
        self.averaged_blocks = [i for i in range(1, N + 1) if i % p == 0]
        self.block_sources = [list(range(i % k, i + 1, k)) for i in self.averaged_blocks]
        # the DWA (position in averaged_blocks) after each block, and the last block whose DWA reads X_j
        self.dwa_index = {i: m for m, i in enumerate(self.averaged_blocks)}
        self.last_reader: dict[int, int] = {}
        for i, sources in zip(self.averaged_blocks, self.block_sources):
            for j in sources:
                self.last_reader[j] = i
        self.alphas = nn.ParameterList(nn.Parameter(torch.zeros(len(s))) for s in self.block_sources)
        self.reset_parameters()

    def reset_parameters(self):
        """The paper's identity: alpha_{i,i} = 1 on the newest block output, 0 on the earlier ones."""
        with torch.no_grad():
            for alpha in self.alphas:
                alpha.zero_()
                alpha[-1] = 1.0

    def alpha_matrix(self) -> torch.Tensor:
        """The paper's weight matrix, detached fp32 [N, N + 1]: row i-1 is Y_i over X_0..X_N (the
        identity row where block i has no DWA, zeros outside S_i)."""
        device = self.alphas[0].device
        table = torch.zeros(self.num_blocks, self.num_blocks + 1, device=device)
        table[torch.arange(self.num_blocks), torch.arange(1, self.num_blocks + 1)] = 1.0
        for i, sources, alpha in zip(self.averaged_blocks, self.block_sources, self.alphas):
            table[i - 1] = 0.0
            table[i - 1, sources] = alpha.detach().float()
        return table

    def begin(self, v0: torch.Tensor, t_emb: torch.Tensor | None = None, record_weights: bool = False):
        """Start one forward pass from the embedding ``v0`` [B, T, D] (``t_emb`` is not used)."""
        return DenseFormerStream(self, v0, record_weights)


class DenseFormerStream:
    """One forward pass: the residual stream inside a block, a DWA at every averaged block boundary.
    Keeps only the block outputs X_j that a later DWA still reads."""

    def __init__(self, router: DenseFormerRouter, v0: torch.Tensor, record_weights: bool):
        self.router = router
        self.h = v0
        self.layer = 1
        self.outputs: dict[int, torch.Tensor] = {}  # j -> X_j
        self._remember(0, v0)
        # alpha_i per DWA in forward order, [|S_i|] fp32 (router.block_sources gives the j of each entry)
        self.weights: list[torch.Tensor] | None = [] if record_weights else None

    def _remember(self, j: int, x: torch.Tensor) -> None:
        if j in self.router.last_reader:
            self.outputs[j] = x

    def next_input(self) -> torch.Tensor:
        return self.h

    def push(self, v: torch.Tensor) -> None:
        router = self.router
        if self.layer > router.num_layers:
            raise RuntimeError(f"push() after all {router.num_layers} sublayers")
        self.h = self.h + v
        self.layer += 1
        done = self.layer - 1
        if done % router.block_size:
            return
        i = done // router.block_size  # block i has finished: h = X_i
        self._remember(i, self.h)
        m = router.dwa_index.get(i)
        if m is not None:
            alpha = router.alphas[m]
            sources = router.block_sources[m]
            self.h = depth_weighted_average(alpha, [self.outputs[j] for j in sources])
            if self.weights is not None:
                self.weights.append(alpha.detach().float().clone())
            for j in sources:  # X_j read for the last time
                if router.last_reader[j] == i:
                    del self.outputs[j]

    def final_input(self) -> torch.Tensor:
        L = self.router.num_layers
        if self.layer != L + 1:
            raise RuntimeError(f"final_input() after {self.layer - 1} of {L} sublayers")
        return self.h
