"""Fused Triton forward and backward of DAR aggregation (CUDA; CPU tensors under ``TRITON_INTERPRET=1``).

Semantics are those of :func:`dar.routing.backends.torch_aggregate`: ``z_k = (v_k . q) r_k``, ``alpha = softmax_k(z)``,
``h = sum_k alpha_k v_k``, with fp32 arithmetic whatever the sources' dtype (fp32, bf16, fp16).

Design
------
*Grid.* One program owns ``BLOCK_T`` tokens of one batch row and the whole feature dimension D
(``BLOCK_D = next_pow2(D)`` lanes, the tail masked); the grid is ``(cdiv(T, BLOCK_T), B)``. A softmax
weight needs the full-D dot product before it can scale anything, so a grid that also split D would
have to finish every logit first and read every source a second time for the weighted sum; holding
whole rows lets the forward read each source exactly once with an online softmax (running max ``m``,
running sum ``l``, rescaled accumulator), like flash attention does over keys. Full rows cost
registers, so ``BLOCK_T * BLOCK_D`` is capped (one to two rows at D = 1152) and D at ``MAX_DIM``.
Keeping the programs inside one batch row lets a query shared by the row's tokens reduce its gradient
inside the program.

*Sources without stacking.* The K sources are separate tensors; the kernels receive a small int64
tensor of their ``data_ptr()`` (and one for the ``1/rms`` tensors and one for the source gradients) and
cast each entry to a typed pointer. All sources must share shape, dtype and (contiguous) strides, so
one row offset serves them all; a source that is not contiguous or not 16-byte aligned is copied
first (sublayer outputs already are). This avoids the ``[K, B, T, D]`` copy that ``torch.stack``
would make on every call, and lets the backward write each source's gradient into its own tensor.
K is a compile-time constant (one compilation per distinct source count, at most 64): the loops over
sources then have static trip counts, and the per-token logits of all K sources fit a
``[BLOCK_T, next_pow2(K)]`` register tile.

*Forward.* One pass over the sources: online softmax plus the weighted sum; writes ``h``, ``alpha``
(from the register tile of logits and the final log-sum-exp) and the per-token ``lse = m + log l``,
the only statistic backward needs (``alpha_k = exp(z_k - lse)``; max and sum are folded into it).

*Backward.* Two streaming passes over the sources, both inside one program:
  pass 1 reads each ``v_k`` once: recomputes ``z_k`` and ``alpha_k``, ``g_k = dL/dalpha_k =
  <dh, v_k> + grad_alpha_k``, and accumulates the two fp32 row sums that give the query gradient;
  then ``s = sum_k alpha_k g_k`` and ``dz_k = alpha_k (g_k - s)`` for all k (register tiles);
  pass 2 writes ``dv_k = alpha_k dh + dz_k r_k q`` from the ``dh`` and ``q`` rows still in registers
  (no second read of the sources) and the ``dr_k = dz_k (v_k . q)`` tile.
The query gradient ``dq = sum_k dz_k r_k v_k`` would need ``v_k`` again once ``s`` is known; instead it
is split as ``sum_k alpha_k r_k g_k v_k - s sum_k alpha_k r_k v_k``, both accumulated in pass 1. The
cancellation in that difference costs fp32 rounding of the order already in ``g_k - s`` itself.
Per-token queries get ``dq`` per row; shared queries get one partial sum per program, reduced over
programs (and over the batch for a ``[D]`` query) by torch, deterministically, instead of atomics.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable
from triton.runtime.interpreter import InterpretedFunction

from dar.routing.kernels.recompute import validate_inputs

MAX_SOURCES = 64
MAX_DIM = 8192  # rows of next_pow2(D) fp32 lanes live in registers
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# fp32 elements per [BLOCK_T, BLOCK_D] register tile: forward holds 3 such tiles (q, v, accumulator),
# backward 5 (q, v, dh and the two query-gradient sums), hence the smaller tile there.
FORWARD_TILE_ELEMENTS = 4096
BACKWARD_TILE_ELEMENTS = 2048
POINTER_ALIGNMENT = 16  # bytes; promised to the compiler (in _typed_pointer) so that loads vectorise


@triton.jit
def _typed_pointer(table, k, like):
    """Entry ``k`` of an int64 pointer table as a pointer of ``like``'s type. The hint restates what
    ``_kernel_ready`` ensures: without it the compiler cannot know the alignment of a pointer read from
    memory and falls back to scalar loads. (16 is POINTER_ALIGNMENT: jit code sees no plain globals.)"""
    return tl.multiple_of(tl.load(table + k).to(like.dtype), 16)


@triton.jit
def _aggregate_forward_kernel(
    source_ptrs,  # int64 [K]: data_ptr of each source [B, T, D]
    inv_rms_ptrs,  # int64 [K]: data_ptr of each 1/rms [B, T] fp32
    query_ptr,  # query seen as [B, T, D]: strides 0 along the dims it is shared over
    stride_query_b,
    stride_query_t,
    h_ptr,  # out [B, T, D], sources' dtype
    alpha_ptr,  # out [B, T, K] fp32
    lse_ptr,  # out [B, T] fp32
    T,
    D,
    NUM_SOURCES: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    batch = tl.program_id(1).to(tl.int64)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T] token index in the row
    offs_d = tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    row_mask = offs_t < T
    tile_mask = row_mask[:, None] & (offs_d < D)[None, :]  # [BLOCK_T, BLOCK_D]
    rows = batch * T + offs_t  # [BLOCK_T] flat index into [B * T]
    tile = rows[:, None] * D + offs_d[None, :]  # [BLOCK_T, BLOCK_D] offsets into any [B, T, D] source
    q = tl.load(
        query_ptr + batch * stride_query_b + offs_t[:, None] * stride_query_t + offs_d[None, :],
        mask=tile_mask,
        other=0.0,
    ).to(tl.float32)

    running_max = tl.full([BLOCK_T], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_T], tl.float32)
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)  # sum_k exp(z_k - running_max) v_k
    logits = tl.full([BLOCK_T, BLOCK_K], float("-inf"), tl.float32)  # padding columns stay -inf
    for k in range(NUM_SOURCES):
        v_ptr = _typed_pointer(source_ptrs, k, h_ptr)
        r_ptr = _typed_pointer(inv_rms_ptrs, k, lse_ptr)
        v = tl.load(v_ptr + tile, mask=tile_mask, other=0.0).to(tl.float32)  # [BLOCK_T, BLOCK_D]
        r = tl.load(r_ptr + rows, mask=row_mask, other=0.0)  # [BLOCK_T]
        z = tl.sum(v * q, axis=1) * r  # [BLOCK_T]
        new_max = tl.maximum(running_max, z)
        rescale = tl.exp(running_max - new_max)  # 0 on the first source
        weight = tl.exp(z - new_max)
        running_sum = running_sum * rescale + weight
        acc = acc * rescale[:, None] + weight[:, None] * v
        running_max = new_max
        logits = tl.where(offs_k[None, :] == k, z[:, None], logits)

    lse = running_max + tl.log(running_sum)  # [BLOCK_T]
    tl.store(h_ptr + tile, (acc / running_sum[:, None]).to(h_ptr.dtype.element_ty), mask=tile_mask)
    alpha_mask = row_mask[:, None] & (offs_k < NUM_SOURCES)[None, :]
    tl.store(alpha_ptr + rows[:, None] * NUM_SOURCES + offs_k[None, :], tl.exp(logits - lse[:, None]), mask=alpha_mask)
    tl.store(lse_ptr + rows, lse, mask=row_mask)


@triton.jit
def _aggregate_backward_kernel(
    source_ptrs,  # int64 [K]: data_ptr of each source [B, T, D]
    inv_rms_ptrs,  # int64 [K]: data_ptr of each 1/rms [B, T] fp32
    grad_source_ptrs,  # int64 [K]: data_ptr of each out dL/dv_k [B, T, D], sources' dtype
    query_ptr,  # query seen as [B, T, D], as in the forward
    stride_query_b,
    stride_query_t,
    grad_h_ptr,  # [B, T, D] sources' dtype
    grad_alpha_ptr,  # [B, T, K] fp32
    lse_ptr,  # [B, T] fp32, saved by the forward
    grad_inv_rms_ptr,  # out [K, B, T] fp32
    grad_query_ptr,  # out fp32: [B, T, D] per token, or [B, cdiv(T, BLOCK_T), D] partial sums
    T,
    D,
    NUM_SOURCES: tl.constexpr,
    PER_TOKEN_QUERY: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    batch = tl.program_id(1).to(tl.int64)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    row_mask = offs_t < T
    tile_mask = row_mask[:, None] & (offs_d < D)[None, :]
    rows = batch * T + offs_t  # [BLOCK_T]
    tile = rows[:, None] * D + offs_d[None, :]  # [BLOCK_T, BLOCK_D]
    source_mask = row_mask[:, None] & (offs_k < NUM_SOURCES)[None, :]  # [BLOCK_T, BLOCK_K]
    q = tl.load(
        query_ptr + batch * stride_query_b + offs_t[:, None] * stride_query_t + offs_d[None, :],
        mask=tile_mask,
        other=0.0,
    ).to(tl.float32)
    grad_h = tl.load(grad_h_ptr + tile, mask=tile_mask, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    grad_weight = tl.load(
        grad_alpha_ptr + rows[:, None] * NUM_SOURCES + offs_k[None, :], mask=source_mask, other=0.0
    )  # [BLOCK_T, BLOCK_K], becomes dL/dalpha once <dh, v_k> is added

    # Pass 1: one read of every source.
    alpha = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)
    dots = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)  # v_k . q
    inv_rms = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)
    weighted_grad_sum = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)  # sum_k alpha_k r_k g_k v_k
    weighted_sum = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)  # sum_k alpha_k r_k v_k
    for k in range(NUM_SOURCES):
        v_ptr = _typed_pointer(source_ptrs, k, grad_h_ptr)
        r_ptr = _typed_pointer(inv_rms_ptrs, k, lse_ptr)
        v = tl.load(v_ptr + tile, mask=tile_mask, other=0.0).to(tl.float32)  # [BLOCK_T, BLOCK_D]
        r = tl.load(r_ptr + rows, mask=row_mask, other=0.0)  # [BLOCK_T]
        dot = tl.sum(v * q, axis=1)
        alpha_k = tl.exp(dot * r - lse)
        column = offs_k[None, :] == k
        g_k = tl.sum(grad_h * v, axis=1) + tl.sum(tl.where(column, grad_weight, 0.0), axis=1)
        alpha = tl.where(column, alpha_k[:, None], alpha)
        dots = tl.where(column, dot[:, None], dots)
        inv_rms = tl.where(column, r[:, None], inv_rms)
        grad_weight = tl.where(column, g_k[:, None], grad_weight)
        weighted_v = (alpha_k * r)[:, None] * v
        weighted_sum += weighted_v
        weighted_grad_sum += g_k[:, None] * weighted_v  # g_k times the same product: K = 1 gives dq = 0 exactly

    # Softmax backward for all sources at once: dL/dz_k = alpha_k (g_k - s), s = sum_k alpha_k g_k.
    s = tl.sum(alpha * grad_weight, axis=1)  # [BLOCK_T]
    grad_logits = alpha * (grad_weight - s[:, None])  # [BLOCK_T, BLOCK_K]
    grad_dots = grad_logits * inv_rms  # dL/d(v_k . q)
    num_rows = tl.num_programs(1).to(tl.int64) * T  # B * T
    tl.store(grad_inv_rms_ptr + offs_k[None, :] * num_rows + rows[:, None], grad_logits * dots, mask=source_mask)
    grad_query = weighted_grad_sum - s[:, None] * weighted_sum  # [BLOCK_T, BLOCK_D] = sum_k dL/dz_k r_k v_k
    if PER_TOKEN_QUERY:
        tl.store(grad_query_ptr + tile, grad_query, mask=tile_mask)
    else:
        partial = batch * tl.num_programs(0) + tl.program_id(0)
        tl.store(grad_query_ptr + partial * D + offs_d, tl.sum(grad_query, axis=0), mask=offs_d < D)

    # Pass 2: source gradients from registers, dv_k = alpha_k dh + dL/d(v_k . q) q.
    for k in range(NUM_SOURCES):
        column = offs_k[None, :] == k
        alpha_k = tl.sum(tl.where(column, alpha, 0.0), axis=1)  # [BLOCK_T]
        grad_dot_k = tl.sum(tl.where(column, grad_dots, 0.0), axis=1)
        grad_v = alpha_k[:, None] * grad_h + grad_dot_k[:, None] * q  # [BLOCK_T, BLOCK_D]
        grad_v_ptr = _typed_pointer(grad_source_ptrs, k, grad_h_ptr)
        tl.store(grad_v_ptr + tile, grad_v.to(grad_h_ptr.dtype.element_ty), mask=tile_mask)


INTERPRETED = isinstance(_aggregate_forward_kernel, InterpretedFunction)  # TRITON_INTERPRET=1 at import


def runs_on(device: torch.device) -> bool:
    """Whether these kernels can take tensors on ``device``: CUDA when compiled, CPU when interpreted."""
    if INTERPRETED:
        return device.type == "cpu"
    return device.type == "cuda" and torch.cuda.is_available()


def _kernel_ready(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when contiguous and aligned for vector loads, else an aligned contiguous copy."""
    if t.is_contiguous() and t.data_ptr() % POINTER_ALIGNMENT == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)  # fresh allocations are aligned


def _pointer_table(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """int64 [K] of data pointers on the tensors' device: how the kernels address K separate tensors."""
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=tensors[0].device)


def _query_strides(query: torch.Tensor, T: int, D: int) -> tuple[int, int]:
    """(batch, token) strides that make a contiguous [D], [B, D] or [B, T, D] query read as [B, T, D]."""
    return {1: (0, 0), 2: (D, 0), 3: (T * D, D)}[query.dim()]


def _launch_config(T: int, D: int, tile_elements: int) -> dict:
    block_d = triton.next_power_of_2(D)
    block_t = max(1, min(tile_elements // block_d, triton.next_power_of_2(T)))
    return {"BLOCK_T": block_t, "BLOCK_D": block_d, "num_warps": 4 if block_t * block_d <= 2048 else 8}


class TritonAggregate(torch.autograd.Function):
    """``apply(query, *sources, *source_inv_rms) -> (h, alpha)`` with the fused kernels above."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, *sources_and_inv_rms: torch.Tensor):
        num_sources = len(sources_and_inv_rms) // 2
        sources = [_kernel_ready(v) for v in sources_and_inv_rms[:num_sources]]
        inv_rms = [_kernel_ready(r) for r in sources_and_inv_rms[num_sources:]]
        query = query.contiguous()
        B, T, D = sources[0].shape
        h = torch.empty_like(sources[0])
        alpha = torch.empty(B, T, num_sources, dtype=torch.float32, device=h.device)
        lse = torch.empty(B, T, dtype=torch.float32, device=h.device)
        config = _launch_config(T, D, FORWARD_TILE_ELEMENTS)
        grid = (triton.cdiv(T, config["BLOCK_T"]), B)
        _aggregate_forward_kernel[grid](
            _pointer_table(sources), _pointer_table(inv_rms),
            query, *_query_strides(query, T, D),
            h, alpha, lse, T, D,
            NUM_SOURCES=num_sources, BLOCK_K=triton.next_power_of_2(num_sources), **config,
        )  # fmt: skip
        ctx.num_sources = num_sources
        ctx.save_for_backward(query, lse, *sources, *inv_rms)
        return h, alpha

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h: torch.Tensor, grad_alpha: torch.Tensor):
        query, lse, *saved = ctx.saved_tensors
        num_sources = ctx.num_sources
        sources, inv_rms = saved[:num_sources], saved[num_sources:]
        B, T, D = sources[0].shape
        grad_h = grad_h.to(sources[0].dtype).contiguous()
        grad_alpha = grad_alpha.float().contiguous()
        grad_sources = [torch.empty_like(v) for v in sources]
        grad_inv_rms = torch.empty(num_sources, B, T, dtype=torch.float32, device=lse.device)
        config = _launch_config(T, D, BACKWARD_TILE_ELEMENTS)
        grid = (triton.cdiv(T, config["BLOCK_T"]), B)
        per_token_query = query.dim() == 3
        grad_query_shape = (B, T, D) if per_token_query else (B, grid[0], D)
        grad_query = torch.empty(grad_query_shape, dtype=torch.float32, device=lse.device)
        _aggregate_backward_kernel[grid](
            _pointer_table(sources), _pointer_table(inv_rms), _pointer_table(grad_sources),
            query, *_query_strides(query, T, D),
            grad_h, grad_alpha, lse, grad_inv_rms, grad_query, T, D,
            NUM_SOURCES=num_sources, PER_TOKEN_QUERY=per_token_query,
            BLOCK_K=triton.next_power_of_2(num_sources), **config,
        )  # fmt: skip
        if not per_token_query:  # reduce the per-program partial sums to [B, D], then [D]
            grad_query = grad_query.sum(1) if query.dim() == 2 else grad_query.sum((0, 1))
        return (grad_query.to(query.dtype), *grad_sources, *grad_inv_rms.unbind(0))


def triton_aggregate(
    sources: Sequence[torch.Tensor], source_inv_rms: Sequence[torch.Tensor], query: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`dar.routing.backends.torch_aggregate` with the fused kernels: (h [B, T, D], alpha [B, T, K] fp32)."""
    validate_inputs(sources, source_inv_rms, query)
    device = sources[0].device
    if not runs_on(device):
        mode = "interpreted (TRITON_INTERPRET=1), so CPU tensors only" if INTERPRETED else "compiled, so CUDA tensors only"
        raise RuntimeError(f"the Triton aggregation kernels are {mode}; got tensors on {device}")
    if len(sources) > MAX_SOURCES:
        raise ValueError(f"the Triton kernels take at most {MAX_SOURCES} sources, got {len(sources)}")
    if sources[0].dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"the Triton kernels take fp32, bf16 or fp16 sources, got {sources[0].dtype}")
    if sources[0].shape[-1] > MAX_DIM:
        raise ValueError(f"the Triton kernels hold rows of D <= {MAX_DIM} in registers, got D={sources[0].shape[-1]}")
    if any(r.dtype != torch.float32 for r in source_inv_rms):
        raise ValueError("source_inv_rms must be fp32 (dar.routing.ops.inverse_rms returns fp32)")
    return TritonAggregate.apply(query, *sources, *source_inv_rms)
