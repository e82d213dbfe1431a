"""DenseFormer's depth-weighted averaging (dar/routing/comparison/denseformer.py) against the paper's
equations, its identity initialisation, its parameter count, and the training / CLI paths."""

import pytest
import torch

from dar.cli import main
from dar.models.sit import build_model, count_parameters
from dar.routing import RoutingConfig, build_router
from dar.routing.comparison.denseformer import DenseFormerRouter, depth_weighted_average
from dar.training.checkpoint import latest_checkpoint
from dar.training.config import resolve
from dar.training.trainer import train
from safetensors.torch import load_file
from tolerances import assert_close_scaled

PICO = ["model.arch=SiT-Pico/8", "model.routing.mode=denseformer"]


def model_config(*extra):
    return resolve("fmnist", [*PICO, *extra]).model


def paper_sources(i, dilation):
    """S_i = {j <= i : j = i (mod dilation)} of the paper's dilated DWA."""
    return [j for j in range(i + 1) if j % dilation == i % dilation]


def load_paper_alphas(router, A, dilation, period):
    """Write the paper's matrix A[i-1, j] = alpha_{i,j} into the router, one DWA per block i with p | i."""
    N = A.shape[0]
    averaged = [i for i in range(1, N + 1) if i % period == 0]
    assert len(router.alphas) == len(averaged)
    with torch.no_grad():
        for alpha, i in zip(router.alphas, averaged):
            alpha.copy_(A[i - 1, paper_sources(i, dilation)])


def naive_denseformer(v0, sublayers, A, block_size, dilation, period):
    """The paper, written out: X_0 = v0; block i reads Y_{i-1} and runs its sublayers with residual adds,
    X_i = its output; Y_i = sum_{j in S_i} alpha_{i,j} X_j if period | i else X_i; the head reads Y_N.
    Returns (the input of every sublayer, Y_N)."""
    N = len(sublayers) // block_size
    X, Y, inputs = [v0], v0, []
    for i in range(1, N + 1):
        h = Y
        for f in sublayers[(i - 1) * block_size : i * block_size]:
            inputs.append(h)
            h = h + f(h)
        X.append(h)
        Y = sum(A[i - 1, j] * X[j] for j in paper_sources(i, dilation)) if i % period == 0 else X[i]
    return inputs, Y


def random_sublayers(L, D, generator):
    weights = [torch.randn(D, D, dtype=torch.float64, generator=generator) / D**0.5 for _ in range(L)]
    return [lambda h, W=W: torch.tanh(h @ W) for W in weights], weights


def perturb(model, generator, std=0.1, router=False):
    """Random offsets on every parameter (router ones only when asked), so that adaLN-Zero gates and the
    zero final layer are live and every sublayer contributes."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("router.") and not router:
                continue
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * std)


def sit_inputs(config, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, config.input_size, config.input_size, generator=g)
    t = torch.rand(batch, generator=g)
    y = torch.randint(0, config.num_classes, (batch,), generator=g)
    return x, t, y


# ----------------------------------------------------------------------------------------------------
# 1. The equations, with random weights, in fp64
# ----------------------------------------------------------------------------------------------------

SHAPES = [  # block_size, dilation, period on L = 8 sublayers
    (2, 1, 1),  # one SiT block per DWA, dense
    (1, 1, 1),  # every sublayer a block
    (2, 2, 1),  # dilation
    (2, 1, 3),  # period not dividing N = 4: the last block has no DWA, the head reads X_4
    (1, 3, 2),  # both
    (8, 1, 1),  # one block
]


@pytest.mark.parametrize("block_size,dilation,period", SHAPES)
def test_stream_matches_the_paper_with_random_weights(block_size, dilation, period):
    D, L, B, T = 8, 8, 2, 3
    N = L // block_size
    g = torch.Generator().manual_seed(block_size * 100 + dilation * 10 + period)
    config = RoutingConfig(mode="denseformer", block_size=block_size, dilation=dilation, period=period)
    router = build_router(D, L, config).double()
    assert isinstance(router, DenseFormerRouter)
    A = torch.randn(N, N + 1, dtype=torch.float64, generator=g)
    load_paper_alphas(router, A, dilation, period)
    # the router's own view of the matrix: A inside the S_i of averaged blocks, identity rows elsewhere
    expected = torch.zeros(N, N + 1, dtype=torch.float64)
    for i in range(1, N + 1):
        if i % period:
            expected[i - 1, i] = 1
        else:
            expected[i - 1, paper_sources(i, dilation)] = A[i - 1, paper_sources(i, dilation)]
    torch.testing.assert_close(router.alpha_matrix().double(), expected, rtol=1e-6, atol=1e-7)

    sublayers, _ = random_sublayers(L, D, g)
    v0 = torch.randn(B, T, D, dtype=torch.float64, generator=g, requires_grad=True)
    stream = router.begin(v0)
    inputs = []
    for f in sublayers:
        inputs.append(stream.next_input())
        stream.push(f(inputs[-1]))
    final = stream.final_input()
    assert not stream.outputs  # every block output was released after its last reader

    A_leaf = A.clone().requires_grad_(True)
    v0_ref = v0.detach().clone().requires_grad_(True)
    ref_inputs, ref_final = naive_denseformer(v0_ref, sublayers, A_leaf, block_size, dilation, period)
    assert len(inputs) == len(ref_inputs) == L
    for l, (h, ref) in enumerate(zip(inputs, ref_inputs), start=1):
        torch.testing.assert_close(h, ref, rtol=1e-12, atol=1e-12, msg=f"input of sublayer {l}")
    torch.testing.assert_close(final, ref_final, rtol=1e-12, atol=1e-12)

    # gradients through the DWA node (its hand-written backward) equal the naive graph's
    R = torch.randn(B, T, D, dtype=torch.float64, generator=g)
    (final * R).sum().backward()
    (ref_final * R).sum().backward()
    torch.testing.assert_close(v0.grad, v0_ref.grad, rtol=1e-10, atol=1e-12)
    for alpha, i in zip(router.alphas, [i for i in range(1, N + 1) if i % period == 0]):
        torch.testing.assert_close(alpha.grad, A_leaf.grad[i - 1, paper_sources(i, dilation)], rtol=1e-10, atol=1e-12)


def test_dwa_node_passes_gradcheck():
    g = torch.Generator().manual_seed(3)
    alpha = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    sources = [torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(4)]
    assert torch.autograd.gradcheck(lambda a, *s: depth_weighted_average(a, list(s)), (alpha, *sources))


def test_bf16_sources_accumulate_in_fp32_and_round_once():
    g = torch.Generator().manual_seed(4)
    K = 12
    alpha = torch.randn(K, generator=g)
    sources = [torch.randn(2, 16, 32, generator=g).bfloat16() for _ in range(K)]
    exact = sum(a.double() * x.double() for a, x in zip(alpha, sources))
    magnitude = sum((a.double() * x.double()).abs() for a, x in zip(alpha, sources))
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            h = depth_weighted_average(alpha.requires_grad_(grad), sources)
        assert h.dtype == torch.bfloat16
        # one bf16 rounding of the fp32 sum (unit roundoff 2^-8), plus fp32 accumulation error
        assert ((h.double() - exact).abs() <= 2.0**-8 * exact.abs() + 1e-6 * magnitude).all()


# ----------------------------------------------------------------------------------------------------
# Protocol
# ----------------------------------------------------------------------------------------------------


def test_protocol_errors_backends_and_recorded_weights():
    router = build_router(8, 8, RoutingConfig(mode="denseformer", block_size=2, dilation=2))
    router.set_backend("auto")
    router.set_backend("torch")
    with pytest.raises(ValueError, match="DAR"):
        router.set_backend("triton")
    v0 = torch.randn(2, 3, 8)
    stream = router.begin(v0)
    assert stream.weights is None
    stream.push(torch.randn(2, 3, 8))
    with pytest.raises(RuntimeError, match="after 1 of 8"):
        stream.final_input()
    with torch.no_grad():
        for alpha in router.alphas:
            alpha.normal_()
    stream = router.begin(v0, record_weights=True)
    for _ in range(8):
        stream.push(stream.next_input() * 0.5)
    stream.final_input()
    with pytest.raises(RuntimeError, match="after all 8"):
        stream.push(v0)
    assert router.averaged_blocks == [1, 2, 3, 4]
    assert router.block_sources == [[1], [0, 2], [1, 3], [0, 2, 4]]
    assert len(stream.weights) == 4
    for recorded, alpha in zip(stream.weights, router.alphas):
        assert recorded.dtype == torch.float32 and not recorded.requires_grad
        assert torch.equal(recorded, alpha.detach())


def test_depths_that_would_mean_something_else_are_refused():
    with pytest.raises(ValueError, match="block_size=3 must divide"):
        build_router(8, 8, RoutingConfig(mode="denseformer", block_size=3))
    with pytest.raises(ValueError, match="period=5"):
        build_router(8, 8, RoutingConfig(mode="denseformer", period=5))
    with pytest.raises(ValueError, match="dilation=5"):
        build_router(8, 8, RoutingConfig(mode="denseformer", dilation=5))


# ----------------------------------------------------------------------------------------------------
# 2. Starts as the residual SiT
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [[], ["model.routing.dilation=2", "model.routing.period=3"]])
def test_starts_as_the_residual_sit(extra):
    config = model_config(*extra)
    dense = build_model(config)
    residual = build_model(model_config("model.routing.mode=residual"))
    perturb(dense, torch.Generator().manual_seed(5))
    missing, unexpected = residual.load_state_dict(dense.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith("router.alphas.") for k in unexpected)
    x, t, y = sit_inputs(config)
    reference = residual(x, t, y)
    assert reference.abs().max() > 0.1  # every sublayer is live
    out = dense(x, t, y)  # with autograd: the DWA node
    assert_close_scaled(out, reference, rtol=1e-6)
    with torch.no_grad():  # without: the plain weighted sum
        assert_close_scaled(dense(x, t, y), reference, rtol=1e-6)
        # the comparison sees the router: other weights give another function
        dense.router.alphas[-1][0] = 0.5
        assert (dense(x, t, y) - reference).abs().max() > 1e-2 * reference.abs().max()


# ----------------------------------------------------------------------------------------------------
# 3. Parameter count
# ----------------------------------------------------------------------------------------------------


def dense_count(N):
    """Dense DWA after each of N blocks: sum_{i=1}^{N} (i + 1) = N (N + 3) / 2."""
    return N * (N + 3) // 2


def dilated_count(N, k):
    """Period 1, dilation k: sum_{i=1}^{N} (floor(i/k) + 1) = N + k q (q - 1) / 2 + q (N - q k + 1), q = N // k."""
    q = N // k
    return N + k * q * (q - 1) // 2 + q * (N - q * k + 1)


@pytest.mark.parametrize("extra,expected", [
    ([], dense_count(12)),  # SiT-Pico: 12 blocks
    (["model.routing.block_size=1"], dense_count(24)),
    (["model.routing.block_size=4"], dense_count(6)),
    (["model.routing.dilation=2", "model.routing.period=2"], dense_count(12 // 2)),  # k = p: M (M + 3) / 2, M = N / k
    (["model.routing.dilation=3"], dilated_count(12, 3)),
    (["model.routing.dilation=5"], dilated_count(12, 5)),
])
def test_parameter_count(extra, expected):
    model = build_model(model_config(*extra))
    assert count_parameters(model)["routing"] == expected


def test_parameter_count_sit_xl():
    def count(**options):
        router = build_router(1152, 56, RoutingConfig(mode="denseformer", **options))
        return sum(p.numel() for p in router.parameters())

    assert count() == dense_count(28) == 434
    assert count(block_size=1) == dense_count(56) == 1652
    assert count(dilation=4, period=4) == dense_count(7) == 35
    assert count(dilation=4) == dilated_count(28, 4) == 28 + 4 * 7 * 6 // 2 + 7 * 1


# ----------------------------------------------------------------------------------------------------
# 4. Gradients reach every router parameter
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [[], ["model.routing.dilation=2", "model.routing.period=2"]])
def test_gradients_reach_every_weight(extra):
    config = model_config(*extra)
    model = build_model(config)
    perturb(model, torch.Generator().manual_seed(6), router=True)  # incl. the zero-initialised alpha_{i,j<i}
    x, t, y = sit_inputs(config)
    model(x, t, y).square().mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("router.")]
    assert len(grads) == len(model.router.alphas) > 0
    for grad in grads:
        assert grad is not None and torch.isfinite(grad).all() and (grad != 0).all()


# ----------------------------------------------------------------------------------------------------
# 5. Training, resume, info, sample
# ----------------------------------------------------------------------------------------------------

TRAIN = [*PICO, "train.global_batch=4", "train.sample_every=0", "train.log_every=1", "train.keep_checkpoints=0",
         "train.ckpt_every=0", "train.steps=4"]


def test_training_resumes_exactly_and_the_cli_reads_the_run(tmp_path):
    config = resolve("fmnist", TRAIN)
    train(config, tmp_path / "straight", progress=False)
    train(config, tmp_path / "interrupted", progress=False, stop_after=2)
    assert latest_checkpoint(tmp_path / "interrupted").name == "step_0000002"
    train(config, tmp_path / "interrupted", resume=True, progress=False)
    for which in ("model", "ema"):
        a, b = (load_file(str(latest_checkpoint(tmp_path / run) / f"{which}.safetensors"))
                for run in ("straight", "interrupted"))
        assert a.keys() == b.keys() and any(k.startswith("router.alphas.") for k in a)
        for key in a:
            assert torch.equal(a[key], b[key]), (which, key)
    trained = load_file(str(latest_checkpoint(tmp_path / "straight") / "model.safetensors"))
    assert not torch.equal(trained["router.alphas.11"], torch.eye(13)[12])  # the weights did train
    run_dir = str(tmp_path / "straight")
    assert main(["info", run_dir, "--json"]) == 0
    png = tmp_path / "grid.png"
    assert main(["sample", run_dir, "--num", "4", "--grid", str(png), "sampler.method=euler", "sampler.steps=2"]) == 0
    assert png.stat().st_size > 0


# ----------------------------------------------------------------------------------------------------
# 6. bf16 autocast
# ----------------------------------------------------------------------------------------------------


def test_bf16_autocast_is_close_to_fp32():
    config = model_config()
    model = build_model(config)
    perturb(model, torch.Generator().manual_seed(7), router=True)
    x, t, y = sit_inputs(config)
    reference = model(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    assert out.dtype == torch.bfloat16 or out.dtype == torch.float32
    assert torch.isfinite(out).all()
    error = (out.float() - reference).abs().max() / reference.abs().max()
    assert error < 3e-2, error
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, t, y).float().square().mean().backward()
    for alpha in model.router.alphas:
        assert alpha.grad.dtype == torch.float32 and torch.isfinite(alpha.grad).all()


def test_config_refuses_a_period_or_dilation_beyond_the_blocks():
    from dar.training.config import resolve

    with pytest.raises(ValueError, match="routing.period=7 must be at most the 6 blocks of 2 sublayers"):
        resolve("fmnist", ["model.routing.mode=denseformer", "model.routing.period=7"])
