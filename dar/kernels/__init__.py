"""Interchangeable implementations of DAR aggregation (:func:`dar.routing.aggregate`).

All take ``(sources, source_inv_rms, query)`` as the reference does and return ``(h, alpha)``:

* ``torch``: :func:`dar.routing.aggregate` itself (PyTorch ops and the autograd nodes of
  :mod:`dar.routing_ops`).
* ``recompute``: one pure-PyTorch autograd Function that saves a per-token log-sum-exp instead of the
  routing weights and recomputes them in backward (:mod:`dar.kernels.recompute`); any device, any dtype.
* ``triton``: fused forward and backward kernels (:mod:`dar.kernels.triton_aggregate`); CUDA, or CPU
  tensors when Triton runs as its interpreter (``TRITON_INTERPRET=1`` before the module is imported).

Triton is optional: it is imported only when the ``triton`` backend is asked for or probed.
"""

from __future__ import annotations

from typing import Sequence

import torch

from dar.kernels.recompute import recompute_aggregate
from dar.routing import aggregate

BACKENDS = ("torch", "recompute", "triton")


def triton_available(device: torch.device | str) -> bool:
    """Whether ``backend="triton"`` can run on tensors on ``device`` (Triton installed and, compiled,
    a CUDA device, or, interpreted, the CPU)."""
    try:
        from dar.kernels import triton_aggregate
    except ImportError:
        return False
    return triton_aggregate.runs_on(torch.device(device))


def fused_aggregate(
    sources: Sequence[torch.Tensor],
    source_inv_rms: Sequence[torch.Tensor],
    query: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DAR aggregation with the chosen backend (one of :data:`BACKENDS`).

    sources: K tensors [B, T, D]; source_inv_rms: K tensors [B, T] fp32; query: [D], [B, D] or
    [B, T, D], already scaled by the key gain and 1/sqrt(D). Returns (h [B, T, D] in the sources'
    dtype, alpha [B, T, K] fp32); gradients flow to every source, every inv_rms and the query.
    """
    if backend == "torch":
        return aggregate(sources, source_inv_rms, query)
    if backend == "recompute":
        return recompute_aggregate(sources, source_inv_rms, query)
    if backend == "triton":
        if not triton_available(sources[0].device):
            raise RuntimeError(
                f"backend='triton' cannot run on {sources[0].device}: it needs Triton and a CUDA device "
                "(or CPU tensors with TRITON_INTERPRET=1 set before dar.kernels.triton_aggregate is imported)"
            )
        from dar.kernels.triton_aggregate import triton_aggregate

        return triton_aggregate(sources, source_inv_rms, query)
    raise ValueError(f"unknown aggregation backend {backend!r}; expected one of {', '.join(BACKENDS)}")
