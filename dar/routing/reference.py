"""DAR's aggregation written exactly as the equation (docs/METHOD.md §2), for reading and for tests.

    alpha_{i->l} = softmax_i( q_l . RMSNorm_l(v_i) / sqrt(d) ),      h_l = sum_i alpha_{i->l} v_i

Keys are materialised, the sources stacked: clear, and slow. The model runs the same function through
:mod:`dar.routing.backends`, which never builds a key or a ``[K, B, T, D]`` stack.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from dar.routing.ops import RMS_EPS


def rms_norm(x: torch.Tensor, gain: torch.Tensor, eps: float = RMS_EPS) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * gain`` over the last dimension."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain


def reference_aggregate(
    sources: Sequence[torch.Tensor], query: torch.Tensor, key_gain: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """sources: K tensors [B, T, D]; query: the raw q_l, [D], [B, D] or [B, T, D]; key_gain: [D].
    Returns (h [B, T, D], alpha [B, T, K])."""
    V = torch.stack(list(sources))  # [K, B, T, D]
    keys = rms_norm(V, key_gain)  # [K, B, T, D]
    q = query[:, None, :] if query.dim() == 2 else query  # broadcast over K (and T)
    logits = (keys * q).sum(-1) / math.sqrt(V.shape[-1])  # [K, B, T]
    alpha = torch.softmax(logits, dim=0)  # over the sources
    h = (alpha[..., None] * V).sum(0)  # [B, T, D]
    return h, alpha.permute(1, 2, 0)
