"""Block Attention Residuals (Kimi Team, "Attention Residuals", arXiv 2603.15031, 2026), behind DAR's
stream protocol.

The paper's "layer" is one sublayer (attention or MLP, its pseudo-code counts ``block_size`` in attention
+ MLP units), so it maps one to one onto our routed sublayers ``l = 1 .. L`` with outputs ``v_l``.
The ``L`` sublayers are cut into ``N = L / S`` blocks of ``S = config.block_size`` consecutive sublayers
(default 2 = one SiT block). A block is summarised by the plain sum of its outputs, and ``b_0`` is the
embedding:

    b_0 = v_0,    b_n = sum_{j in block n} v_j,    b_n^i = the sum of the first i outputs of block n.

Sublayer ``l``, the i-th of block n, reads the finished blocks and, past the first sublayer of its block,
the partial sum of its own block:

    V_l = [b_0, .., b_{n-1}]              (i = 1)
    V_l = [b_0, .., b_{n-1}, b_n^{i-1}]   (i >= 2)
    h_l = sum_{u in V_l} softmax_u( w_l . RMSNorm_l(u) ) u,    RMSNorm_l(u) = g_l * u / rms(u)

with a learned pseudo-query ``w_l`` (zero at initialisation: the paper requires it) and the gain ``g_l``
(one) of the aggregator's own key RMSNorm; no ``1/sqrt(d)``. The final input attends over all blocks,
``V_{L+1} = [b_0, .., b_N]``, with its own ``w`` and ``g``. A sublayer's output is added to the partial
sum; when a block is complete its sum becomes the new source ``b_n`` and the next block starts from zero.

Sublayer 1 reads ``b_0`` alone (its weight is 1 whatever ``w_1`` is), so it has no aggregator: the
router holds ``L`` aggregators (sublayers 2 .. L and the final one), ``2 D L`` parameters.

At initialisation every weight is ``1/|V_l|`` and, since the sources of ``V_l`` partition
``v_0 + .. + v_{l-1}``, ``h_l`` is exactly the residual stream divided by ``|V_l|``. SiT normalises every
sublayer input and the final input with a LayerNorm, which removes that factor up to its epsilon
(``LN(h / c)`` uses ``c^2 eps`` in place of ``eps``): the model starts as the residual SiT.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dar.routing.backends import torch_aggregate
from dar.routing.comparison import ComparisonRouter
from dar.routing.config import RoutingConfig
from dar.routing.ops import inverse_rms


class AttnResAggregator(nn.Module):
    """One aggregator: the pseudo-query ``w_l`` (the paper's bias-free ``Linear(D, 1)``, as a vector) and
    the gain ``g_l`` of its key RMSNorm. The keys are never built: ``w . (g u / rms(u)) = (w g) . u / rms(u)``."""

    def __init__(self, dim: int):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(dim))  # w_l
        self.key_gain = nn.Parameter(torch.ones(dim))  # g_l

    def folded_query(self) -> torch.Tensor:
        return self.query * self.key_gain


class BlockAttnResRouter(ComparisonRouter):
    """Block AttnRes over ``num_layers`` sublayers of width ``dim``, blocks of ``config.block_size``."""

    def __init__(self, dim: int, num_layers: int, config: RoutingConfig):
        super().__init__(dim, num_layers, config)
        self.block_size = config.block_size
        self.num_blocks = num_layers // config.block_size
        # aggregators[k] forms the input of layer k + 2 (k = num_layers - 1: the final input)
        self.aggregators = nn.ModuleList(AttnResAggregator(dim) for _ in range(num_layers))
        self.source_ranges = [self.sources_of(layer) for layer in range(1, num_layers + 2)]
        self.reset_parameters()

    def reset_parameters(self):
        """The paper's initialisation: zero pseudo-queries (uniform weights), unit RMSNorm gains."""
        for aggregator in self.aggregators:
            nn.init.zeros_(aggregator.query)
            nn.init.ones_(aggregator.key_gain)

    def sources_of(self, layer: int) -> list[tuple[int, int]]:
        """What each source of ``layer`` (1-based; ``num_layers + 1`` = final) sums, as inclusive ranges
        ``(first, last)`` of the indices i of v_i: ``(0, 0)`` is b_0, then the finished blocks, then the
        partial sum of the current block when there is one."""
        if not 1 <= layer <= self.num_layers + 1:
            raise ValueError(f"layer must be in 1..{self.num_layers + 1}, got {layer}")
        S = self.block_size
        finished = (layer - 1) // S  # blocks complete before this layer
        ranges = [(0, 0)] + [((n - 1) * S + 1, n * S) for n in range(1, finished + 1)]
        if (layer - 1) % S:
            ranges.append((finished * S + 1, layer - 1))
        return ranges

    def aggregator(self, layer: int) -> AttnResAggregator:
        """The aggregator that forms the input of ``layer`` (2 .. num_layers + 1)."""
        if not 2 <= layer <= self.num_layers + 1:
            raise ValueError(f"layer {layer} has no aggregator (1 reads b_0 alone; {self.num_layers + 1} is the final)")
        return self.aggregators[layer - 2]

    def begin(self, v0: torch.Tensor, t_emb: torch.Tensor | None = None, record_weights: bool = False):
        """Start one forward pass from the embedding ``v0`` [B, T, D] (the queries are static: ``t_emb``
        is not used)."""
        return BlockAttnResStream(self, v0, record_weights)


class BlockAttnResStream:
    """One forward pass: the finished block sums (each with its per-token ``1/rms``, computed once and
    shared by every later reader) and the partial sum of the current block."""

    def __init__(self, router: BlockAttnResRouter, v0: torch.Tensor, record_weights: bool):
        self.router = router
        # One dtype for the sources, as DAR's history: under autocast the autocast dtype (sublayer
        # outputs come out in it, v_0 would otherwise stay fp32).
        device_type = v0.device.type
        autocast = torch.is_autocast_enabled(device_type)
        self.dtype = torch.get_autocast_dtype(device_type) if autocast else v0.dtype
        b0 = v0.to(self.dtype).contiguous()  # token-major (a patch embedding's view is transposed)
        self.blocks: list[torch.Tensor] = [b0]
        self.block_inv_rms: list[torch.Tensor] = [inverse_rms(b0)]
        self.partial: torch.Tensor | None = None
        self.layer = 1
        # alpha per sublayer input and the final one, [B, T, |V_l|] fp32, only when asked for
        self.weights: list[torch.Tensor] | None = [] if record_weights else None

    def _aggregate(self, layer: int) -> torch.Tensor:
        sources, inv_rms = list(self.blocks), list(self.block_inv_rms)
        if self.partial is not None:
            sources.append(self.partial)
            inv_rms.append(inverse_rms(self.partial))
        if len(sources) == 1:  # sublayer 1: b_0 alone, weight 1
            h = sources[0]
            alpha = torch.ones(*h.shape[:-1], 1, dtype=self.block_inv_rms[0].dtype, device=h.device)
        else:
            h, alpha = torch_aggregate(sources, inv_rms, self.router.aggregator(layer).folded_query())
        if self.weights is not None:
            self.weights.append(alpha.detach())
        return h

    def next_input(self) -> torch.Tensor:
        if self.layer > self.router.num_layers:
            raise RuntimeError(f"next_input() after all {self.router.num_layers} sublayers; use final_input()")
        return self._aggregate(self.layer)

    def push(self, v: torch.Tensor) -> None:
        if self.layer > self.router.num_layers:
            raise RuntimeError(f"push() after all {self.router.num_layers} sublayers")
        v = v.to(self.dtype)
        self.partial = v if self.partial is None else self.partial + v
        if self.layer % self.router.block_size == 0:  # block complete: its sum becomes a source
            block = self.partial.contiguous()
            self.blocks.append(block)
            self.block_inv_rms.append(inverse_rms(block))
            self.partial = None
        self.layer += 1

    def final_input(self) -> torch.Tensor:
        L = self.router.num_layers
        if self.layer != L + 1:
            raise RuntimeError(f"final_input() after {self.layer - 1} of {L} sublayers")
        return self._aggregate(L + 1)
