"""Manifold-Constrained Hyper-Connections (dar.routing.comparison.mhc) against the paper's equations, its
constraints, the residual SiT it starts close to, its parameter count, gradients, training/resume and
bf16 autocast. Helpers shared with Hyper-Connections come from tests/test_router_hyper.py."""

import math

import pytest
import torch

from dar.models.sit import build_model, count_parameters
from dar.routing import RoutingConfig, build_router
from dar.routing.comparison.mhc import (
    INIT_LOGIT,
    SINKHORN_ITERS,
    ManifoldConstrainedHCRouter,
    parameter_count,
    sinkhorn_knopp,
)
from dar.training.config import resolve
from test_router_hyper import forward_recorded, perturbed_residual_and, pico, run_stream, sublayers
from tolerances import assert_close_scaled

EPS = 1e-6  # the RMSNorm epsilon (inside the square root)


def mhc(n=4, dynamic=True):
    return RoutingConfig(mode="mhc", expansion=n, dynamic=dynamic)


def randomize_router(router: ManifoldConstrainedHCRouter, generator=None, scale=1.0) -> None:
    """Non-initial values for every router parameter (the zero-initialised projection included)."""
    with torch.no_grad():
        for name, p in router.named_parameters():
            p.copy_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))
            if name == "projection":  # logits of order one: x~ W sums n*D terms
                p.div_(math.sqrt(p.shape[1] * p.shape[2]))


def naive_sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """exp, then normalise every column, then every row, ``iters`` times, entry by entry in Python floats."""
    n = logits.shape[0]
    M = [[math.exp(logits[i, j].item()) for j in range(n)] for i in range(n)]
    for _ in range(iters):
        for j in range(n):
            column = sum(M[i][j] for i in range(n))
            for i in range(n):
                M[i][j] /= column
        for i in range(n):
            row = sum(M[i])
            M[i] = [m / row for m in M[i]]
    return torch.tensor(M, dtype=torch.float64)


def naive_mhc(router, v0, fns):
    """The paper's equations token by token (n x D stream matrix H): H^0 = (v0 .. v0)^T;
    x~ = vec(H) / rms(vec(H)); H~_pre = a_pre x~ W_pre + b_pre, H~_post = a_post x~ W_post + b_post,
    H~_res = a_res mat(x~ W_res) + b_res; H_pre = sigmoid, H_post = 2 sigmoid, H_res = Sinkhorn-Knopp;
    h = H_pre H; H' = H_res H + H_post^T F(h); final = sum of the rows of H^L.
    Returns (inputs [L x [B, T, D]], final)."""
    n, L = router.expansion, router.num_layers
    Bsz, T, D = v0.shape
    P = {k: p.detach().double() for k, p in router.named_parameters()}
    H = [[torch.stack([v0[b, t]] * n) for t in range(T)] for b in range(Bsz)]  # H[b][t]: [n, D]
    inputs = []
    for k in range(L):
        h_in = torch.zeros(Bsz, T, D, dtype=torch.float64)
        maps = {}
        for b in range(Bsz):
            for t in range(T):
                pre_logit = P["bias_pre"][k][None, :]  # 1 x n
                post_logit = P["bias_post"][k][None, :]  # 1 x n
                res_logit = P["bias_res"][k]  # n x n
                if router.dynamic:
                    x = H[b][t].reshape(1, n * D)  # vec(H), stream by stream
                    x_tilde = x / torch.sqrt((x**2).mean() + EPS)
                    W = P["projection"][k].reshape(n * D, n * (n + 2))
                    W_pre, W_post, W_res = W[:, :n], W[:, n : 2 * n], W[:, 2 * n :]
                    pre_logit = P["gate_pre"][k] * (x_tilde @ W_pre) + pre_logit
                    post_logit = P["gate_post"][k] * (x_tilde @ W_post) + post_logit
                    res_logit = P["gate_res"][k] * (x_tilde @ W_res).reshape(n, n) + res_logit
                H_pre = torch.sigmoid(pre_logit)
                H_post = 2 * torch.sigmoid(post_logit)
                H_res = naive_sinkhorn(res_logit, SINKHORN_ITERS)
                h_in[b, t] = (H_pre @ H[b][t])[0]
                maps[b, t] = H_post, H_res
        inputs.append(h_in)
        out = fns[k](h_in)
        for b in range(Bsz):
            for t in range(T):
                H_post, H_res = maps[b, t]
                H[b][t] = H_res @ H[b][t] + H_post.T @ out[b, t][None, :]
    final = torch.stack([torch.stack([H[b][t].sum(0) for t in range(T)]) for b in range(Bsz)])
    return inputs, final


# 1. the paper's equations, random parameters, fp64


@pytest.mark.parametrize("n,dynamic", [(4, True), (4, False), (3, True), (1, True)])
def test_matches_the_papers_equations(n, dynamic):
    g = torch.Generator().manual_seed(1)
    D, L, B, T = 8, 8, 2, 3
    router = ManifoldConstrainedHCRouter(D, L, mhc(n, dynamic)).double()
    randomize_router(router, g)
    v0 = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    fns = sublayers(L, D, g)
    got_inputs, got_final, _ = run_stream(router, v0, fns)
    want_inputs, want_final = naive_mhc(router, v0, fns)
    for l, (got, want) in enumerate(zip(got_inputs, want_inputs), start=1):
        assert got.dtype == torch.float64
        assert_close_scaled(got, want, 1e-12), l
    assert_close_scaled(got_final, want_final, 1e-12)
    # the comparison is not vacuous: the streams differ
    assert n == 1 or not torch.allclose(got_inputs[-1], got_final / n)


def test_connection_weights_are_constrained():
    """H_pre in (0, 1), H_post in (0, 2), H_res non-negative with rows summing to 1 (the last
    normalisation) and columns to 1 after the 20 iterations (logits of order 0.5 here; at order 4 the
    columns are still off by a few percent, docs/METHOD.md §11)."""
    g = torch.Generator().manual_seed(4)
    n, L, D, B, T = 4, 6, 8, 2, 3
    router = ManifoldConstrainedHCRouter(D, L, mhc(n)).double()
    randomize_router(router, g, scale=0.5)
    v0 = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    _, _, stream = run_stream(router, v0, sublayers(L, D, g), record_weights=True)
    for hc in stream.weights:
        hc = hc.double()  # [B, T, n+1, n+1]: [[0, H_post], [H_pre^T, H_res^T]]
        h_post, h_pre, h_res_t = hc[..., 0, 1:], hc[..., 1:, 0], hc[..., 1:, 1:]
        assert torch.all(hc[..., 0, 0] == 0)
        assert torch.all((h_pre > 0) & (h_pre < 1)) and torch.all((h_post > 0) & (h_post < 2))
        assert torch.all(h_res_t >= 0)
        # recorded in fp32: sums to fp32 rounding
        torch.testing.assert_close(h_res_t.sum(-2), torch.ones(B, T, n, dtype=torch.float64), rtol=0, atol=1e-6)
        torch.testing.assert_close(h_res_t.sum(-1), torch.ones(B, T, n, dtype=torch.float64), rtol=0, atol=1e-6)
        assert not torch.allclose(h_res_t, h_res_t[:1, :1])  # per token: the dynamic terms are live


def test_sinkhorn_rows_are_exact_and_columns_converge():
    g = torch.Generator().manual_seed(5)
    logits = 0.5 * torch.randn(100, 4, 4, generator=g, dtype=torch.float64)
    m = sinkhorn_knopp(logits)
    assert (m.sum(-1) - 1).abs().max() < 1e-14
    assert (m.sum(-2) - 1).abs().max() < 1e-9
    assert torch.all(m > 0)
    for i in range(3):
        torch.testing.assert_close(m[i], naive_sinkhorn(logits[i], SINKHORN_ITERS), rtol=0, atol=1e-14)


def test_initialisation():
    """b_post = 0 (H_post = 1 exactly), b_res = m I, b_pre = m at stream k mod n and -m elsewhere,
    W = 0, gates 0.01; H_res = exp(m I) normalised, doubly stochastic after one step."""
    n, L, D = 3, 7, 5
    m = INIT_LOGIT
    router = ManifoldConstrainedHCRouter(D, L, mhc(n))
    randomize_router(router)
    router.reset_parameters()
    for k in range(L):
        want = torch.full((n,), -m)
        want[k % n] = m
        assert torch.equal(router.bias_pre[k], want)
        assert torch.equal(router.bias_res[k], m * torch.eye(n))
    assert torch.equal(router.bias_post, torch.zeros(L, n))
    assert torch.equal(router.projection, torch.zeros(L, n, D, n * (n + 2)))
    for gate in (router.gate_pre, router.gate_post, router.gate_res):
        assert torch.equal(gate, torch.full((L,), 0.01))
    v0 = torch.randn(2, 3, D)
    _, _, stream = run_stream(router, v0, [torch.sin] * L, record_weights=True)
    diagonal = math.exp(m) / (math.exp(m) + n - 1)
    want_res = torch.full((n, n), 1 / (math.exp(m) + n - 1))
    want_res.fill_diagonal_(diagonal)
    for k, hc in enumerate(stream.weights):
        assert hc.shape == (2, 3, n + 1, n + 1) and hc.dtype == torch.float32 and not hc.requires_grad
        assert torch.equal(hc[..., 0, 1:], torch.ones(2, 3, n))  # H_post = 2 sigmoid(0) = 1 exactly
        want_pre = torch.full((n,), torch.sigmoid(torch.tensor(-m)).item())
        want_pre[k % n] = torch.sigmoid(torch.tensor(m)).item()
        torch.testing.assert_close(hc[..., 1:, 0], want_pre.expand(2, 3, n), rtol=1e-6, atol=0)
        torch.testing.assert_close(hc[..., 1:, 1:], want_res.expand(2, 3, n, n), rtol=1e-6, atol=0)


def test_matches_the_reference_implementation_static():
    """``hyper-connections`` (PyPI), ``ManifoldConstrainedHyperConnections`` with the same biases and
    zero dynamic projections. Only static mHC can be compared: the reference computes its dynamic
    coefficients per stream (HC's form) where the paper flattens the n streams. It also normalises the
    other side last and runs in fp32; with these logits Sinkhorn has converged either way."""
    hc = pytest.importorskip("hyper_connections")
    g = torch.Generator().manual_seed(2)
    n, D, L, B, T = 4, 8, 6, 2, 3
    router = ManifoldConstrainedHCRouter(D, L, mhc(n, dynamic=False)).double()
    randomize_router(router, g, scale=0.5)
    refs = []
    for k in range(L):
        ref = hc.ManifoldConstrainedHyperConnections(n, dim=D, layer_index=k).double()
        with torch.no_grad():
            ref.static_alpha[:, 0].copy_(router.bias_pre[k])
            ref.static_alpha[:, 1:].copy_(router.bias_res[k].T)  # ref: [from stream, to stream]
            ref.static_beta.copy_(router.bias_post[k])
            ref.dynamic_alpha_fn.zero_()
            ref.dynamic_beta_fn.zero_()
        refs.append(ref)
    v0 = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    fns = sublayers(L, D, g)
    got_inputs, got_final, _ = run_stream(router, v0, fns)
    expand, reduce = hc.mc_get_expand_reduce_stream_functions(n)
    residuals = expand(v0)  # [(B n), T, D]
    for ref, fn, got in zip(refs, fns, got_inputs):
        branch_input, add_residual = ref(residuals)
        assert_close_scaled(got, branch_input, 1e-5)
        residuals = add_residual(fn(branch_input))
    assert_close_scaled(got_final, reduce(residuals), 1e-5)


# 2. starts close to the residual SiT


@pytest.mark.parametrize("extra", [(), ("model.routing.dynamic=false",), ("model.routing.expansion=3",),
                                   ("model.routing.expansion=1",)])
def test_starts_as_the_residual_sit(extra):
    """In fp64, on a perturbed SiT-Pico/8: every sublayer input is s = sum_i H_pre_i times the residual
    stream's (the streams stay identical copies of it), up to the LayerNorm epsilon that s leaves in
    every sublayer (measured 4.5e-9 relative, n = 4); the final input is n times it (4.7e-9); the output
    is within 3.7e-7 of the residual model's, the same as Hyper-Connections' (the final LayerNorm's
    epsilon on n h), and within 5e-9 of Hyper-Connections' (whose sublayer inputs are the residual's
    bit for bit)."""
    residual, model = perturbed_residual_and("mhc", *extra)
    hyper = build_model(pico("hyper", *extra))
    hyper.load_state_dict(residual.state_dict(), strict=False)
    for m in (residual, model, hyper):
        m.double()
    n = model.router.expansion
    s = math.fsum([1 / (1 + math.exp(-INIT_LOGIT))] + [1 / (1 + math.exp(INIT_LOGIT))] * (n - 1))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 32, 32, generator=g, dtype=torch.float64)
    t, y = torch.rand(3, generator=g, dtype=torch.float64), torch.tensor([0, 4, 10])
    with torch.no_grad():
        want, want_inputs = forward_recorded(residual, x, t, y)
        got, got_inputs = forward_recorded(model, x, t, y)
        hyper_out, _ = forward_recorded(hyper, x, t, y)
    assert len(got_inputs) == len(want_inputs) == 25

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert max(rel(g, s * w) for g, w in zip(got_inputs[:-1], want_inputs[:-1])) < 2e-8
    assert rel(got_inputs[-1], n * want_inputs[-1]) < 2e-8
    assert want.abs().max() > 0.1  # the perturbed model computes something
    assert rel(got, want) < 1e-6
    assert rel(got, hyper_out) < 2e-8


# 3. parameter count


@pytest.mark.parametrize("extra", [(), ("model.routing.dynamic=false",), ("model.routing.expansion=2",)])
def test_parameter_count(extra):
    config = pico("mhc", *extra)
    depth, D, _ = config.dims
    L, n, dynamic = 2 * depth, config.routing.expansion, config.routing.dynamic
    # per layer: b_pre (n) + b_post (n) + b_res (n^2); dynamic: W (nD x (2n + n^2)) + a_pre, a_post, a_res
    want = L * (n + n + n * n + (n * D * (2 * n + n * n) + 3 if dynamic else 0))
    assert count_parameters(build_model(config))["routing"] == want == parameter_count(D, L, n, dynamic)


def test_sit_xl2_parameter_count():
    """SiT-XL/2: L = 56 sublayers, D = 1152, n = 4 (the router alone: building SiT-XL is slow)."""
    for dynamic, want in ((True, 6_194_664), (False, 1_344)):
        router = build_router(1152, 56, mhc(4, dynamic))
        assert sum(p.numel() for p in router.parameters()) == want


# 4. protocol and config


def test_stream_protocol_and_config_errors():
    router = ManifoldConstrainedHCRouter(8, 2, mhc())
    stream = router.begin(torch.randn(1, 2, 8))
    h = stream.next_input()
    assert stream.next_input() is h
    stream.push(torch.randn(1, 2, 8))
    with pytest.raises(RuntimeError, match="after 1 of 2"):
        stream.final_input()
    stream.push(torch.randn(1, 2, 8))
    assert stream.final_input().shape == (1, 2, 8)
    with pytest.raises(RuntimeError):
        stream.push(torch.randn(1, 2, 8))
    router.set_backend("torch")
    for backend in ("triton", "recompute"):
        with pytest.raises(ValueError, match="DAR's"):
            router.set_backend(backend)
    assert router.begin(torch.randn(1, 2, 8)).weights is None
    assert RoutingConfig(mode="mhc").describe == "mhc-n4-dynamic"
    assert RoutingConfig(mode="mhc", expansion=2, dynamic=False).describe == "mhc-n2-static"
    with pytest.raises(ValueError, match="expansion must be a positive integer"):
        resolve("fmnist", ["model.routing.mode=mhc", "model.routing.expansion=0"])
    # the Sinkhorn iterations are the paper's 20, not an option
    with pytest.raises(ValueError, match="unknown config key model.routing.sinkhorn_iters"):
        resolve("fmnist", ["model.routing.mode=mhc", "model.routing.sinkhorn_iters=5"])


# 5. gradients, training and exact resume, bf16: shared with `hyper` in tests/test_router_hyper.py
