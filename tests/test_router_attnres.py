"""Block Attention Residuals (routing.mode=attnres) against the paper's equations (Kimi Team 2026, §3.2 and
its Figure 2 pseudo-code), written plainly here, and in SiT: start, size, gradients, training, bf16."""

import json

import pytest
import torch
from safetensors.torch import load_file

from dar.cli import main
from dar.models.sit import build_model, count_parameters
from dar.routing import ResidualStream, RoutingConfig, build_router
from dar.routing.comparison.attnres import BlockAttnResRouter
from dar.training.checkpoint import latest_checkpoint
from dar.training.config import resolve
from dar.training.trainer import train
from tolerances import assert_close_scaled

D, L, B, T = 8, 8, 2, 3
EPS = 1e-6  # the key RMSNorm's epsilon


def router(block_size, num_layers=L, dim=D):
    return build_router(dim, num_layers, RoutingConfig(mode="attnres", block_size=block_size)).double()


def randomize_router(r, scale=1.0):
    """Non-initial parameters: random pseudo-queries and key gains away from one."""
    with torch.no_grad():
        for agg in r.aggregators:
            agg.query.copy_(torch.randn_like(agg.query) * scale)
            agg.key_gain.copy_(1 + 0.5 * torch.randn_like(agg.key_gain))
    return r


def sublayers(num_layers=L, dim=D):
    """Random sublayer functions f_l(h) (their outputs depend on their inputs, so a wrong input shows)."""
    weights = [torch.randn(dim, dim, dtype=torch.float64) / dim**0.5 for _ in range(num_layers)]
    return [lambda h, W=W: torch.tanh(h @ W) * 2 for W in weights]


def drive(stream, fs):
    """The stream protocol as SiT drives it: every sublayer input, then the final input."""
    inputs = []
    for f in fs:
        h = stream.next_input()
        inputs.append(h)
        stream.push(f(h))
    return inputs, stream.final_input()


# --- the paper, transcribed ------------------------------------------------------------------------

def paper_phi(w, g, V):
    """alpha = softmax_n( w . RMSNorm(V_n) ), h = sum_n alpha_n V_n  (Eq. 2-4; RMSNorm with gain g)."""
    V = torch.stack(V)  # [N, B, T, D]
    K = g * V / torch.sqrt(V.pow(2).mean(-1, keepdim=True) + EPS)
    alpha = torch.softmax(torch.einsum("d,nbtd->nbt", w, K), dim=0)
    return torch.einsum("nbt,nbtd->btd", alpha, V)


def paper_equations(r, v0, fs):
    """§3.2: b_0 = h_1; b_n = sum of block n's outputs; b_n^i = the sum of its first i; the i-th layer of
    block n reads [b_0 .. b_{n-1}] (i = 1) or [b_0 .. b_{n-1}, b_n^{i-1}] (i >= 2); the output layer reads
    [b_0 .. b_N]. Every block sum is recomputed from the list of layer outputs."""
    S = r.config.block_size
    outputs, inputs = [], []

    def block(n, count=S):  # sum of the first `count` outputs of block n (1-based)
        return sum(outputs[(n - 1) * S + j] for j in range(count))

    def w_g(layer):
        agg = r.aggregator(layer)
        return agg.query, agg.key_gain

    for layer in range(1, L + 1):
        n, i = (layer - 1) // S + 1, (layer - 1) % S + 1
        V = [v0] + [block(m) for m in range(1, n)] + ([block(n, i - 1)] if i >= 2 else [])
        h = V[0] if len(V) == 1 else paper_phi(*w_g(layer), V)
        inputs.append(h)
        outputs.append(fs[layer - 1](h))
    final = paper_phi(*w_g(L + 1), [v0] + [block(m) for m in range(1, L // S + 1)])
    return inputs, final


def paper_figure2(r, v0, fs, first_query):
    """Figure 2's pseudo-code, one transformer layer (attention + MLP sublayer) at a time; the final
    output aggregates blocks + the last partial sum with its own query and norm."""
    S = r.config.block_size

    def block_attn_res(blocks, partial_block, layer):
        agg = r.aggregator(layer) if layer > 1 else None  # layer 1's query cannot matter: one source
        w, g = (agg.query, agg.key_gain) if agg else (first_query, torch.ones_like(first_query))
        return paper_phi(w, g, blocks + [partial_block])

    blocks, hidden_states, inputs = [], v0, []
    for layer_number in range(L // 2):
        attn, mlp = fs[2 * layer_number], fs[2 * layer_number + 1]
        partial_block = hidden_states
        h = block_attn_res(blocks, partial_block, 2 * layer_number + 1)
        inputs.append(h)
        if layer_number % (S // 2) == 0:
            blocks.append(partial_block)
            partial_block = None
        attn_out = attn(h)
        partial_block = partial_block + attn_out if partial_block is not None else attn_out
        h = block_attn_res(blocks, partial_block, 2 * layer_number + 2)
        inputs.append(h)
        hidden_states = partial_block + mlp(h)
    return inputs, block_attn_res(blocks, hidden_states, L + 1)


@pytest.mark.parametrize("block_size", [1, 2, 4, 8])
def test_stream_equals_the_paper_equations_with_random_parameters(block_size):
    r = randomize_router(router(block_size))
    fs, v0 = sublayers(), torch.randn(B, T, D, dtype=torch.float64)
    inputs, final = drive(r.begin(v0), fs)
    ref_inputs, ref_final = paper_equations(r, v0, fs)
    for h, ref in zip(inputs, ref_inputs):
        assert_close_scaled(h, ref, rtol=1e-12)
    assert_close_scaled(final, ref_final, rtol=1e-12)


@pytest.mark.parametrize("block_size", [2, 4, 8])
def test_stream_equals_the_papers_figure2_pseudocode(block_size):
    r = randomize_router(router(block_size))
    fs, v0 = sublayers(), torch.randn(B, T, D, dtype=torch.float64)
    inputs, final = drive(r.begin(v0), fs)
    ref_inputs, ref_final = paper_figure2(r, v0, fs, first_query=torch.randn(D, dtype=torch.float64))
    for h, ref in zip(inputs, ref_inputs):
        assert_close_scaled(h, ref, rtol=1e-12)
    assert_close_scaled(final, ref_final, rtol=1e-12)


def test_source_sets_and_recorded_weights():
    r = randomize_router(router(2))
    assert r.source_ranges[0] == [(0, 0)]  # sublayer 1: the embedding alone
    assert r.source_ranges[3] == [(0, 0), (1, 2), (3, 3)]  # sublayer 4: b_0, b_1, partial b_2^1
    assert r.source_ranges[4] == [(0, 0), (1, 2), (3, 4)]  # sublayer 5 (first of block 3)
    assert r.source_ranges[-1] == [(0, 0), (1, 2), (3, 4), (5, 6), (7, 8)]  # final: b_0 .. b_N
    stream = r.begin(torch.randn(B, T, D, dtype=torch.float64), record_weights=True)
    drive(stream, sublayers())
    assert [w.shape for w in stream.weights] == [(B, T, len(s)) for s in r.source_ranges]
    for w in stream.weights:
        assert not w.requires_grad and w.dtype == torch.float64
        assert_close_scaled(w.sum(-1), torch.ones(B, T, dtype=torch.float64), rtol=1e-12)
    plain = r.begin(torch.randn(B, T, D, dtype=torch.float64))
    drive(plain, sublayers())
    assert plain.weights is None


def test_protocol_errors_and_backends():
    r = router(2)
    stream = r.begin(torch.randn(B, T, D, dtype=torch.float64))
    stream.push(stream.next_input())
    with pytest.raises(RuntimeError, match=r"final_input\(\) after 1 of 8"):
        stream.final_input()
    for _ in range(L - 1):
        stream.push(stream.next_input())
    with pytest.raises(RuntimeError, match="after all 8"):
        stream.next_input()
    r.set_backend("auto")
    r.set_backend("torch")
    with pytest.raises(ValueError, match="'triton'.*DAR's"):
        r.set_backend("triton")
    with pytest.raises(ValueError, match="must divide"):
        build_router(D, L, RoutingConfig(mode="attnres", block_size=3))


# --- starts as the residual stream -----------------------------------------------------------------

@pytest.mark.parametrize("block_size", [1, 2, 4, 8])
def test_zero_queries_give_the_residual_stream_divided_by_the_number_of_sources(block_size):
    """Zero pseudo-queries make every weight 1/|V_l|; the sources partition v_0 + .. + v_{l-1}, so each
    input is exactly the residual stream's over |V_l| (for every block size, not only one block)."""
    r = router(block_size)
    fs, v0 = sublayers(), torch.randn(B, T, D, dtype=torch.float64)
    stream = r.begin(v0, record_weights=True)
    residual = ResidualStream(v0, L)
    for layer, f in enumerate(fs, start=1):
        h, h_res = stream.next_input(), residual.next_input()
        assert_close_scaled(h, h_res / len(r.source_ranges[layer - 1]), rtol=1e-13)
        v = f(h_res)
        stream.push(v)
        residual.push(v)
    assert_close_scaled(stream.final_input(), residual.final_input() / (L // block_size + 1), rtol=1e-13)
    for w in stream.weights:
        assert torch.equal(w, torch.full_like(w, 1 / w.shape[-1]))


def attnres_and_residual_sit(*overrides):
    """A SiT-Pico/8 in attnres mode with random (non-zero) SiT weights and an initial router, and the
    residual SiT with the same weights."""
    def model(mode):
        return build_model(resolve("fmnist", ["model.arch=SiT-Pico/8", f"model.routing.mode={mode}", *overrides]).model)

    attnres, residual = model("attnres"), model("residual")
    with torch.no_grad():  # SiT zero-inits adaLN and the final layer: give every weight a value
        for name, p in attnres.named_parameters():
            if not name.startswith("router.") and name != "pos_embed":
                p.copy_(torch.randn_like(p) * 0.1)
    shared = {k: v for k, v in attnres.state_dict().items() if not k.startswith("router.")}
    residual.load_state_dict(shared)
    return attnres.double().eval(), residual.double().eval()


def model_inputs(model, batch=2):
    c = model.config
    x = torch.randn(batch, c.in_channels, c.input_size, c.input_size, dtype=torch.float64)
    return x, torch.rand(batch, dtype=torch.float64), torch.arange(batch) % c.num_classes


@pytest.mark.parametrize("block_size", [2, 4, 24])
def test_sit_starts_as_the_residual_sit(block_size):
    """SiT's LayerNorm before every sublayer and before the final layer removes the 1/|V_l| scale, up to
    its epsilon (LN(h/c) uses c^2 eps in place of eps, |V_l| <= 13 here): with eps = 0 the two models
    agree to float64 rounding, with SiT's eps = 1e-6 to ~1e-4 of the output scale."""
    attnres, residual = attnres_and_residual_sit(f"model.routing.block_size={block_size}")
    x, t, y = model_inputs(attnres)
    layer_norms = [m for model in (attnres, residual) for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    with torch.no_grad():
        out, out_res = attnres(x, t, y), residual(x, t, y)
        assert out_res.abs().max() > 0.1
        assert_close_scaled(out, out_res, rtol=1e-3)
        for m in layer_norms:
            m.eps = 0.0
        out, out_res = attnres(x, t, y), residual(x, t, y)
        assert_close_scaled(out, out_res, rtol=1e-10)
        # and it is the router's initialisation that does it: trained queries route differently
        randomize_router(attnres.router, scale=0.5)
        assert (attnres(x, t, y) - out_res).abs().max() > 1e-2 * out_res.abs().max()


# --- size, gradients, training, bf16 ---------------------------------------------------------------

def test_parameter_count():
    """L aggregators (sublayers 2 .. L and the final one; sublayer 1 reads b_0 alone), each a pseudo-query
    and an RMSNorm gain: 2 D L, whatever the block size."""
    for block_size in (2, 4):
        config = resolve("fmnist", ["model.arch=SiT-Pico/8", "model.routing.mode=attnres",
                                    f"model.routing.block_size={block_size}"]).model
        model = build_model(config)
        depth, dim = 12, 64  # SiT-Pico
        assert count_parameters(model)["routing"] == 2 * dim * (2 * depth) == 3072
        assert {n for n, _ in model.named_parameters() if n.startswith("router.")} == {
            f"router.aggregators.{k}.{p}" for k in range(2 * depth) for p in ("query", "key_gain")}
    xl = BlockAttnResRouter(1152, 56, RoutingConfig(mode="attnres"))  # SiT-XL/2: 28 blocks, L = 56
    assert sum(p.numel() for p in xl.parameters()) == 2 * 1152 * 56 == 129_024


def test_gradients_reach_every_router_parameter():
    attnres, _ = attnres_and_residual_sit()
    randomize_router(attnres.router, scale=0.1)  # zero queries would leave the gains without gradient
    attnres.train()
    x, t, y = model_inputs(attnres)
    attnres(x, t, y).square().mean().backward()
    for name, p in attnres.router.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


def test_gradient_of_the_stream_equals_the_paper_equations():
    r = randomize_router(router(2))
    fs, v0 = sublayers(), torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    grads = []
    for run in (lambda: drive(r.begin(v0), fs), lambda: paper_equations(r, v0, fs)):
        r.zero_grad()
        v0.grad = None
        inputs, final = run()
        (final.square().sum() + sum(h.pow(3).sum() for h in inputs)).backward()
        grads.append([v0.grad.clone()] + [p.grad.clone() for p in r.parameters()])
    for mine, ref in zip(*grads):
        assert_close_scaled(mine, ref, rtol=1e-10)


TRAIN = ["model.arch=SiT-Pico/8", "model.routing.mode=attnres", "train.global_batch=4", "train.sample_every=0",
         "train.log_every=1", "train.keep_checkpoints=0", "train.ckpt_every=0", "train.steps=4"]


def test_training_resumes_exactly_and_the_cli_reads_the_run(tmp_path):
    config = resolve("fmnist", TRAIN)
    train(config, tmp_path / "straight", progress=False)
    train(config, tmp_path / "interrupted", progress=False, stop_after=2)
    train(config, tmp_path / "interrupted", resume=True, progress=False)
    for which in ("model", "ema"):
        a, b = (load_file(str(latest_checkpoint(tmp_path / run) / f"{which}.safetensors"))
                for run in ("straight", "interrupted"))
        assert a.keys() == b.keys() and any(k.startswith("router.") for k in a)
        for k in a:
            assert torch.equal(a[k], b[k]), k
    model = load_file(str(latest_checkpoint(tmp_path / "straight") / "model.safetensors"))
    assert any(model[k].abs().max() > 0 for k in model if k.endswith(".query"))  # the queries trained
    assert main(["info", str(tmp_path / "straight"), "--json"]) == 0
    png = tmp_path / "grid.png"
    assert main(["sample", str(tmp_path / "straight"), "--num", "4", "--grid", str(png),
                 "sampler.method=euler", "sampler.steps=2"]) == 0
    assert png.stat().st_size > 0


def test_info_names_the_router(tmp_path, capsys):
    config = resolve("fmnist", [*TRAIN[:-1], "train.steps=1", "model.routing.block_size=4"])
    train(config, tmp_path, progress=False)
    capsys.readouterr()
    assert main(["info", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["routing"] == "attnres-b4" and info["step"] == 1


def test_bf16_autocast_is_close_to_fp32():
    attnres, _ = attnres_and_residual_sit()
    randomize_router(attnres.router, scale=0.1)
    attnres.float()
    x, t, y = (a.float() if a.is_floating_point() else a for a in model_inputs(attnres))
    with torch.no_grad():
        out32 = attnres(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            stream = attnres.router.begin(torch.randn(2, 16, 64), record_weights=True)
            out16, weights = attnres(x, t, y, return_routing=True)
    assert stream.blocks[0].dtype == torch.bfloat16  # one source dtype, as DAR's history
    assert all(w.dtype == torch.float32 for w in weights)  # softmax statistics in fp32
    assert (out16.float() - out32).norm() <= 3e-2 * out32.norm()
