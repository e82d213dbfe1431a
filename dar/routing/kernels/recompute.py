"""DAR aggregation as one ``torch.autograd.Function`` that recomputes the routing weights in backward.

Same semantics as :func:`dar.routing.backends.torch_aggregate`: logits ``z_k = (v_k . q) r_k``, ``alpha = softmax_k(z)``
and ``h = sum_k alpha_k v_k``. Letting autograd record that graph keeps, per aggregator, alpha in fp32
and again in the sources' dtype (``[B, T, K]`` each), every source's ``[B, T]`` dot product and one
cast copy of the query per source. This Function keeps only what it was given (the sources, their
``1/rms`` and the query, alive anyway because other aggregators and the sublayers share them) and one
``[B, T]`` log-sum-exp per token; backward recomputes ``alpha_k = exp(z_k - lse)`` from it.

Nothing ``[K, B, T, D]`` is ever built: both directions stream over the sources one at a time, so the
full-size temporaries are a few fp32 ``[B, T, D]`` buffers (the accumulator or ``dL/dh``, and the one
source being processed, upcast).

Numerics are those of the ``torch`` backend (:func:`dar.routing.ops.mix`): logits, weights and the sum
are all fp32 (fp64 for fp64 inputs, which gradcheck uses) and ``h`` is rounded to the sources' dtype
once at the end.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.autograd.function import once_differentiable

from dar.routing.ops import query_grad, stat_dtype, token_dot


def validate_inputs(
    sources: Sequence[torch.Tensor], source_inv_rms: Sequence[torch.Tensor], query: torch.Tensor
) -> None:
    """Raise ValueError unless the arguments have the shapes :func:`dar.routing.backends.torch_aggregate` expects."""
    if len(sources) == 0:
        raise ValueError("aggregate needs at least one source")
    if len(source_inv_rms) != len(sources):
        raise ValueError(f"{len(sources)} sources but {len(source_inv_rms)} inv_rms tensors")
    first = sources[0]
    if first.dim() != 3:
        raise ValueError(f"sources must be [B, T, D], got shape {tuple(first.shape)}")
    B, T, D = first.shape
    for k, (v, r) in enumerate(zip(sources, source_inv_rms)):
        if v.shape != first.shape or v.dtype != first.dtype or v.device != first.device:
            raise ValueError(
                f"source {k} is {tuple(v.shape)} {v.dtype} on {v.device}; "
                f"source 0 is {tuple(first.shape)} {first.dtype} on {first.device}"
            )
        if r.shape != (B, T) or r.device != first.device:
            raise ValueError(f"inv_rms {k} must be [B, T] = {[B, T]} on {first.device}, got {tuple(r.shape)} on {r.device}")
    if query.shape not in ((D,), (B, D), (B, T, D)) or query.device != first.device:
        raise ValueError(f"query must be [D], [B, D] or [B, T, D] with B, T, D = {B, T, D}, got {tuple(query.shape)}")


class RecomputeAggregate(torch.autograd.Function):
    """``apply(query, *sources, *source_inv_rms) -> (h, alpha)``; see the module docstring."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, *sources_and_inv_rms: torch.Tensor):
        num_sources = len(sources_and_inv_rms) // 2
        sources, inv_rms = sources_and_inv_rms[:num_sources], sources_and_inv_rms[num_sources:]
        acc_dtype = stat_dtype(sources[0].dtype)
        q = query.to(acc_dtype)
        logits = torch.stack(
            [token_dot(v.to(acc_dtype), q) * r for v, r in zip(sources, inv_rms)], dim=-1
        )  # [B, T, K]; the upcast v exists for one source at a time
        lse = torch.logsumexp(logits, dim=-1)  # [B, T]: all backward needs to rebuild alpha
        alpha = torch.exp(logits - lse.unsqueeze(-1))  # [B, T, K]
        h = torch.zeros(sources[0].shape, dtype=acc_dtype, device=sources[0].device)  # [B, T, D]
        for k, v in enumerate(sources):
            h.addcmul_(v, alpha[..., k, None])  # mixed-dtype addcmul upcasts v on the fly
        ctx.num_sources = num_sources
        ctx.save_for_backward(query, lse, *sources, *inv_rms)
        return h.to(sources[0].dtype), alpha

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h: torch.Tensor, grad_alpha: torch.Tensor):
        query, lse, *saved = ctx.saved_tensors
        num_sources = ctx.num_sources
        sources, inv_rms = saved[:num_sources], saved[num_sources:]
        needs_query_grad = ctx.needs_input_grad[0]
        needs_source_grad = ctx.needs_input_grad[1 : 1 + num_sources]
        needs_inv_rms_grad = ctx.needs_input_grad[1 + num_sources :]
        acc_dtype = stat_dtype(sources[0].dtype)
        q = query.to(acc_dtype)
        q_tokens = q.view(1, 1, -1) if q.dim() == 1 else q.unsqueeze(1) if q.dim() == 2 else q  # vs [B, T, D]
        dh = grad_h.to(acc_dtype)  # [B, T, D]

        # Pass 1: rebuild alpha_k from the saved log-sum-exp and get dL/dalpha_k = <dh, v_k> + grad_alpha_k.
        dots, alphas, grad_weights = [], [], []
        for v, r in zip(sources, inv_rms):
            v = v.to(acc_dtype)
            dot = token_dot(v, q)  # [B, T], v_k . q
            dots.append(dot)
            alphas.append(torch.exp(dot * r - lse))
            grad_weights.append((dh * v).sum(-1))
        alpha = torch.stack(alphas, dim=-1)  # [B, T, K]
        grad_weight = torch.stack(grad_weights, dim=-1) + grad_alpha  # [B, T, K]
        # softmax backward: dL/dz_k = alpha_k (dL/dalpha_k - sum_j alpha_j dL/dalpha_j)
        grad_logits = alpha * (grad_weight - (alpha * grad_weight).sum(-1, keepdim=True))  # [B, T, K]

        # Pass 2: per-source gradients; z_k = (v_k . q) r_k, so dL/d(v_k . q) = dL/dz_k r_k.
        grad_query = torch.zeros_like(q) if needs_query_grad else None
        grad_sources, grad_inv_rms = [], []
        for k, (v, r) in enumerate(zip(sources, inv_rms)):
            grad_dot = grad_logits[..., k] * r  # [B, T]
            if needs_source_grad[k]:
                grad_v = torch.addcmul(grad_dot.unsqueeze(-1) * q_tokens, dh, alpha[..., k, None])
                grad_sources.append(grad_v.to(v.dtype))  # [B, T, D]: alpha_k dh + dL/dz_k r_k q
            else:
                grad_sources.append(None)
            grad_inv_rms.append((grad_logits[..., k] * dots[k]).to(r.dtype) if needs_inv_rms_grad[k] else None)
            if needs_query_grad:
                grad_query += query_grad(grad_dot, v.to(acc_dtype), q.dim())
        if needs_query_grad:
            grad_query = grad_query.to(query.dtype)
        return (grad_query, *grad_sources, *grad_inv_rms)


def recompute_aggregate(
    sources: Sequence[torch.Tensor], source_inv_rms: Sequence[torch.Tensor], query: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`dar.routing.backends.torch_aggregate` through :class:`RecomputeAggregate`: (h [B, T, D], alpha [B, T, K])."""
    validate_inputs(sources, source_inv_rms, query)
    return RecomputeAggregate.apply(query, *sources, *source_inv_rms)
