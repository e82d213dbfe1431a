"""Manifold-Constrained Hyper-Connections (mHC; Xie et al. 2025, DeepSeek, arXiv 2512.24880), behind
DAR's stream protocol.

mHC keeps Hyper-Connections' ``n = config.expansion`` parallel streams ``H`` (n x C per token, C = D
here; [n, B, T, D], started as n copies of the embedding v_0) and its three maps (read, write, mix),
and constrains them (the paper's parameterisation). Per routed sublayer l and per token:

    x~       = RMSNorm(vec(H))                      the n*C vector: one norm over all streams
    H~_pre   = a_pre  * (x~ W_pre)     + b_pre      W_pre  in R^{nC x n},    b_pre  in R^{1 x n}
    H~_post  = a_post * (x~ W_post)    + b_post     W_post in R^{nC x n},    b_post in R^{1 x n}
    H~_res   = a_res  * mat(x~ W_res)  + b_res      W_res  in R^{nC x n^2},  b_res  in R^{n x n}

    H_pre    = sigmoid(H~_pre)                      read weights, each in (0, 1)
    H_post   = 2 sigmoid(H~_post)                   write weights, each in (0, 2)
    H_res    = SinkhornKnopp(H~_res)                (approximately) doubly stochastic

    h_in = H_pre H,   v_l = F_l(h_in),   H <- H_res H + H_post^T v_l

(``a_*`` learnable scalar gates, ``b_*`` static biases). Sinkhorn-Knopp: ``M = exp(H~_res)``, then
``SINKHORN_ITERS`` = 20 times (the paper's t_max) normalise the columns, then the rows. Choice: the rows
come last, so they sum to 1 up to rounding (columns approximately): row j holds the weights new stream
j takes of the old streams, a convex combination. ``mat`` is row-major: column ``i n + j`` of ``W_res``
is ``H~_res[i, j]``. The RMSNorm has no learnable gain: a gain g gives ``x (diag(g) W) / rms(x)``, the
same family as W alone (the paper's fused kernel likewise divides ``x W`` by the rms); ``rms(x) =
sqrt(mean(x^2) + 1e-6)`` as DAR's keys. With ``config.dynamic`` off only the biases remain (static mHC).

Unlike Hyper-Connections (:mod:`~dar.routing.comparison.hyper_connections`), every coefficient reads
the whole token (all n streams flattened), not one stream's row. The reference implementation
(``hyper-connections`` 0.4.11, ``ManifoldConstrainedHyperConnections``) keeps HC's per-stream form and
ends its Sinkhorn on the other side; this module follows the paper's equations above.

In this package's Hyper-Connections layout (``alpha[i, 0]`` = the weight of stream i in the layer
input, ``alpha[i, 1 + j]`` = its weight in new stream j, ``beta[i]`` = the output's weight in stream i)
mHC is ``alpha = [H_pre^T | H_res^T]``, ``beta = H_post^T``, so the streams are carried by
:class:`~dar.routing.comparison.hyper_connections.HyperConnectionsStream` unchanged: fp32 streams,
elementwise mixing, ``final_input()`` the sum of the streams, and recorded weights per layer the matrix
``[[0, H_post], [H_pre^T, H_res^T]]`` (fp32 [B, T, n+1, n+1], rows "from" (output, streams), columns
"to" (input, streams)). The final layer reads the sum, as ``hyper`` and the reference do: H_res's
columns sum to 1, so the mixing conserves the sum of the streams, ``sum_i H_i <- sum_i H_i + (sum_i
H_post_i) v_l`` (a residual stream with learned output weights); SiT's final LayerNorm removes its
factor n at initialisation up to its epsilon.

Initialisation (ours; chosen to start as the Pre-Norm residual, as ``hyper`` does): ``W = 0`` (no
dynamic terms), gates ``a = 0.01`` (the reference's, and HC's ``s``), and

    b_post = 0                     H_post = 2 sigmoid(0) = 1 exactly: every stream receives every output
    b_res  = m I                   H_res = exp(m I) normalised: diagonal e^m / (e^m + n - 1), the rest
                                   1 / (e^m + n - 1) (its row and column sums are equal: one step)
    b_pre  = m (2 e_{k mod n} - 1) H_pre reads stream k mod n (k the 0-based layer): sigmoid(m), the others
                                   sigmoid(-m) each (HC's A_m = e_{k mod n})

with ``m = INIT_LOGIT = 4``. Starting from identical streams with ``H_post = 1``, every new stream is a
convex combination of identical streams plus ``v``, so all streams stay the residual stream
``v_0 + .. + v_l`` (up to rounding of H_res's row sums), whatever m; the layer input ``H_pre H = s h`` is
the residual input scaled by ``s = sum_i H_pre_i`` (1.036 for n = 4), which the LayerNorm in front of
every SiT sublayer removes up to its epsilon, the one way m enters the initial function. Measured on a
perturbed SiT-Pico/8 in fp64 (``tests/test_router_mhc.py``, n = 4): sublayer inputs within 4.5e-9
(relative) of s times the residual's (5.8e-8 at m = 1, 9e-11 at m = 8), the final input within 4.7e-9
of n times it, the output within 5.0e-9 of ``hyper``'s and 3.7e-7 of the residual model's (as
``hyper``'s: the final LayerNorm's epsilon on n h).

Sigmoid and Sinkhorn cannot reach HC's exact one-hot read and identity mix; m sets how close the
connections start to them (n = 4: the read takes 0.982 of stream k and 0.018 of each other, H_res keeps
0.948 of every stream) against how saturated they are: the slopes fall as e^-m, and under Adam a bias
moves by at most about the learning rate a step, so from a margin of 8 (H_res off-diagonal 3e-4) a run
of a few thousand steps could hardly open a connection. Without the asymmetric read the streams would
be interchangeable and, from identical copies, never separate. The reference starts from logits
``[e_k | I]`` and ``b_post = 1`` (``H_post = 2 sigmoid(1) = 1.46``: the residual model with every output
scaled by 1.46), which we do not follow.

Parameters per layer: ``n (n + 2)`` static (b_pre, b_post, b_res), plus ``n^2 (n + 2) D`` (W) + 3
(gates) with ``dynamic``. Stored stacked over layers: ``bias_pre`` [L, n], ``bias_post`` [L, n],
``bias_res`` [L, n, n]; ``projection`` [L, n, D, n (n+2)] (W with its nC rows as (stream, channel),
columns ``[W_pre | W_post | W_res]``), ``gate_pre``, ``gate_post``, ``gate_res`` [L]. SiT-XL/2 (L = 56,
D = 1152, n = 4): 1,344 static, 6,194,664 dynamic.

Numerics: as ``hyper``, autocast off and fp32 at least: the RMS statistic, projection, sigmoids and
Sinkhorn run in the streams' dtype, and the stream mixing is elementwise.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dar.routing.comparison import ComparisonRouter
from dar.routing.comparison.hyper_connections import HyperConnectionsStream
from dar.routing.config import RoutingConfig
from dar.routing.ops import RMS_EPS, stat_dtype

__all__ = ["ManifoldConstrainedHCRouter", "parameter_count", "sinkhorn_knopp"]

SINKHORN_ITERS = 20  # the paper's t_max
INIT_LOGIT = 4.0  # m: the initial read and mix logits (module docstring)
GATE_INIT = 0.01  # a_pre, a_post, a_res at initialisation


def parameter_count(dim: int, num_layers: int, expansion: int, dynamic: bool) -> int:
    """Router parameters: per layer n (n + 2) biases, plus n^2 (n + 2) D projection weights and 3 gates
    when dynamic."""
    n = expansion
    per_layer = n * (n + 2) + ((n * dim * n * (n + 2) + 3) if dynamic else 0)
    return num_layers * per_layer


def sinkhorn_knopp(logits: torch.Tensor, iters: int = SINKHORN_ITERS) -> torch.Tensor:
    """``exp(logits)`` [..., n, n] with its columns, then its rows, normalised ``iters`` times: rows sum
    to 1 up to rounding, columns approximately."""
    # subtracting each column's maximum changes nothing the column normalisation does not undo, and
    # keeps exp finite; a constant shift, so it needs no gradient
    m = torch.exp(logits - logits.amax(dim=-2, keepdim=True).detach())
    for _ in range(iters):
        m = m / m.sum(dim=-2, keepdim=True)
        m = m / m.sum(dim=-1, keepdim=True)
    return m


def inverse_rms_of_tokens(streams: torch.Tensor) -> torch.Tensor:
    """1 / RMS of every token's n*D vector: [n, B, T, D] -> [B, T] (fp32 or wider)."""
    n, D = streams.shape[0], streams.shape[-1]
    norm = torch.linalg.vector_norm(streams, dim=(0, -1), dtype=stat_dtype(streams.dtype))
    return torch.rsqrt(norm.square() / (n * D) + RMS_EPS)


class ManifoldConstrainedHCRouter(ComparisonRouter):
    """mHC's constrained connections for ``num_layers`` sublayers of width ``dim`` with
    ``config.expansion`` streams (static biases, plus dynamic terms when ``config.dynamic``); module
    docstring."""

    def __init__(self, dim: int, num_layers: int, config: RoutingConfig):
        super().__init__(dim, num_layers, config)
        self.expansion = n = config.expansion
        self.dynamic = config.dynamic
        L = num_layers
        self.bias_pre = nn.Parameter(torch.zeros(L, n))
        self.bias_post = nn.Parameter(torch.zeros(L, n))
        self.bias_res = nn.Parameter(torch.zeros(L, n, n))
        if self.dynamic:
            self.projection = nn.Parameter(torch.zeros(L, n, dim, n * (n + 2)))  # [W_pre | W_post | W_res]
            self.gate_pre = nn.Parameter(torch.zeros(L))
            self.gate_post = nn.Parameter(torch.zeros(L))
            self.gate_res = nn.Parameter(torch.zeros(L))
        self.reset_parameters()

    def reset_parameters(self):
        """The Pre-Norm residual's function, with the read on stream k mod n and H_res near I (module
        docstring)."""
        n = self.expansion
        with torch.no_grad():
            self.bias_pre.fill_(-INIT_LOGIT)
            for k in range(self.num_layers):  # k: 0-based layer index
                self.bias_pre[k, k % n] = INIT_LOGIT
            self.bias_post.zero_()
            eye = torch.eye(n, dtype=self.bias_res.dtype, device=self.bias_res.device)
            self.bias_res.copy_(INIT_LOGIT * eye.expand_as(self.bias_res))
            if self.dynamic:
                self.projection.zero_()
                for gate in (self.gate_pre, self.gate_post, self.gate_res):
                    gate.fill_(GATE_INIT)

    def connection_weights(self, layer: int, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer`` (1-based)'s ``alpha = [H_pre^T | H_res^T]`` [n, n+1, B, T] and ``beta =
        H_post^T`` [n, B, T] (B, T = 1, 1 when static) for the streams ``H`` [n, B, T, D], in their dtype
        (the wide one, autocast off): the layout of ``HyperConnectionsRouter.connection_weights``."""
        k = layer - 1
        wide = streams.dtype
        n = self.expansion
        pre = self.bias_pre[k].to(wide)[None, None]  # [1, 1, n]: per token below when dynamic
        post = self.bias_post[k].to(wide)[None, None]
        res = self.bias_res[k].to(wide)[None, None]  # [1, 1, n, n]
        if self.dynamic:
            # vec(H) W = sum_i H_i W_i (W's rows are (stream, channel)); RMSNorm's 1/rms scales after
            projected = (streams @ self.projection[k].to(wide).unsqueeze(1)).sum(0)  # [B, T, n(n+2)]
            projected = projected * inverse_rms_of_tokens(streams).to(wide)[..., None]
            pre = pre + self.gate_pre[k].to(wide) * projected[..., :n]
            post = post + self.gate_post[k].to(wide) * projected[..., n : 2 * n]
            res = res + self.gate_res[k].to(wide) * projected[..., 2 * n :].unflatten(-1, (n, n))
        h_pre = torch.sigmoid(pre)  # [B, T, n]
        h_post = 2 * torch.sigmoid(post)
        h_res = sinkhorn_knopp(res)  # [B, T, n, n]: h_res[j, i] = weight of stream i in new stream j
        alpha = torch.cat([h_pre.unsqueeze(-1), h_res.transpose(-1, -2)], dim=-1)  # [B, T, n, n+1]
        return alpha.permute(2, 3, 0, 1), h_post.permute(2, 0, 1)

    def begin(self, v0: torch.Tensor, t_emb: torch.Tensor | None = None, record_weights: bool = False):
        """Start one forward pass from the embedding ``v0`` [B, T, D] (``t_emb`` is not used)."""
        return HyperConnectionsStream(self, v0, record_weights)
