"""The autograd operations DAR routing is built from, written for speed (see :mod:`dar.routing.reference`
for the method itself and docs/PERFORMANCE.md for the measurements).

* :func:`inverse_rms`: per-token ``1/rms(v)`` in fp32, one norm reduction;
* :func:`token_dot`, :func:`token_dots`: per-token logits ``v . q`` in fp32, whatever v's dtype;
* :func:`source_logits`: a source's logits for all the aggregators that will read it, one autograd node;
* :func:`query_logits`: one aggregator's logits for all its sources, one autograd node;
* :func:`mix`: one aggregator's softmax over its sources and the weighted sum, one autograd node.

The nodes have hand-written backwards (each checked by an fp64 gradcheck in tests/test_routing.py):
recorded op by op they leave several full-size temporaries and autograd nodes per source. Inside a
``torch.compile`` graph, and when no gradient is needed, their plain forwards run instead.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.autograd.function import once_differentiable

RMS_EPS = 1e-6


def compiling() -> bool:
    """Whether torch.compile is tracing the caller."""
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling and is_compiling())


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax and RMS statistics run in fp32 at least (fp64 stays fp64, for gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def inverse_rms(x: torch.Tensor, eps: float = RMS_EPS) -> torch.Tensor:
    """Per-token 1 / RMS(x) in fp32 (or wider): [..., D] -> [...]. (One reduction: the norm never
    materialises x**2, which on CPU costs more than the rest of the op.)"""
    norm = torch.linalg.vector_norm(x, dim=-1, dtype=stat_dtype(x.dtype))
    return torch.rsqrt(norm.square() / x.shape[-1] + eps)


def token_dot(v: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-token dot product [B, T, D] . q -> [B, T] in fp32 (or wider), q [D], [B, D] or [B, T, D].

    A logit must not be rounded to bf16 (at |z| ~ 10 that moves a softmax weight by a few percent),
    so low-precision sources are multiplied by the fp32 query and summed in fp32 (one fused reduction
    under torch.compile); fp32 sources use a matmul where q is shared by tokens.
    """
    wide = stat_dtype(v.dtype)
    q = q.to(wide)
    if v.dtype != wide or q.dim() == 3:
        return (v * (q.unsqueeze(1) if q.dim() == 2 else q)).sum(-1)  # products promoted to fp32
    if q.dim() == 1:
        return v @ q
    return torch.bmm(v, q.unsqueeze(-1)).squeeze(-1)


def token_dots(v: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Per-token dot products with n queries: v [B, T, D], queries [n, D] or [B, n, D] -> [B, T, n],
    in fp32 (or wider): low-precision sources are upcast for the matmul, so no logit is rounded."""
    wide = stat_dtype(v.dtype)
    v, queries = v.to(wide), queries.to(wide)
    if queries.dim() == 2:
        return v @ queries.t()
    return torch.bmm(v, queries.transpose(1, 2))


def query_grad(coef: torch.Tensor, v: torch.Tensor, query_dim: int) -> torch.Tensor:
    """The transpose of :func:`token_dot`: ``sum coef[b, t] v[b, t, :]`` over the tokens (and batch)
    that share one query, so coef [B, T], v [B, T, D] (same dtype) -> the query's shape."""
    if query_dim == 1:
        return coef.reshape(-1) @ v.reshape(-1, v.shape[-1])  # [D]
    if query_dim == 2:
        return torch.bmm(coef.unsqueeze(1), v).squeeze(1)  # [B, D]
    return coef.unsqueeze(-1) * v  # [B, T, D]


def _source_logits_forward(v, queries) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits [B, T, n], 1/rms(v) [B, T], dots v . q_n [B, T, n]), all fp32 (or wider)."""
    inv_rms = inverse_rms(v)
    dots = token_dots(v, queries)
    return dots * inv_rms.unsqueeze(-1), inv_rms, dots


class _SourceLogits(torch.autograd.Function):
    """A new source's logits for all its readers at once, ``z_n = (v . q_n) / rms(v)``, as one node.

    v [B, T, D]; queries [n, D] or [B, n, D] (already scaled by the key gain and 1/sqrt(d)).
    Returns logits [B, T, n] in fp32 (or wider). Recorded op by op, the RMS alone leaves a squared copy
    of v and a backward of four full-size ops; here backward is one matmul and one multiply-add:
    ``dL/dv = (g r) Q - (r^3 / D) (sum_n g_n (v . q_n)) v`` with ``r = 1/rms(v)``.
    """

    @staticmethod
    def forward(ctx, v: torch.Tensor, queries: torch.Tensor):
        logits, inv_rms, dots = _source_logits_forward(v, queries)
        ctx.save_for_backward(v, queries, inv_rms, dots)
        return logits

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logits: torch.Tensor):
        v, queries, inv_rms, dots = ctx.saved_tensors
        grad_dots = grad_logits * inv_rms.unsqueeze(-1)  # [B, T, n]
        grad_v = grad_q = None
        if ctx.needs_input_grad[0]:
            grad_v = grad_dots.to(v.dtype) @ queries.to(v.dtype)  # [B, T, D]
            through_rms = (grad_logits * dots).sum(-1) * inv_rms.pow(3) / -v.shape[-1]  # [B, T]
            grad_v.addcmul_(v, through_rms.unsqueeze(-1).to(v.dtype))
        if ctx.needs_input_grad[1]:
            if queries.dim() == 2:
                grad_q = grad_dots.flatten(0, 1).t().to(v.dtype) @ v.flatten(0, 1)  # [n, D]
            else:
                grad_q = grad_dots.transpose(1, 2).to(v.dtype) @ v  # [B, n, D]
            grad_q = grad_q.to(queries.dtype)
        return grad_v, grad_q


def source_logits(v: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """``(v . q_n) / rms(v)`` for n queries: v [B, T, D], queries [n, D] or [B, n, D] -> [B, T, n] fp32."""
    if not torch.is_grad_enabled():  # sampling: skip the autograd node's bookkeeping
        return _source_logits_forward(v, queries)[0]
    return _SourceLogits.apply(v, queries)


class _QueryLogits(torch.autograd.Function):
    """One aggregator's logits ``z_k = (v_k . q) r_k`` for its K sources, as one node.

    Recorded op by op, each source's backward builds its own full-size ``dL/dq`` term and autograd
    adds them up; here they accumulate into one buffer (or, for a query shared by the tokens, reduce
    straight to its shape), and ``dL/dv_k = dz_k r_k q`` is the only full-size tensor per source.
    """

    @staticmethod
    def forward(ctx, query: torch.Tensor, *sources_and_inv_rms: torch.Tensor):
        num_sources = len(sources_and_inv_rms) // 2
        sources, inv_rms = sources_and_inv_rms[:num_sources], sources_and_inv_rms[num_sources:]
        dots = [token_dot(v, query) for v in sources]  # K x [B, T] fp32
        ctx.save_for_backward(query, *sources, *inv_rms, *dots)
        return tuple(d * r for d, r in zip(dots, inv_rms))

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_logits: torch.Tensor):
        query, *saved = ctx.saved_tensors
        K = len(grad_logits)
        sources, inv_rms, dots = saved[:K], saved[K : 2 * K], saved[2 * K :]
        needs_query, needs = ctx.needs_input_grad[0], ctx.needs_input_grad[1:]
        q = query.to(sources[0].dtype)
        q = q.unsqueeze(1) if q.dim() == 2 else q  # broadcastable against [B, T, D]
        grad_query, grad_sources, grad_inv_rms = None, [], []
        for k, (v, r, d, g) in enumerate(zip(sources, inv_rms, dots, grad_logits)):
            grad_dot = g * r  # [B, T]
            grad_sources.append(grad_dot.unsqueeze(-1).to(v.dtype) * q if needs[k] else None)
            grad_inv_rms.append(g * d if needs[K + k] else None)
            if needs_query and query.dim() == 3:  # per token: accumulate in place, in fp32
                term = grad_dot.unsqueeze(-1)
                grad_query = v * term if grad_query is None else grad_query.addcmul_(v, term)
            elif needs_query:  # shared by the tokens: reduced to the query's shape in a matmul
                term = query_grad(grad_dot.to(v.dtype), v, query.dim()).to(g.dtype)
                grad_query = term if grad_query is None else grad_query + term
        if grad_query is not None:
            grad_query = grad_query.to(query.dtype)
        return (grad_query, *grad_sources, *grad_inv_rms)


def query_logits(sources: Sequence[torch.Tensor], inv_rms: Sequence[torch.Tensor], query: torch.Tensor) -> list[torch.Tensor]:
    """``(v_k . q) r_k`` for K sources [B, T, D] with their ``1/rms`` [B, T] and one query [D], [B, D] or
    [B, T, D]: K logits [B, T] in fp32 (or wider)."""
    if compiling() or not torch.is_grad_enabled():
        return [token_dot(v, query) * r for v, r in zip(sources, inv_rms)]
    return list(_QueryLogits.apply(query, *sources, *inv_rms))


def _mix_forward(sources, logits) -> tuple[torch.Tensor, torch.Tensor]:
    """(h [B, T, D], alpha [B, K, T] fp32) from K sources [B, T, D] and K logits [B, T]. The sum
    accumulates in fp32 (or wider) and is rounded to the sources' dtype once, as the kernels do."""
    alpha = torch.softmax(torch.stack(logits, dim=1), dim=1)  # [B, K, T], fp32 statistics
    weights = alpha.unsqueeze(-1)  # [B, K, T, 1]
    h = sources[0] * weights[:, 0]  # promoted to fp32 for bf16/fp16 sources
    for k in range(1, len(sources)):
        h.addcmul_(sources[k], weights[:, k])
    return h.to(sources[0].dtype), alpha


class _Mix(torch.autograd.Function):
    """``h = sum_k softmax_k(z)_k v_k`` as one autograd node (see :func:`mix`).

    Recorded op by op, a K-source mix leaves about 4K autograd nodes whose backward materialises
    ``dL/dh * v_k`` before reducing it and a zero-filled copy per selected weight; here backward is
    K fused multiply-reductions for the weights, K scalings for the sources and one softmax backward.
    Logits are laid out [B, K, T]: PyTorch's CPU softmax over a short *last* dimension is about 10x
    slower than over a middle one whose inner (token) dimension is contiguous.
    """

    @staticmethod
    def forward(ctx, num_sources: int, *logits_and_sources: torch.Tensor):
        logits, sources = logits_and_sources[:num_sources], logits_and_sources[num_sources:]
        h, alpha = _mix_forward(sources, logits)
        ctx.save_for_backward(alpha, *sources)
        return h, alpha

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h: torch.Tensor, grad_alpha_out: torch.Tensor | None):
        alpha, *sources = ctx.saved_tensors
        weights = alpha.to(grad_h.dtype).unsqueeze(-1)  # [B, K, T, 1]
        num_sources = len(sources)
        # dL/dalpha_k = <dL/dh, v_k> per token, then the softmax backward over k
        grad_alpha = torch.stack([torch.sum(grad_h * v, -1, dtype=alpha.dtype) for v in sources], dim=1)  # [B, K, T]
        if grad_alpha_out is not None:  # alpha itself was used (diagnostics, tests)
            grad_alpha = grad_alpha + grad_alpha_out
        grad_logits = alpha * (grad_alpha - (alpha * grad_alpha).sum(1, keepdim=True))
        needs_logits = ctx.needs_input_grad[1 : 1 + num_sources]
        needs_sources = ctx.needs_input_grad[1 + num_sources :]
        grad_logit_list = [grad_logits[:, k] if needs_logits[k] else None for k in range(num_sources)]
        grad_sources = [grad_h * weights[:, k] if needs_sources[k] else None for k in range(num_sources)]
        return (None, *grad_logit_list, *grad_sources)


def mix(sources: Sequence[torch.Tensor], logits: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha = softmax over the K sources of their logits (fp32), h = sum_k alpha_k v_k.

    sources: K tensors [B, T, D]; logits: K tensors [B, T] fp32, one per source.
    Returns (h [B, T, D] in the sources' dtype, alpha [B, T, K] fp32, a view).
    """
    if len(logits) != len(sources):
        raise ValueError(f"{len(sources)} sources but {len(logits)} logits")
    if compiling() or not torch.is_grad_enabled():  # Inductor derives the backward itself; sampling needs none
        h, alpha = _mix_forward(sources, logits)
    else:
        h, alpha = _Mix.apply(len(sources), *logits, *sources)
    return h, alpha.transpose(1, 2)
