"""One registry of interchangeable implementations of DAR aggregation. Each takes
``(sources, source_inv_rms, query)`` and returns ``(h, alpha)``, the function of
:func:`dar.routing.reference.reference_aggregate` with the keys folded into the query:

* ``torch``: the autograd nodes of :mod:`dar.routing.ops` (a logits node and a mix node);
* ``recompute``: one pure-PyTorch autograd Function that saves a per-token log-sum-exp instead of the
  routing weights and recomputes them in backward (:mod:`dar.routing.kernels.recompute`); any device;
* ``triton``: fused forward and backward kernels (:mod:`dar.routing.kernels.triton_aggregate`); CUDA, or
  CPU tensors when Triton runs as its interpreter (``TRITON_INTERPRET=1`` before the module is imported).

Triton is optional: it is imported only when the ``triton`` backend is asked for or probed.
"""

from __future__ import annotations

from typing import Sequence

import torch

from dar.routing.kernels.recompute import recompute_aggregate
from dar.routing.ops import mix, query_logits

BACKENDS = ("torch", "recompute", "triton")


def torch_aggregate(
    sources: Sequence[torch.Tensor], source_inv_rms: Sequence[torch.Tensor], query: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over sources of ``query . (v_i / rms(v_i))``, then the alpha-weighted sum of raw ``v_i``.

    sources: K tensors [B, T, D]; source_inv_rms: K tensors [B, T] (fp32).
    query: already multiplied by the key gain and 1/sqrt(D); [D], [B, D] or [B, T, D].
    Returns (h [B, T, D] in the sources' dtype, alpha [B, T, K] fp32).
    """
    return mix(sources, query_logits(sources, source_inv_rms, query))  # logits: K x [B, T] fp32


def triton_available(device: torch.device | str) -> bool:
    """Whether ``backend="triton"`` can run on tensors on ``device`` (Triton installed and, compiled,
    a CUDA device, or, interpreted, the CPU)."""
    try:
        from dar.routing.kernels import triton_aggregate
    except ImportError:
        return False
    return triton_aggregate.runs_on(torch.device(device))


def aggregate(
    sources: Sequence[torch.Tensor],
    source_inv_rms: Sequence[torch.Tensor],
    query: torch.Tensor,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """DAR aggregation with the chosen backend (one of :data:`BACKENDS`); same arguments and results as
    :func:`torch_aggregate`. Gradients flow to every source, every inv_rms and the query."""
    if backend == "torch":
        return torch_aggregate(sources, source_inv_rms, query)
    if backend == "recompute":
        return recompute_aggregate(sources, source_inv_rms, query)
    if backend == "triton":
        if not triton_available(sources[0].device):
            raise RuntimeError(
                f"backend='triton' cannot run on {sources[0].device}: it needs Triton and a CUDA device (or CPU "
                "tensors with TRITON_INTERPRET=1 set before dar.routing.kernels.triton_aggregate is imported)"
            )
        from dar.routing.kernels.triton_aggregate import triton_aggregate

        return triton_aggregate(sources, source_inv_rms, query)
    raise ValueError(f"unknown aggregation backend {backend!r}; expected one of {', '.join(BACKENDS)}")
