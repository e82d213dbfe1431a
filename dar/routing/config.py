"""What DAR routes over: the configuration and the chunked source sets (docs/METHOD.md §2-§4).

A stack of ``L`` routed sublayers has sources ``v_0`` (the embedding) and ``v_1 .. v_L`` (the gated
sublayer outputs). Sublayer ``l`` reads the source set ``S_l`` of :func:`source_indices`; the final
aggregator is layer ``L + 1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

ROUTING_MODES = ("residual", "dar", "denseformer", "hyper", "mhc", "attnres")
"""``residual`` and ``dar`` are this project's subject; the other four are the cross-layer routers DAR is
compared with (:mod:`dar.routing.comparison`): DenseFormer's depth-weighted averaging, Hyper-Connections,
Manifold-Constrained Hyper-Connections and Block Attention Residuals."""
QUERY_KINDS = ("static", "static_t", "dynamic")
TIME_QUERY_KINDS = ("shared", "per_layer")
FINAL_AGGREGATORS = ("dedicated", "reuse_last")
CHUNK_SUMMARIES = ("last", "sum")


@dataclass(frozen=True)
class RoutingConfig:
    """How sublayer inputs are formed.

    mode: ``residual`` is the plain SiT stream ``h <- h + v`` (bit for bit); ``dar`` routes; ``denseformer``,
        ``hyper``, ``mhc`` and ``attnres`` are the comparison routers (their options below apply to them
        only).
    query: ``static`` | ``static_t`` | ``dynamic`` (docs/METHOD.md §3).
    chunk_size: S of the chunked history (docs/METHOD.md §4); 1 = dense full history, 4 = the paper's
        "c4" (default). At most the number of routed sublayers.
    time_query: for ``static_t``, where ``e(t)`` comes from. ``shared`` (default, *inferred*): one
        zero-initialised ``Linear(SiLU(t_emb))`` shared by all aggregators, so the model costs one d x d
        beyond ``static``; ``per_layer``: every aggregator owns such a projection.
    final: ``dedicated`` (default) gives the final layer its own aggregator; ``reuse_last`` applies the
        last sublayer's aggregator to the final source set, as the paper does with REPA.
    summary: what stands for a finished chunk in later source sets: ``last`` (the paper's: its last output
        v_{nS}) or ``sum`` (NOT the paper's: the sum of the chunk's outputs, so that with zero queries every
        input is the residual stream over its source count, which a LayerNorm before each sublayer removes:
        a pretrained residual model converted to DAR keeps its function, docs/METHOD.md §12).
    block_size: sublayers per block of ``denseformer`` (its averaging follows every block) and ``attnres``
        (a block's partial sum becomes one source); 2 = one SiT block (attention + MLP).
    dilation, period: ``denseformer``'s sparsity: average over every ``dilation``-th earlier block output,
        after every ``period``-th block (1, 1 = dense, every block).
    expansion: ``hyper``'s and ``mhc``'s number of parallel residual streams n (4 in both papers).
    dynamic: ``hyper``'s and ``mhc``'s input-dependent connection weights on top of the static ones.
    """

    mode: str = "dar"
    query: str = "static_t"
    chunk_size: int = 4
    time_query: str = "shared"
    final: str = "dedicated"
    summary: str = "last"
    block_size: int = 2
    dilation: int = 1
    period: int = 1
    expansion: int = 4
    dynamic: bool = True

    def __post_init__(self):
        for name, value, choices in (
            ("mode", self.mode, ROUTING_MODES),
            ("query", self.query, QUERY_KINDS),
            ("time_query", self.time_query, TIME_QUERY_KINDS),
            ("final", self.final, FINAL_AGGREGATORS),
            ("summary", self.summary, CHUNK_SUMMARIES),
        ):
            if value not in choices:
                raise ValueError(f"routing.{name}={value!r} is not one of {', '.join(choices)}")
        for name in ("chunk_size", "block_size", "dilation", "period", "expansion"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"routing.{name} must be a positive integer, got {value!r}")

    def check_depth(self, num_layers: int) -> None:
        """A chunk or block longer than the stack would silently mean something else: refuse it."""
        if self.mode == "dar" and self.chunk_size > num_layers:
            raise ValueError(
                f"routing.chunk_size={self.chunk_size} is larger than the {num_layers} routed sublayers; "
                f"use 1..{num_layers} (chunk_size=1 is the dense full history)"
            )
        if self.mode in ("denseformer", "attnres") and (self.block_size > num_layers or num_layers % self.block_size):
            raise ValueError(f"routing.block_size={self.block_size} must divide the {num_layers} routed sublayers")
        blocks = num_layers // self.block_size
        if self.mode == "denseformer" and max(self.dilation, self.period) > blocks:
            raise ValueError(f"routing.dilation={self.dilation} and routing.period={self.period} must be at most the "
                             f"{blocks} blocks of {self.block_size} sublayers (larger would average nothing)")

    @property
    def describe(self) -> str:
        if self.mode == "residual":
            return "residual"
        if self.mode == "dar":
            return f"dar-{self.query}-c{self.chunk_size}" + ("-sum" if self.summary == "sum" else "")
        if self.mode == "denseformer":
            return f"denseformer-b{self.block_size}" + (f"-d{self.dilation}p{self.period}" if self.dilation * self.period > 1 else "")
        if self.mode in ("hyper", "mhc"):
            return f"{self.mode}-n{self.expansion}-{'dynamic' if self.dynamic else 'static'}"
        return f"attnres-b{self.block_size}"


def source_indices(layer: int, num_layers: int, chunk_size: int) -> list[int]:
    """Indices i of the sources v_i that sublayer ``layer`` (1-based) aggregates; ``num_layers + 1`` is
    the final aggregator.

    Chunk n holds sublayers (n-1)S+1 .. nS and is summarised by its last output v_{nS}. A sublayer in
    chunk n sees v_0, the summaries of finished chunks and the raw outputs before it in its own chunk.
    The final aggregator counts as a member of the last chunk, so it sees every raw output of that
    chunk (L=24, S=4 -> {v0, v4, ..., v20} U {v21, ..., v24}).
    """
    if not 1 <= layer <= num_layers + 1:
        raise ValueError(f"layer must be in 1..{num_layers + 1}, got {layer}")
    own_chunk = (min(layer, num_layers) - 1) // chunk_size
    chunk_start = own_chunk * chunk_size + 1
    summaries = [n * chunk_size for n in range(1, own_chunk + 1)]
    return [0] + summaries + list(range(chunk_start, layer))


def reader_ranges(source_sets: Sequence[Sequence[int]]) -> dict[int, tuple[int, int]]:
    """For every source i, the first and last layer (1-based) whose source set holds it. Chunked
    histories make these contiguous: a summary is read by every later layer, a raw output by the
    rest of its chunk (and the final aggregator when that chunk is the last)."""
    layers: dict[int, list[int]] = {}
    for layer, indices in enumerate(source_sets, start=1):
        for i in indices:
            layers.setdefault(i, []).append(layer)
    ranges = {}
    for i, read_by in layers.items():
        if read_by != list(range(read_by[0], read_by[-1] + 1)):
            raise ValueError(f"source {i} is read by non-contiguous layers {read_by}")
        ranges[i] = (read_by[0], read_by[-1])
    return ranges
