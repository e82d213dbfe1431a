"""Diffusion-Adaptive Routing (DAR): softmax aggregation over the depth history of sublayer outputs.

A plain residual stream computes the input of sublayer ``l`` as a running sum, ``h_l = v_0 + ... +
v_{l-1}``. DAR (arXiv 2605.20708) keeps the sources ``v_i`` themselves and lets every sublayer pick
its own per-token convex combination of them:

    h_l = sum_{i in S_l} alpha_{i->l} v_i,      alpha_{i->l} = softmax_i( q_l . RMSNorm_l(v_i) / sqrt(d) )

``v_0`` is the patch + position embedding; ``v_l`` is the gated output of sublayer ``l`` (attention and
MLP each count as one layer). ``S_l`` is the source set of :func:`source_indices` (chunked history).
The query ``q_l`` is ``static`` (a learned vector ``w_l``), ``static_t`` (``w_l + e(t)``) or
``dynamic`` (``W_q^l v_{l-1}``); all start at zero so routing starts as a uniform average.

Everything a transformer needs is here: :class:`RoutingConfig`, :class:`DepthRouter` (one aggregator
per sublayer plus the final one) and the :class:`RoutingStream` it hands out for one forward pass:

    stream = router.begin(v0, t_emb)        # or RoutingConfig(mode="residual") for h <- h + v
    for sublayer in sublayers:
        v = sublayer(stream.next_input())
        stream.push(v)
    h_final = stream.final_input()

Implementation note (why the keys are never materialised): ``q . RMSNorm(v) = (v . (q * g)) / rms(v)``,
so a source contributes one dot product and a per-token ``1/rms(v)`` that is computed once when the
source enters the history and shared by every aggregator that reads it. Only per-token logits are
stacked; the weighted sum accumulates source by source, so no ``[N, B, T, D]`` tensor ever exists and
autograd keeps nothing per aggregator beyond per-token weights (the sources themselves are shared).
Static and static_t queries are known before any source exists, so (PyTorch backend) a source is
dotted with the queries of every aggregator that will read it in one matmul when it enters the
history, instead of once per reader. The fast autograd operations this uses (the per-token RMS, a
source's logits, an aggregator's softmax mix) live in :mod:`dar.routing.ops`; the equation itself,
written plainly, in :mod:`dar.routing.reference`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from dar.routing import backends
from dar.routing.config import RoutingConfig, reader_ranges, source_indices
from dar.routing.ops import compiling, inverse_rms, mix, source_logits, stat_dtype

BACKENDS = ("auto", *backends.BACKENDS)

# Checkpoint keys renamed since the format was first written: old suffix -> new suffix.
LEGACY_KEY_SUFFIXES = {".key_norm.weight": ".key_gain"}


def upgrade_legacy_keys(state_dict: dict) -> dict:
    """A state dict with the current key names. Aggregators once held their key gain inside an RMSNorm
    module (``key_norm.weight``) whose forward never ran; it is now the plain parameter ``key_gain``."""
    upgraded = {}
    for key, value in state_dict.items():
        for old, new in LEGACY_KEY_SUFFIXES.items():
            if key.endswith(old):
                key = key[: -len(old)] + new
        upgraded[key] = value
    return upgraded



class DepthAggregator(nn.Module):
    """One aggregator: its own query parameters and the gain g_l of its key RMSNorm (docs/METHOD.md §2-3).
    The keys RMSNorm(v_i) = g_l * v_i / rms(v_i) are never built: g_l is folded into the query."""

    def __init__(self, dim: int, query: str, per_layer_time_query: bool):
        super().__init__()
        self.dim = dim
        self.query_kind = query
        # Registration order keeps the parameter order of checkpoints written when the gain lived in a
        # submodule (optimizer states are stored by position): query, key_gain, then submodules.
        if query == "dynamic":
            self.query_proj = nn.Linear(dim, dim, bias=False)  # q_l = W_q v_{l-1}
        else:
            self.query = nn.Parameter(torch.zeros(dim))  # w_l
        self.key_gain = nn.Parameter(torch.ones(dim))  # g_l
        if query == "static_t" and per_layer_time_query:
            self.time_query = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim))  # e_l(t)

    def forward_query(self, latest: torch.Tensor, time_query: torch.Tensor | None) -> torch.Tensor:
        """q_l times the key gain and 1/sqrt(d): [D], [B, D] or [B, T, D]."""
        if self.query_kind == "dynamic":
            q = self.query_proj(latest)  # [B, T, D]
        else:
            q = self.query
            if self.query_kind == "static_t":
                e_t = self.time_query(time_query) if hasattr(self, "time_query") else time_query
                q = q + e_t  # [B, D]
        return q * (self.key_gain / math.sqrt(self.dim)).to(q.dtype)


class DepthRouter(nn.Module):
    """The aggregators of a stack of ``num_layers`` sublayers plus the final one (``num_layers + 1``
    aggregators for ``final="dedicated"``); empty in residual mode."""

    def __init__(self, dim: int, num_layers: int, config: RoutingConfig):
        super().__init__()
        self.dim = dim
        self.num_layers = num_layers
        self.config = config
        config.check_depth(num_layers)
        self.backend = "auto"  # how aggregate() runs; not part of the model (see set_backend)
        # eager torch backend, static/static_t: dot each source with all its readers' queries at once
        # (False: once per reader, as compiled graphs do; benchmarks/bench_routing_paths.py compares)
        self.precompute_logits = True
        if config.mode == "residual":
            return
        num_aggregators = num_layers + (1 if config.final == "dedicated" else 0)
        per_layer = config.time_query == "per_layer"
        self.aggregators = nn.ModuleList(
            DepthAggregator(dim, config.query, per_layer) for _ in range(num_aggregators)
        )
        if config.query == "static_t" and not per_layer:
            self.time_query = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim))  # shared e(t)
        self.source_sets = [source_indices(l, num_layers, config.chunk_size) for l in range(1, num_layers + 2)]
        self.readers = reader_ranges(self.source_sets)
        self.reset_parameters()

    def reset_parameters(self):
        """Zero queries, zero e(t), unit gains: every aggregator starts as a uniform average."""
        for module in self.modules():
            if isinstance(module, DepthAggregator):
                nn.init.ones_(module.key_gain)
                if module.query_kind == "dynamic":
                    nn.init.zeros_(module.query_proj.weight)
                else:
                    nn.init.zeros_(module.query)
            if isinstance(module, nn.Sequential):  # a time query head: zero so static_t starts as static
                nn.init.zeros_(module[1].weight)
                nn.init.zeros_(module[1].bias)

    def set_backend(self, backend: str) -> None:
        """``auto`` (see :meth:`resolve_backend`), ``torch`` (:func:`dar.routing.backends.torch_aggregate`),
        ``recompute`` (saves per-token statistics only and recomputes the weights in backward) or
        ``triton``. All compute the same function."""
        if backend not in BACKENDS:
            raise ValueError(f"routing backend {backend!r} is not one of {', '.join(BACKENDS)}")
        self.backend = backend

    def resolve_backend(self, device: torch.device) -> str:
        """The backend ``auto`` stands for here: inside a compiled graph always ``torch`` (Inductor
        fuses its ops; the kernel's table of source pointers would break the graph at every
        aggregator), otherwise the Triton kernel on CUDA."""
        if self.backend != "auto":
            return self.backend
        if compiling():
            return "torch"
        if device.type == "cuda" and backends.triton_available(device):
            return "triton"
        return "torch"

    def aggregator(self, layer: int) -> DepthAggregator:
        """The aggregator that forms the input of ``layer`` (1-based; ``num_layers + 1`` = final)."""
        return self.aggregators[min(layer, len(self.aggregators)) - 1]

    def query_table(self, time_query: torch.Tensor | None) -> torch.Tensor:
        """The scaled query of every layer's aggregator, row l-1 for layer l (static and static_t only):
        [L+1, D] or, with a time query, [B, L+1, D]."""
        layers = range(1, self.num_layers + 2)
        return torch.stack([self.aggregator(l).forward_query(None, time_query) for l in layers], dim=-2)

    def begin(self, v0: torch.Tensor, t_emb: torch.Tensor | None = None, record_weights: bool = False):
        """Start one forward pass from the embedding ``v0`` [B, T, D]."""
        if self.config.mode == "residual":
            return ResidualStream(v0, self.num_layers)
        time_query = None
        if self.config.query == "static_t":
            if t_emb is None:
                raise ValueError("routing query 'static_t' needs the timestep embedding t_emb")
            time_query = self.time_query(t_emb) if hasattr(self, "time_query") else t_emb
        return RoutingStream(self, v0, time_query, record_weights)


class ResidualStream:
    """``h <- h + v``: the plain residual stream, with the same interface as :class:`RoutingStream`."""

    def __init__(self, v0: torch.Tensor, num_layers: int):
        self.h = v0
        self.num_layers = num_layers
        self.layer = 1
        self.weights = None

    def next_input(self) -> torch.Tensor:
        return self.h

    def push(self, v: torch.Tensor) -> None:
        self.h = self.h + v
        self.layer += 1

    def final_input(self) -> torch.Tensor:
        if self.layer != self.num_layers + 1:
            raise RuntimeError(f"final_input() after {self.layer - 1} of {self.num_layers} sublayers")
        return self.h


class RoutingStream:
    """The history of one forward pass. Keeps only sources that a later aggregator still reads
    (v_0, chunk summaries, the current chunk), each with its cached per-token 1/rms."""

    def __init__(self, router: DepthRouter, v0: torch.Tensor, time_query, record_weights: bool):
        self.router = router
        self.backend = router.resolve_backend(v0.device)
        self.time_query = time_query
        # Eager PyTorch: dot every source once with all its readers' queries ([L+1, D] or [B, L+1, D]
        # table). Compiled graphs keep the per-aggregator form, which Inductor fuses per aggregator
        # (docs/PERFORMANCE.md has the measurements and their noise).
        self.query_table = None
        static_queries = router.config.query != "dynamic"
        if self.backend == "torch" and static_queries and router.precompute_logits and not compiling():
            self.query_table = router.query_table(time_query)
        # One dtype for the whole history, so that every backend can read it as one array of sources.
        # Under autocast that is the autocast dtype: sublayer outputs come out in it, while v_0
        # (embedding + fp32 position table) would otherwise stay fp32.
        device_type = v0.device.type
        autocast = torch.is_autocast_enabled(device_type)
        self.dtype = torch.get_autocast_dtype(device_type) if autocast else v0.dtype
        self.history: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}  # i -> (v_i, 1/rms(v_i) or None)
        self.logits: dict[int, tuple[torch.Tensor, ...]] = {}  # i -> n_i logits [B, T] of v_i, one per reader
        self._remember(0, v0)
        self.latest = v0
        self.layer = 1
        # alpha per aggregator, [B, T, |S_l|] fp32, only when asked for (no cost otherwise)
        self.weights: list[torch.Tensor] | None = [] if record_weights else None

    def _remember(self, i: int, v: torch.Tensor) -> None:
        # Token-major, once: a mix keeps its first source's layout, so a transposed v_0 (a patch
        # embedding's view) would make every later weighted sum and LayerNorm stride across memory.
        v = v.to(self.dtype).contiguous()
        if self.query_table is None:
            self.history[i] = (v, inverse_rms(v))
        else:  # its logits for every reader now (every source has readers: reader_ranges)
            first, last = self.router.readers[i]
            self.history[i] = (v, None)
            self.logits[i] = source_logits(v, self.query_table[..., first - 1 : last, :]).unbind(-1)  # n_i x [B, T]

    def _aggregate(self, layer: int) -> torch.Tensor:
        indices = self.router.source_sets[layer - 1]
        sources, inv_rms = zip(*(self.history[i] for i in indices))
        if self.query_table is not None:
            readers = self.router.readers
            h, alpha = mix(sources, [self.logits[i][layer - readers[i][0]] for i in indices])
        else:
            query = self.router.aggregator(layer).forward_query(self.latest, self.time_query)
            h, alpha = backends.aggregate(sources, inv_rms, query, self.backend)
        if self.weights is not None:
            self.weights.append(alpha.detach())
        return h

    def next_input(self) -> torch.Tensor:
        return self._aggregate(self.layer)

    def push(self, v: torch.Tensor) -> None:
        S = self.router.config.chunk_size
        finishes_chunk = self.layer % S == 0 and self.layer < self.router.num_layers  # and a later one reads it
        if finishes_chunk and self.router.config.summary == "sum":
            # the chunk's summary is the sum of its outputs (v_{nS} is read only as the summary)
            members = [self.history[i][0] for i in range(self.layer - S + 1, self.layer)]
            self._remember(self.layer, sum(members, v.to(stat_dtype(v.dtype))))  # accumulated in fp32 at least
        else:
            self._remember(self.layer, v)
        self.latest = v
        self.layer += 1
        if finishes_chunk:  # its non-summary members are never read again
            for i in range(self.layer - S, self.layer - 1):
                self.history.pop(i, None)
                self.logits.pop(i, None)

    def final_input(self) -> torch.Tensor:
        L = self.router.num_layers
        if self.layer != L + 1:
            raise RuntimeError(f"final_input() after {self.layer - 1} of {L} sublayers")
        return self._aggregate(L + 1)
