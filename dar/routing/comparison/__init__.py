"""The cross-layer routers DAR is compared with, behind DAR's stream protocol, so that SiT (or any
transformer written against ``begin`` / ``next_input`` / ``push`` / ``final_input``) runs each unchanged:

* :mod:`~dar.routing.comparison.denseformer`: DenseFormer's depth-weighted averaging (Pagliardini et al.
  2024);
* :mod:`~dar.routing.comparison.hyper_connections`: Hyper-Connections (Zhu et al. 2025);
* :mod:`~dar.routing.comparison.mhc`: Manifold-Constrained Hyper-Connections (Xie et al. 2025), on
  Hyper-Connections' streams;
* :mod:`~dar.routing.comparison.attnres`: Block Attention Residuals (Kimi team 2025).

Every router is an ``nn.Module`` with ``config``, ``num_layers``, ``reset_parameters()`` (its paper's
initialisation, starting as the plain residual where the method does), ``set_backend(backend)`` (only
``auto`` / ``torch``: the fused backends are DAR's) and ``begin(v0, t_emb=None, record_weights=False)``,
which returns a stream with ``next_input()``, ``push(v)``, ``final_input()`` and ``weights`` (None, or
per-layer mixing weights when recorded). A sublayer is one routed layer, as in DAR: L = 2 x depth.
"""

from __future__ import annotations

import torch.nn as nn

from dar.routing.config import RoutingConfig

BACKENDS = ("auto", "torch")


class ComparisonRouter(nn.Module):
    """What the comparison routers share: the depth check, their sizes and the backend refusal."""

    def __init__(self, dim: int, num_layers: int, config: RoutingConfig):
        super().__init__()
        config.check_depth(num_layers)
        self.dim = dim
        self.num_layers = num_layers
        self.config = config

    def set_backend(self, backend: str) -> None:
        """Only ``auto`` / ``torch``: the fused backends (recompute, triton) are DAR's."""
        if backend not in BACKENDS:
            raise ValueError(f"routing backend {backend!r}: routing.mode={self.config.mode} runs on "
                             f"{' / '.join(BACKENDS)} only (the fused backends recompute and triton are DAR's)")
