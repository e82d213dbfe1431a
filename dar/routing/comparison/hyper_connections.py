"""Hyper-Connections (Zhu et al. 2025, "Hyper-Connections", ICLR 2025, arXiv 2409.19606), behind DAR's
stream protocol.

The residual stream ``h`` becomes ``n = config.expansion`` parallel streams, the hyper hidden matrix
``H = (h_1 .. h_n)^T`` ([n, B, T, D] here: one D-vector per stream and token), started from copies of
the embedding, ``H^0 = (v_0, .., v_0)^T``. Every layer ``k`` owns a connection matrix

    HC^k = [[ 0,     B^k   ],        B^k   in R^{1 x n}   (depth-connections: output -> streams)
            [ A_m^k, A_r^k ]]        A_m^k in R^{n x 1}   (width-connections: streams -> layer input)
                                     A_r^k in R^{n x n}   (width-connections: streams -> streams)

and runs

    h_in  = (A_m^k)^T H^{k-1}                          (the sublayer's input, a mix of the streams)
    v_k   = T^k(h_in)                                  (our gated sublayer output)
    H^k   = (B^k)^T v_k + (A_r^k)^T H^{k-1}            (the output written into every stream j with
                                                         weight beta_j, the streams mixed by A_r)

so ``H^k_j = beta_j v_k + sum_i A_r[i, j] H^{k-1}_i``. ``final_input()`` is the sum of the streams,
``sum_j H^L_j``, as the paper feeds the final norm and head.

Static HC (SHC): ``A_m``, ``A_r``, ``B`` are learned per layer. Dynamic HC (DHC, ``config.dynamic``, the
paper's main variant) adds input-dependent terms computed per token from the layer's input matrix:

    Hbar       = RMSNorm_k(H^{k-1})                    (every stream normalised on its own, over D)
    B^k(H)     = s_beta^k  * tanh(Hbar W_beta^k)^T + B^k        W_beta^k in R^{D x 1}
    A_m^k(H)   = s_alpha^k * tanh(Hbar W_m^k)      + A_m^k      W_m^k    in R^{D x 1}
    A_r^k(H)   = s_alpha^k * tanh(Hbar W_r^k)      + A_r^k      W_r^k    in R^{D x n}

(``W_alpha = [W_m, W_r]``, D x (n+1); ``s_alpha``, ``s_beta`` learnable scalars per layer). The dynamic
weight of stream i's row is computed from stream i alone: ``A_r(H)[i, :]`` and ``B(H)[i]`` read
``Hbar_i``. The paper's pseudo-code normalises with a LayerNorm; here it is an RMSNorm
(``rms(x) = sqrt(mean(x^2) + 1e-6)``, as DAR's keys) with a learnable per-layer gain, as the reference
implementation (lucidrains/hyper-connections) does.

Initialisation (the paper's, §"Initialization"): dynamic projections ``W`` zero, ``s_alpha = s_beta =
0.01``, and the static matrices

    HC^k = [[ 0,            1_{1 x n} ],
            [ e_{k mod n},  I_{n x n} ]]

with ``k`` the 0-based layer index (layer ``l`` = 1..L reads stream ``(l - 1) mod n``, the reference's
``layer_index % n``). All streams then stay equal to the Pre-Norm residual stream ``v_0 + .. + v_{k}``:
every stream receives every output (``B = 1``), ``A_r = I`` keeps each stream, and ``A_m`` picks one of
these identical streams as the layer input. The dynamic terms are ``0.01 * tanh(0) = 0``. Every product
is ``1 * x`` or ``0 * x`` and every sum adds exact zeros, so each sublayer input is bit for bit the
residual stream's. The final input is ``n`` times the residual stream; SiT's final LayerNorm removes that
factor up to its epsilon (``LN(n h)`` uses ``eps / n^2``).

Mapping onto our sublayers: the paper puts one hyper-connection around every attention and every FFN
module ("layer" ``T^k``), so one HC layer is one routed sublayer, ``L = 2 x depth`` (SiT-XL/2: 56).

Parameters per layer: ``n (n + 1)`` (A_m, A_r) + ``n`` (B); with ``dynamic`` also ``D (n + 1)``
(W_alpha) + ``D`` (W_beta) + ``D`` (the norm gain) + 2 (s_alpha, s_beta). Stored stacked over layers:
``static_alpha`` [L, n, n+1] (column 0 = A_m, columns 1.. = A_r, row i = stream i), ``static_beta``
[L, n]; ``norm_gain`` [L, D], ``dynamic_alpha`` [L, D, n+1], ``dynamic_beta`` [L, D], ``alpha_scale``
[L], ``beta_scale`` [L]. SiT-XL/2 (n = 4): 1,344 static, 453,040 dynamic.

Numerics: the router's arithmetic runs with autocast off in fp32 at least (``stat_dtype``): the streams
are kept in fp32 (as SiT's residual stream is under bf16 autocast, v_0 being fp32), the RMS statistics,
projections and tanh are fp32, and the stream mixing is elementwise (multiply-adds, never a matmul, so
TF32 or bf16 matmul settings cannot round the streams). Sublayer outputs (bf16 under autocast) are
promoted when written into the streams.

Recorded weights (``record_weights=True``): per layer the full connection matrix ``HC^k`` as fp32
[B, T, n+1, n+1]: row 0 = (0, B), rows 1..n = (A_m, A_r); rows are "from" (the layer output, then the
streams), columns "to" (the layer input, then the streams). The final sum has no weights.

The stream bookkeeping (:class:`HyperConnectionsStream`) serves any router that gives per-layer weights
in this layout; manifold-constrained HC (:mod:`~dar.routing.comparison.mhc`) uses it with its own
constrained weights. Not implemented: the frac-connections variant.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from dar.routing.comparison import ComparisonRouter
from dar.routing.config import RoutingConfig
from dar.routing.ops import inverse_rms, stat_dtype

__all__ = ["HyperConnectionsRouter", "HyperConnectionsStream", "parameter_count"]

DYNAMIC_SCALE_INIT = 0.01  # s_alpha, s_beta at initialisation (the paper's)


def parameter_count(dim: int, num_layers: int, expansion: int, dynamic: bool) -> int:
    """Router parameters: per layer n (n + 2) static, plus D (n + 3) + 2 when dynamic."""
    n = expansion
    per_layer = n * (n + 1) + n + ((dim * (n + 1) + dim + dim + 2) if dynamic else 0)
    return num_layers * per_layer


def _autocast_off(device_type: str):
    """The router's own arithmetic runs outside autocast (fp32 statistics, fp32 streams)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class HyperConnectionsRouter(ComparisonRouter):
    """The connection matrices of ``num_layers`` hyper-connected sublayers of width ``dim`` with
    ``config.expansion`` streams (static, plus dynamic terms when ``config.dynamic``); module docstring."""

    def __init__(self, dim: int, num_layers: int, config: RoutingConfig):
        super().__init__(dim, num_layers, config)
        self.expansion = n = config.expansion
        self.dynamic = config.dynamic
        L = num_layers
        self.static_alpha = nn.Parameter(torch.zeros(L, n, n + 1))  # [A_m | A_r] per layer
        self.static_beta = nn.Parameter(torch.zeros(L, n))  # B per layer
        if self.dynamic:
            self.norm_gain = nn.Parameter(torch.ones(L, dim))  # RMSNorm gain
            self.dynamic_alpha = nn.Parameter(torch.zeros(L, dim, n + 1))  # W_alpha = [W_m | W_r]
            self.dynamic_beta = nn.Parameter(torch.zeros(L, dim))  # W_beta
            self.alpha_scale = nn.Parameter(torch.zeros(L))  # s_alpha
            self.beta_scale = nn.Parameter(torch.zeros(L))  # s_beta
        self.reset_parameters()

    def reset_parameters(self):
        """The paper's initialisation: the model starts as the Pre-Norm residual (module docstring)."""
        n = self.expansion
        alpha = self.static_alpha
        with torch.no_grad():
            alpha.zero_()
            for k in range(self.num_layers):  # k: 0-based layer index
                alpha[k, k % n, 0] = 1.0  # A_m = e_{k mod n}
                alpha[k, :, 1:] = torch.eye(n, dtype=alpha.dtype, device=alpha.device)  # A_r = I
            self.static_beta.fill_(1.0)  # B = 1
            if self.dynamic:
                self.norm_gain.fill_(1.0)
                self.dynamic_alpha.zero_()
                self.dynamic_beta.zero_()
                self.alpha_scale.fill_(DYNAMIC_SCALE_INIT)
                self.beta_scale.fill_(DYNAMIC_SCALE_INIT)

    def connection_weights(self, layer: int, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer`` (1-based)'s ``alpha = [A_m | A_r]`` and ``beta = B`` for the streams ``H``
        [n, B, T, D] (in the wide dtype, autocast off): alpha [n, n+1, B, T] (or [n, n+1, 1, 1] when
        static), alpha[i, j] = the weight of stream i in output j (0 = the layer input, 1.. = the new
        streams); beta [n, B, T] (or [n, 1, 1]), the weight of the layer output in stream i."""
        k = layer - 1
        wide = streams.dtype
        n = self.expansion
        alpha = self.static_alpha[k].to(wide)[:, :, None, None]
        beta = self.static_beta[k].to(wide)[:, None, None]
        if not self.dynamic:
            return alpha, beta
        # tanh(RMSNorm(H) W) with RMSNorm(H) = g * H / rms(H): the gain folds into W, 1/rms scales after
        projection = torch.cat([self.dynamic_alpha[k], self.dynamic_beta[k][:, None]], dim=1)  # [D, n+2]
        projection = (self.norm_gain[k][:, None] * projection).to(wide)
        logits = (streams @ projection) * inverse_rms(streams).to(wide)[..., None]  # [n, B, T, n+2]
        gates = torch.tanh(logits)
        alpha = alpha + self.alpha_scale[k].to(wide) * gates[..., : n + 1].permute(0, 3, 1, 2)
        beta = beta + self.beta_scale[k].to(wide) * gates[..., n + 1]
        return alpha, beta

    def begin(self, v0: torch.Tensor, t_emb: torch.Tensor | None = None, record_weights: bool = False):
        """Start one forward pass from the embedding ``v0`` [B, T, D] (``t_emb`` is not used)."""
        return HyperConnectionsStream(self, v0, record_weights)


class HyperConnectionsStream:
    """One forward pass: the hyper hidden matrix ``H`` [n, B, T, D] and, between ``next_input()`` and
    ``push()``, the current layer's mixed streams and depth weights.

    ``router`` is any module with ``expansion`` (n), ``num_layers`` and ``connection_weights(layer, H)``
    returning ``alpha`` [n, n+1, B, T] and ``beta`` [n, B, T] (or with B, T = 1, 1) as
    :meth:`HyperConnectionsRouter.connection_weights` does: Hyper-Connections, and mHC with its
    constrained weights (:mod:`~dar.routing.comparison.mhc`)."""

    def __init__(self, router: nn.Module, v0: torch.Tensor, record_weights: bool):
        self.router = router
        self.device_type = v0.device.type
        self.dtype = torch.promote_types(stat_dtype(v0.dtype), next(router.parameters()).dtype)
        n = router.expansion
        self.streams = v0.to(self.dtype).unsqueeze(0).expand(n, *v0.shape)  # H^0: n copies (a view)
        self.layer = 1
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # (A_r^T H [n, B, T, D], beta)
        self._input: torch.Tensor | None = None
        # HC^k per layer, [B, T, n+1, n+1] fp32, only when asked for
        self.weights: list[torch.Tensor] | None = [] if record_weights else None

    def _width_connection(self) -> None:
        router = self.router
        H = self.streams
        with _autocast_off(self.device_type):
            alpha, beta = router.connection_weights(self.layer, H)
            # (A^T H)[j] = sum_i alpha[i, j] H_i, elementwise in the wide dtype: [n+1, B, T, D]
            mixed = alpha[0].unsqueeze(-1) * H[0]
            for i in range(1, router.expansion):
                mixed = mixed + alpha[i].unsqueeze(-1) * H[i]
        if self.weights is not None:
            self.weights.append(self._hc_matrix(alpha, beta, H.shape[1:3]))
        self._input = mixed[0]
        self._pending = (mixed[1:], beta)

    @staticmethod
    def _hc_matrix(alpha: torch.Tensor, beta: torch.Tensor, batch_tokens) -> torch.Tensor:
        n = alpha.shape[0]
        B, T = batch_tokens
        hc = alpha.new_zeros(B, T, n + 1, n + 1, dtype=torch.float32)
        hc[:, :, 0, 1:] = beta.detach().float().expand(n, B, T).permute(1, 2, 0)
        hc[:, :, 1:, :] = alpha.detach().float().expand(n, n + 1, B, T).permute(2, 3, 0, 1)
        return hc

    def next_input(self) -> torch.Tensor:
        """The input of the current sublayer, ``A_m^T H`` [B, T, D] (fp32 or wider)."""
        if self.layer > self.router.num_layers:
            raise RuntimeError(f"next_input() after all {self.router.num_layers} sublayers")
        if self._input is None:
            self._width_connection()
        return self._input

    def push(self, v: torch.Tensor) -> None:
        """Write the sublayer output ``v`` [B, T, D]: ``H <- B^T v + A_r^T H``."""
        if self.layer > self.router.num_layers:
            raise RuntimeError(f"push() after all {self.router.num_layers} sublayers")
        if self._pending is None:
            self._width_connection()
        residual, beta = self._pending
        with _autocast_off(self.device_type):
            self.streams = residual + beta.unsqueeze(-1) * v.to(self.dtype)
        self._pending = self._input = None
        self.layer += 1

    def final_input(self) -> torch.Tensor:
        """The sum of the streams, ``sum_j H^L_j`` [B, T, D]."""
        L = self.router.num_layers
        if self.layer != L + 1:
            raise RuntimeError(f"final_input() after {self.layer - 1} of {L} sublayers")
        return self.streams.sum(0)
