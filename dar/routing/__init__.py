"""Diffusion-Adaptive Routing: the method in one room (docs/METHOD.md).

* :mod:`dar.routing.config`: :class:`RoutingConfig` and the chunked source sets ``S_l``;
* :mod:`dar.routing.reference`: the aggregation written exactly as the equation;
* :mod:`dar.routing.router`: :class:`DepthRouter` (one aggregator per sublayer plus the final one) and
  the stream protocol ``begin`` / ``next_input`` / ``push`` / ``final_input`` a transformer drives;
* below them the fast paths: :mod:`dar.routing.ops` (autograd nodes), :mod:`dar.routing.backends`
  (the registry: torch, recompute, triton) and :mod:`dar.routing.kernels`.
"""

from dar.routing.backends import aggregate
from dar.routing.config import (
    FINAL_AGGREGATORS,
    QUERY_KINDS,
    ROUTING_MODES,
    TIME_QUERY_KINDS,
    RoutingConfig,
    reader_ranges,
    source_indices,
)
from dar.routing.ops import inverse_rms
from dar.routing.reference import reference_aggregate
from dar.routing.router import (
    BACKENDS,
    DepthAggregator,
    DepthRouter,
    ResidualStream,
    RoutingStream,
    upgrade_legacy_keys,
)

__all__ = [
    "BACKENDS",
    "FINAL_AGGREGATORS",
    "QUERY_KINDS",
    "ROUTING_MODES",
    "TIME_QUERY_KINDS",
    "DepthAggregator",
    "DepthRouter",
    "ResidualStream",
    "RoutingConfig",
    "RoutingStream",
    "aggregate",
    "inverse_rms",
    "reader_ranges",
    "reference_aggregate",
    "source_indices",
    "upgrade_legacy_keys",
]
