"""Hyper-Connections (dar.routing.comparison.hyper_connections) against the paper's equations, the
residual SiT it starts as, its parameter count, gradients, training/resume and bf16 autocast."""

import math

import pytest
import torch

from dar.cli import main
from dar.models.sit import build_model, count_parameters
from dar.routing import RoutingConfig, build_router
from dar.routing.comparison.hyper_connections import HyperConnectionsRouter, parameter_count
from dar.training.checkpoint import latest_checkpoint
from dar.training.config import resolve
from dar.training.trainer import train
from safetensors.torch import load_file
from tolerances import assert_close_scaled

EPS = 1e-6  # the RMSNorm epsilon (inside the square root)


def hyper(n=4, dynamic=True):
    return RoutingConfig(mode="hyper", expansion=n, dynamic=dynamic)


def randomize_router(router: HyperConnectionsRouter, generator=None) -> None:
    """Non-initial values for every router parameter (zero-init ones included)."""
    with torch.no_grad():
        for name, p in router.named_parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype))
            if name in ("alpha_scale", "beta_scale"):
                p.mul_(0.5)


def sublayers(L, D, generator):
    """L fixed random sublayers v = tanh(h M_l) + c_l, so every input matters downstream."""
    Ms = [torch.randn(D, D, generator=generator, dtype=torch.float64) / math.sqrt(D) for _ in range(L)]
    cs = [0.1 * torch.randn(D, generator=generator, dtype=torch.float64) for _ in range(L)]
    return [lambda h, M=M, c=c: torch.tanh(h @ M) + c for M, c in zip(Ms, cs)]


def naive_hc(router, v0, fns):
    """The paper's equations token by token, written as matrices (n x D hyper hidden matrix H):
    H^0 = (v0 .. v0)^T; Hbar = RMSNorm(H) row by row; B(H) = s_b tanh(Hbar W_b)^T + B;
    A_m(H) = s_a tanh(Hbar W_m) + A_m; A_r(H) = s_a tanh(Hbar W_r) + A_r; h = A_m^T H;
    H' = B^T T(h) + A_r^T H; final = sum of the rows of H^L. Returns (inputs [L x [B, T, D]], final)."""
    n, L = router.expansion, router.num_layers
    Bsz, T, D = v0.shape
    P = {k: p.detach().double() for k, p in router.named_parameters()}
    H = [[torch.stack([v0[b, t]] * n) for t in range(T)] for b in range(Bsz)]  # H[b][t]: [n, D]
    inputs = []
    for k in range(L):
        h_in = torch.zeros(Bsz, T, D, dtype=torch.float64)
        Bmats, Armats = {}, {}
        for b in range(Bsz):
            for t in range(T):
                Hk = H[b][t]
                A_m = P["static_alpha"][k][:, :1]  # n x 1
                A_r = P["static_alpha"][k][:, 1:]  # n x n
                Bm = P["static_beta"][k][None, :]  # 1 x n
                if router.dynamic:
                    rms = torch.sqrt((Hk**2).mean(-1, keepdim=True) + EPS)
                    Hbar = P["norm_gain"][k] * Hk / rms  # n x D
                    W_m = P["dynamic_alpha"][k][:, :1]  # D x 1
                    W_r = P["dynamic_alpha"][k][:, 1:]  # D x n
                    W_b = P["dynamic_beta"][k][:, None]  # D x 1
                    s_a, s_b = P["alpha_scale"][k], P["beta_scale"][k]
                    Bm = s_b * torch.tanh(Hbar @ W_b).T + Bm
                    A_m = s_a * torch.tanh(Hbar @ W_m) + A_m
                    A_r = s_a * torch.tanh(Hbar @ W_r) + A_r
                h_in[b, t] = (A_m.T @ Hk)[0]
                Bmats[b, t], Armats[b, t] = Bm, A_r
        inputs.append(h_in)
        out = fns[k](h_in)
        for b in range(Bsz):
            for t in range(T):
                H[b][t] = Bmats[b, t].T @ out[b, t][None, :] + Armats[b, t].T @ H[b][t]
    final = torch.stack([torch.stack([H[b][t].sum(0) for t in range(T)]) for b in range(Bsz)])
    return inputs, final


def run_stream(router, v0, fns, record_weights=False):
    stream = router.begin(v0, record_weights=record_weights)
    inputs = []
    for fn in fns:
        h = stream.next_input()
        inputs.append(h)
        stream.push(fn(h))
    return inputs, stream.final_input(), stream


# 1. the paper's equations, random parameters, fp64


@pytest.mark.parametrize("n,dynamic", [(4, True), (4, False), (3, True), (1, True)])
def test_matches_the_papers_equations(n, dynamic):
    g = torch.Generator().manual_seed(1)
    D, L, B, T = 8, 8, 2, 3
    router = HyperConnectionsRouter(D, L, hyper(n, dynamic)).double()
    randomize_router(router, g)
    v0 = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    fns = sublayers(L, D, g)
    got_inputs, got_final, _ = run_stream(router, v0, fns)
    want_inputs, want_final = naive_hc(router, v0, fns)
    for l, (got, want) in enumerate(zip(got_inputs, want_inputs), start=1):
        assert got.dtype == torch.float64
        assert_close_scaled(got, want, 1e-12), l
    assert_close_scaled(got_final, want_final, 1e-12)
    # the comparison is not vacuous: the streams differ and the dynamic terms move the weights
    assert not torch.allclose(got_inputs[-1], got_final / n)


def test_initialisation_is_the_papers():
    """HC^k = [[0, 1], [e_{k mod n}, I]] with k the 0-based layer index; W = 0, s = 0.01, g = 1."""
    n, L, D = 3, 7, 5
    router = HyperConnectionsRouter(D, L, hyper(n))
    randomize_router(router)
    router.reset_parameters()
    for k in range(L):
        A_m = torch.zeros(n)
        A_m[k % n] = 1
        assert torch.equal(router.static_alpha[k, :, 0], A_m)
        assert torch.equal(router.static_alpha[k, :, 1:], torch.eye(n))
    assert torch.equal(router.static_beta, torch.ones(L, n))
    assert torch.equal(router.dynamic_alpha, torch.zeros(L, D, n + 1))
    assert torch.equal(router.dynamic_beta, torch.zeros(L, D))
    assert torch.equal(router.norm_gain, torch.ones(L, D))
    assert torch.equal(router.alpha_scale, torch.full((L,), 0.01))
    assert torch.equal(router.beta_scale, torch.full((L,), 0.01))
    # the recorded connection matrices are the paper's at initialisation
    v0 = torch.randn(2, 3, D)
    fns = [lambda h: torch.sin(h)] * L
    _, _, stream = run_stream(router, v0, fns, record_weights=True)
    assert len(stream.weights) == L
    for k, hc in enumerate(stream.weights):
        want = torch.zeros(n + 1, n + 1)
        want[0, 1:] = 1
        want[1 + k % n, 0] = 1
        want[1:, 1:] = torch.eye(n)
        assert hc.shape == (2, 3, n + 1, n + 1) and hc.dtype == torch.float32 and not hc.requires_grad
        assert torch.equal(hc, want.expand_as(hc))


def test_recorded_weights_are_the_connection_matrices():
    g = torch.Generator().manual_seed(3)
    n, L, D = 4, 4, 8
    router = HyperConnectionsRouter(D, L, hyper(n)).double()
    randomize_router(router, g)
    v0 = torch.randn(2, 3, D, generator=g, dtype=torch.float64)
    stream = router.begin(v0, record_weights=True)
    H = v0.unsqueeze(0).expand(n, *v0.shape)
    for fn in sublayers(L, D, g):
        h = stream.next_input()
        hc = stream.weights[-1].double()  # [B, T, n+1, n+1]: rows from (output, streams), columns to (input, streams)
        assert torch.all(hc[..., 0, 0] == 0)
        assert_close_scaled(h, torch.einsum("bti,ibtd->btd", hc[..., 1:, 0], H), 1e-6)
        v = fn(h)
        stream.push(v)
        want = torch.einsum("bti,btd->ibtd", hc[..., 0, 1:], v) + torch.einsum("btij,ibtd->jbtd", hc[..., 1:, 1:], H)
        assert_close_scaled(stream.streams, want, 1e-6)
        H = stream.streams


def test_matches_the_reference_implementation():
    """lucidrains/hyper-connections (PyPI ``hyper-connections``), when installed, with the same weights.
    Its RMSNorm is x / ||x|| * sqrt(D) (no epsilon), ours x / sqrt(mean(x^2) + 1e-6): values of order
    one make that a ~1e-6 relative difference in the dynamic logits."""
    hc = pytest.importorskip("hyper_connections")
    g = torch.Generator().manual_seed(2)
    n, D, L, B, T = 4, 8, 6, 2, 3
    router = HyperConnectionsRouter(D, L, hyper(n)).double()
    randomize_router(router, g)
    refs = []
    for k in range(L):
        ref = hc.HyperConnections(n, dim=D, layer_index=k).double()
        with torch.no_grad():
            ref.static_alpha.copy_(router.static_alpha[k])
            ref.static_beta.copy_(router.static_beta[k])
            ref.dynamic_alpha_fn.copy_(router.dynamic_alpha[k])
            ref.dynamic_beta_fn.copy_(router.dynamic_beta[k])
            ref.dynamic_alpha_scale.copy_(router.alpha_scale[k])
            ref.dynamic_beta_scale.copy_(router.beta_scale[k])
            ref.norm.gamma.copy_(router.norm_gain[k] - 1)
        refs.append(ref)
    v0 = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    fns = sublayers(L, D, g)
    got_inputs, got_final, _ = run_stream(router, v0, fns)
    expand, reduce = hc.get_expand_reduce_stream_functions(n)
    residuals = expand(v0)  # [(B n), T, D]
    for ref, fn, got in zip(refs, fns, got_inputs):
        branch_input, add_residual = ref(residuals)
        assert_close_scaled(got, branch_input, 1e-5)
        residuals = add_residual(fn(branch_input))
    assert_close_scaled(got_final, reduce(residuals), 1e-5)


# 2. starts as the residual SiT


def pico(mode, *extra):
    return resolve("fmnist", ["model.arch=SiT-Pico/8", f"model.routing.mode={mode}", *extra]).model


def perturbed_residual_and(mode, *extra):
    """A residual SiT-Pico/8 with every weight perturbed (adaLN-Zero would make every sublayer output
    zero) and the model of ``mode`` holding the same shared weights, its router at initialisation."""
    torch.manual_seed(0)
    residual = build_model(pico("residual"))
    with torch.no_grad():
        for p in residual.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    other = build_model(pico(mode, *extra))
    missing, unexpected = other.load_state_dict(residual.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("router.") for k in missing)
    return residual, other


class Recorder:
    """An ``inspect`` wrapper that keeps every sublayer input and the final input."""

    def __init__(self, stream):
        self.stream, self.inputs = stream, []

    def next_input(self):
        h = self.stream.next_input()
        self.inputs.append(h.detach().clone())
        return h

    def push(self, v):
        self.stream.push(v)

    def final_input(self):
        h = self.stream.final_input()
        self.inputs.append(h.detach().clone())
        return h


def forward_recorded(model, x, t, y):
    recorders = []

    def inspect(stream):
        recorders.append(Recorder(stream))
        return recorders[-1]

    out = model(x, t, y, inspect=inspect)
    return out, recorders[0].inputs


@pytest.mark.parametrize("extra", [(), ("model.routing.dynamic=false",), ("model.routing.expansion=3",)])
def test_starts_as_the_residual_sit(extra):
    """Every sublayer input is bit for bit the residual stream's; the final input is n times it, which
    SiT's final LayerNorm removes up to its epsilon (LN(n h) uses eps / n^2): outputs equal to 1e-5."""
    residual, model = perturbed_residual_and("hyper", *extra)
    n = model.router.expansion
    x, t, y = torch.randn(3, 1, 32, 32), torch.rand(3), torch.tensor([0, 4, 10])
    with torch.no_grad():
        want, want_inputs = forward_recorded(residual, x, t, y)
        got, got_inputs = forward_recorded(model, x, t, y)
    assert len(got_inputs) == len(want_inputs) == 25
    for l, (g, w) in enumerate(zip(got_inputs[:-1], want_inputs[:-1]), start=1):
        assert torch.equal(g, w), f"sublayer {l}"
    assert_close_scaled(got_inputs[-1], n * want_inputs[-1], 1e-6)
    assert want.abs().max() > 0.1  # the perturbed model computes something
    assert_close_scaled(got, want, 1e-5)


def test_one_stream_is_the_residual_sit_bit_for_bit():
    """n = 1: H' = 1 * v + 1 * H and the final sum is the single stream: exactly h <- h + v."""
    residual, model = perturbed_residual_and("hyper", "model.routing.expansion=1")
    x, t, y = torch.randn(2, 1, 32, 32), torch.rand(2), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(model(x, t, y), residual(x, t, y))


# 3. parameter count


@pytest.mark.parametrize("extra", [(), ("model.routing.dynamic=false",), ("model.routing.expansion=2",)])
def test_parameter_count(extra):
    config = pico("hyper", *extra)
    depth, D, _ = config.dims
    L, n, dynamic = 2 * depth, config.routing.expansion, config.routing.dynamic
    # per layer: A_m (n) + A_r (n^2) + B (n); dynamic: W_alpha D(n+1) + W_beta D + norm gain D + s_alpha, s_beta
    want = L * (n + n * n + n + (D * (n + 1) + D + D + 2 if dynamic else 0))
    assert count_parameters(build_model(config))["routing"] == want == parameter_count(D, L, n, dynamic)


def test_sit_xl2_parameter_count():
    """SiT-XL/2: L = 56 sublayers, D = 1152, n = 4 (the router alone: building SiT-XL is slow)."""
    for dynamic, want in ((True, 453_040), (False, 1_344)):
        router = build_router(1152, 56, hyper(4, dynamic))
        assert sum(p.numel() for p in router.parameters()) == want


# 4. gradients


@pytest.mark.parametrize("mode,dynamic,tensors", [("hyper", True, 7), ("hyper", False, 2), ("mhc", True, 7),
                                                  ("mhc", False, 3)])
def test_gradients_reach_every_router_parameter(mode, dynamic, tensors):
    """Both members of the family (mhc computes Hyper-Connections' weights under constraints)."""
    _, model = perturbed_residual_and(mode, f"model.routing.dynamic={str(dynamic).lower()}")
    with torch.no_grad():  # the zero-initialised projections too (else the gain and scales get no gradient)
        for name, p in model.router.named_parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, t, y = torch.randn(2, 1, 32, 32), torch.rand(2), torch.tensor([1, 2])
    model(x, t, y).square().mean().backward()
    names = [name for name, _ in model.router.named_parameters()]
    assert len(names) == tensors
    for name, p in model.router.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        # every layer's slice gets a gradient
        per_layer = p.grad.reshape(p.shape[0], -1).abs().amax(1)
        assert (per_layer > 0).all(), name


# protocol


def test_stream_protocol_errors():
    router = HyperConnectionsRouter(8, 2, hyper())
    stream = router.begin(torch.randn(1, 2, 8))
    h = stream.next_input()
    assert stream.next_input() is h  # the same layer's input, not recomputed
    stream.push(torch.randn(1, 2, 8))
    with pytest.raises(RuntimeError, match="after 1 of 2"):
        stream.final_input()
    stream.push(torch.randn(1, 2, 8))
    assert stream.final_input().shape == (1, 2, 8)
    with pytest.raises(RuntimeError):
        stream.push(torch.randn(1, 2, 8))
    router.set_backend("auto")
    router.set_backend("torch")
    for backend in ("triton", "recompute"):
        with pytest.raises(ValueError, match="DAR's"):
            router.set_backend(backend)
    assert router.begin(torch.randn(1, 2, 8)).weights is None
    assert RoutingConfig(mode="hyper", dynamic=False).describe == "hyper-n4-static"


# 5. training, resume, info, sample

TRAIN = ["model.arch=SiT-Pico/8", "train.global_batch=4", "train.sample_every=0", "train.log_every=1",
         "train.keep_checkpoints=0", "train.ckpt_every=0", "train.steps=4"]


@pytest.mark.parametrize("mode", ["hyper", "mhc"])
def test_training_resumes_exactly_and_the_cli_reads_it(mode, tmp_path, capsys):
    config = resolve("fmnist", [*TRAIN, f"model.routing.mode={mode}"])
    train(config, tmp_path / "straight", progress=False)
    train(config, tmp_path / "resumed", progress=False, stop_after=2)
    assert latest_checkpoint(tmp_path / "resumed").name == "step_0000002"
    train(config, tmp_path / "resumed", resume=True, progress=False)
    for which in ("model", "ema"):
        a = load_file(str(latest_checkpoint(tmp_path / "straight") / f"{which}.safetensors"))
        b = load_file(str(latest_checkpoint(tmp_path / "resumed") / f"{which}.safetensors"))
        assert a.keys() == b.keys()
        assert any(k.startswith("router.") for k in a)
        for k in a:
            assert torch.equal(a[k], b[k]), k
    # training moved the router off its initialisation
    init = build_model(config.model).router.state_dict()
    assert any(not torch.equal(a[f"router.{k}"], v) for k, v in init.items())
    run_dir = str(tmp_path / "straight")
    capsys.readouterr()
    assert main(["info", run_dir]) == 0
    assert config.model.routing.describe in capsys.readouterr().out
    png = str(tmp_path / "grid.png")
    assert main(["sample", run_dir, "--num", "4", "--grid", png, "sampler.method=euler", "sampler.steps=2"]) == 0
    assert (tmp_path / "grid.png").stat().st_size > 0


# 6. bf16 autocast


@pytest.mark.parametrize("mode", ["hyper", "mhc"])
def test_bf16_autocast_is_close_to_fp32(mode):
    _, model = perturbed_residual_and(mode)
    with torch.no_grad():  # off the initialisation, every parameter, keeping the streams O(1) over 24 layers
        for p in model.router.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, t, y = torch.randn(2, 1, 32, 32), torch.rand(2), torch.tensor([1, 2])
    with torch.no_grad():
        want, _ = forward_recorded(model, x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, inputs = forward_recorded(model, x, t, y)
    assert all(h.dtype == torch.float32 for h in inputs)  # the streams stay fp32, as SiT's residual stream
    assert torch.isfinite(got).all()
    rel = (got.float() - want).norm() / want.norm()
    assert rel < 2e-2, rel
