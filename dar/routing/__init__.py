"""Diffusion-Adaptive Routing: the method in one room (docs/METHOD.md).

* :mod:`dar.routing.config`: :class:`RoutingConfig` and the chunked source sets ``S_l``;
* :mod:`dar.routing.reference`: the aggregation written exactly as the equation;
* :mod:`dar.routing.router`: :class:`DepthRouter` (one aggregator per sublayer plus the final one) and
  the stream protocol ``begin`` / ``next_input`` / ``push`` / ``final_input`` a transformer drives;
* :func:`build_router`: the router of a config's mode: DAR's (and the residual stream), or one of the
  comparison routers of :mod:`dar.routing.comparison`;
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
    "build_router",
    "inverse_rms",
    "reader_ranges",
    "reference_aggregate",
    "source_indices",
    "upgrade_legacy_keys",
]


def build_router(dim: int, num_layers: int, config: RoutingConfig):
    """The router of ``config.mode`` for ``num_layers`` sublayers of width ``dim``."""
    if config.mode in ("residual", "dar"):
        return DepthRouter(dim, num_layers, config)
    config.check_depth(num_layers)
    if config.mode == "denseformer":
        from dar.routing.comparison.denseformer import DenseFormerRouter as router
    elif config.mode == "hyper":
        from dar.routing.comparison.hyper_connections import HyperConnectionsRouter as router
    elif config.mode == "mhc":
        from dar.routing.comparison.mhc import ManifoldConstrainedHCRouter as router
    else:
        from dar.routing.comparison.attnres import BlockAttnResRouter as router
    return router(dim, num_layers, config)
