import math

import pytest
import torch
import torch.nn.functional as F

from dar.models.sit import ModelConfig, build_model, count_parameters, load_official_sit_state_dict
from dar.routing import RoutingConfig, inverse_rms, source_indices
from tolerances import assert_close_scaled


def tiny(routing=RoutingConfig(mode="residual"), **kw):
    config = dict(arch="SiT-Pico/8", input_size=32, in_channels=3, num_classes=10, routing=routing)
    config.update(kw)
    return ModelConfig(**config)


def randomize(model):
    """SiT zero-inits adaLN and the final layer; give every weight a value so the test means something."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn_like(p) * 0.2)
    return model


def reference_sit_forward(model, x, t, y):
    """SiT's forward written out plainly from the paper/official code, with explicit attention."""
    sd = dict(model.named_parameters())
    p, C = model.patch_size, model.in_channels
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    h = h + sd["pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
    args = t[:, None] * freqs[None]
    temb = torch.cat([torch.cos(args), torch.sin(args)], -1)
    temb = F.linear(F.silu(F.linear(temb, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                    sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    c = temb + sd["y_embedder.embedding_table.weight"][y]
    D = h.shape[-1]
    H = model.blocks[0].attn.num_heads

    def ln(z):
        return F.layer_norm(z, (D,), eps=1e-6)

    for i in range(len(model.blocks)):
        b = f"blocks.{i}."
        mod = F.linear(F.silu(c), sd[b + "adaLN_modulation.1.weight"], sd[b + "adaLN_modulation.1.bias"])
        sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=1)
        z = ln(h) * (1 + sc1[:, None]) + sh1[:, None]
        qkv = F.linear(z, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"])
        q, k, v = qkv.reshape(h.shape[0], h.shape[1], 3, H, D // H).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // H), dim=-1) @ v
        att = F.linear(att.transpose(1, 2).reshape(h.shape), sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        h = h + g1[:, None] * att
        z = ln(h) * (1 + sc2[:, None]) + sh2[:, None]
        m = F.linear(F.gelu(F.linear(z, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]), approximate="tanh"),
                     sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        h = h + g2[:, None] * m
    sh, sc = F.linear(F.silu(c), sd["final_layer.adaLN_modulation.1.weight"],
                      sd["final_layer.adaLN_modulation.1.bias"]).chunk(2, dim=1)
    out = F.linear(ln(h) * (1 + sc[:, None]) + sh[:, None], sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])
    g = int(out.shape[1] ** 0.5)
    out = out.reshape(-1, g, g, p, p, model.out_channels).permute(0, 5, 1, 3, 2, 4)
    return out.reshape(-1, model.out_channels, g * p, g * p)[:, :C]


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_residual_mode_equals_reference_sit(learn_sigma):
    model = randomize(build_model(tiny(learn_sigma=learn_sigma))).eval()
    x, t, y = torch.randn(3, 3, 32, 32), torch.rand(3), torch.tensor([0, 5, 10])
    assert_close_scaled(model(x, t, y), reference_sit_forward(model, x, t, y), rtol=1e-4)


SIT_XL2_SHAPES = {
    "pos_embed": (1, 256, 1152),
    "x_embedder.proj.weight": (1152, 4, 2, 2),
    "x_embedder.proj.bias": (1152,),
    "t_embedder.mlp.0.weight": (1152, 256),
    "t_embedder.mlp.0.bias": (1152,),
    "t_embedder.mlp.2.weight": (1152, 1152),
    "t_embedder.mlp.2.bias": (1152,),
    "y_embedder.embedding_table.weight": (1001, 1152),
    "final_layer.linear.weight": (32, 1152),
    "final_layer.linear.bias": (32,),
    "final_layer.adaLN_modulation.1.weight": (2304, 1152),
    "final_layer.adaLN_modulation.1.bias": (2304,),
}
for _n in range(28):
    SIT_XL2_SHAPES.update({
        f"blocks.{_n}.attn.qkv.weight": (3456, 1152), f"blocks.{_n}.attn.qkv.bias": (3456,),
        f"blocks.{_n}.attn.proj.weight": (1152, 1152), f"blocks.{_n}.attn.proj.bias": (1152,),
        f"blocks.{_n}.mlp.fc1.weight": (4608, 1152), f"blocks.{_n}.mlp.fc1.bias": (4608,),
        f"blocks.{_n}.mlp.fc2.weight": (1152, 4608), f"blocks.{_n}.mlp.fc2.bias": (1152,),
        f"blocks.{_n}.adaLN_modulation.1.weight": (6912, 1152), f"blocks.{_n}.adaLN_modulation.1.bias": (6912,),
    })


def xl2(routing):
    with torch.device("meta"):
        return build_model(ModelConfig(arch="SiT-XL/2", learn_sigma=True, routing=routing))


def test_state_dict_and_parameter_count_match_official_sit_xl2():
    model = xl2(RoutingConfig(mode="residual"))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == SIT_XL2_SHAPES
    assert count_parameters(model)["total"] == 675_129_632


def test_dar_adds_only_router_parameters_and_matches_paper_sizes():
    static = xl2(RoutingConfig(query="static", chunk_size=4))
    extra = set(static.state_dict()) - set(SIT_XL2_SHAPES)
    assert extra and all(k.startswith("router.") for k in extra)
    assert set(SIT_XL2_SHAPES) <= set(static.state_dict())
    assert round(count_parameters(static)["total"] / 1e6) == 675  # paper: static c4 675M
    dynamic = xl2(RoutingConfig(query="dynamic", chunk_size=4))
    assert round(count_parameters(dynamic)["total"] / 1e6) == 751  # paper: dynamic c4 751M (57 x d^2)
    assert len(dynamic.router.aggregators) == 57


def test_official_learn_sigma_checkpoint_loads_into_velocity_only_model():
    official = randomize(build_model(tiny(learn_sigma=True))).eval()
    state = official.state_dict()
    for routing in (RoutingConfig(mode="residual"), RoutingConfig(query="static")):
        target = build_model(tiny(learn_sigma=False, routing=routing)).eval()
        load_official_sit_state_dict(target, state)
        x, t, y = torch.randn(2, 3, 32, 32), torch.rand(2), torch.tensor([1, 2])
        if routing.mode == "residual":
            torch.testing.assert_close(target(x, t, y), official(x, t, y))
    wrong = dict(state)
    wrong["x_embedder.proj.weight"] = torch.zeros(64, 4, 8, 8)
    with pytest.raises(ValueError, match="x_embedder.proj.weight"):
        load_official_sit_state_dict(build_model(tiny()), wrong)


class Recorder:
    """Wraps a stream to record every sublayer input h_l and source v_l."""

    def __init__(self):
        self.inputs, self.sources = [], []

    def __call__(self, stream):
        self.stream = stream
        self.sources.append(stream.history[0][0] if hasattr(stream, "history") else stream.h)
        return self

    def next_input(self):
        h = self.stream.next_input()
        self.inputs.append(h)
        return h

    def push(self, v):
        self.sources.append(v)
        self.stream.push(v)

    def final_input(self):
        h = self.stream.final_input()
        self.inputs.append(h)
        return h


@pytest.mark.parametrize("query,chunk", [("static", 4), ("static_t", 1), ("static_t", 3), ("dynamic", 4)])
def test_model_routing_matches_dar_equations(query, chunk):
    """Every sublayer input of a trained-looking DAR model equals the paper's formula (docs/METHOD.md §2) computed from the
    recorded sources, with the full source list and the aggregator's own parameters."""
    model = randomize(build_model(tiny(routing=RoutingConfig(query=query, chunk_size=chunk)))).eval().double()
    x, t, y = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.rand(2, dtype=torch.float64), torch.tensor([3, 4])
    rec = Recorder()
    out, weights = model(x, t, y, return_routing=True, inspect=rec)
    L = 2 * len(model.blocks)
    t_emb = model.t_embedder(t)
    shared = model.router.time_query(t_emb) if query == "static_t" else None
    for l in range(1, L + 2):
        agg = model.router.aggregator(l)
        vs = [rec.sources[i] for i in source_indices(l, L, chunk)]
        if query == "dynamic":
            q = agg.query_proj(rec.sources[l - 1])
        elif query == "static":
            q = agg.query
        else:
            q = (agg.query + shared)[:, None, :]
        keys = [v * inverse_rms(v)[..., None] * agg.key_gain for v in vs]
        logits = torch.stack([(k * q).sum(-1) for k in keys], -1) / math.sqrt(keys[0].shape[-1])
        alpha = torch.softmax(logits, -1)
        h = sum(alpha[..., i, None] * v for i, v in enumerate(vs))
        assert_close_scaled(rec.inputs[l - 1], h, rtol=1e-9)
        assert_close_scaled(weights[l - 1], alpha, rtol=1e-9)
        torch.testing.assert_close(weights[l - 1].sum(-1), torch.ones_like(alpha[..., 0]))


def test_reuse_last_aggregator_for_final_input():
    model = build_model(tiny(routing=RoutingConfig(query="static", final="reuse_last")))
    L = 2 * len(model.blocks)
    assert len(model.router.aggregators) == L
    assert model.router.aggregator(L + 1) is model.router.aggregator(L)
    out = model(torch.randn(1, 3, 32, 32), torch.rand(1), torch.tensor([1]))
    assert out.shape == (1, 3, 32, 32)


def test_routing_weights_cost_nothing_unless_requested():
    model = build_model(tiny(routing=RoutingConfig(query="static")))
    out = model(torch.randn(1, 3, 32, 32), torch.rand(1), torch.tensor([1]))
    assert isinstance(out, torch.Tensor)
    _, w = build_model(tiny())(torch.randn(1, 3, 32, 32), torch.rand(1), torch.tensor([1]), return_routing=True)
    assert w == []


@pytest.mark.parametrize("routing", [RoutingConfig(mode="residual"), RoutingConfig(query="dynamic")])
def test_gradient_checkpointing_gives_identical_gradients(routing):
    model = randomize(build_model(tiny(routing=routing))).train()
    x, t, y = torch.randn(2, 3, 32, 32), torch.rand(2), torch.tensor([1, 2])
    model(x, t, y).square().mean().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.gradient_checkpointing = True
    model(x, t, y).square().mean().backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert_close_scaled(p.grad, plain[n], rtol=1e-5)


def test_bad_model_config_names_the_problem():
    with pytest.raises(ValueError, match="model.arch='SiT-Q/2'"):
        ModelConfig(arch="SiT-Q/2")
    with pytest.raises(ValueError, match="not divisible by patch size 8"):
        ModelConfig(arch="SiT-S/8", input_size=28)


@pytest.mark.parametrize(
    "routing",
    [
        RoutingConfig(query="static", chunk_size=3),
        RoutingConfig(query="static_t", chunk_size=3),
        RoutingConfig(query="static_t", chunk_size=1, time_query="per_layer", final="reuse_last"),
        RoutingConfig(query="dynamic", chunk_size=3),
    ],
    ids=lambda r: r.describe + ("-per_layer-reuse_last" if r.final == "reuse_last" else ""),
)
def test_recompute_backend_matches_torch_backend_in_the_model(routing):
    """The torch backend dots each static source with all its readers' queries at once; the recompute
    backend forms every aggregator's logits separately. Outputs and all gradients agree."""
    model = randomize(build_model(tiny(routing=routing))).double()
    x, t, y = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.rand(2, dtype=torch.float64), torch.tensor([1, 2])
    grads = {}
    for backend in ("torch", "recompute"):
        model.zero_grad()
        model.router.set_backend(backend)
        out = model(x, t, y)
        out.square().mean().backward()
        grads[backend] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert_close_scaled(grads["recompute"][0], grads["torch"][0], rtol=1e-8)
    for n, g in grads["torch"][1].items():
        assert_close_scaled(grads["recompute"][1][n], g, rtol=1e-6)
    with pytest.raises(ValueError, match="routing backend 'cuda'"):
        model.router.set_backend("cuda")


@pytest.mark.parametrize("query", ["static_t", "dynamic"])
def test_bf16_autocast_keeps_one_history_dtype_for_every_backend(query):
    """Under autocast v_0 (embedding + fp32 position table) is fp32 while sublayer outputs are bf16;
    the history holds them in one dtype, so the fused backends (which read all sources as one array)
    run, and agree with the PyTorch path up to bf16 rounding."""
    torch.manual_seed(0)
    model = build_model(tiny(routing=RoutingConfig(query=query, chunk_size=3)))
    with torch.no_grad():  # small weights: randomize()'s saturate the softmax, and bf16 then flips argmaxes
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    x, t, y = torch.randn(2, 3, 32, 32), torch.rand(2), torch.tensor([1, 2])
    results = {}
    for backend in ("torch", "recompute"):
        model.zero_grad()
        model.router.set_backend(backend)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            stream = model.router.begin(torch.randn(2, 16, model.router.dim), torch.randn(2, model.router.dim))
            out = model(x, t, y)
        assert {v.dtype for v, _ in stream.history.values()} == {torch.bfloat16}
        out.float().square().mean().backward()
        results[backend] = out.detach().float(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    (out_torch, grad_torch), (out_recompute, grad_recompute) = results["torch"], results["recompute"]
    assert (out_recompute - out_torch).norm() <= 2e-2 * out_torch.norm()
    assert (grad_recompute - grad_torch).norm() <= 1e-1 * grad_torch.norm()


def test_compiled_model_matches_eager():
    """torch.compile takes the per-aggregator routing path (the eager one precomputes logits per
    source); both are the same function."""
    model = randomize(build_model(tiny(routing=RoutingConfig(query="static", chunk_size=3))))
    x, t, y = torch.randn(2, 3, 32, 32), torch.rand(2), torch.tensor([1, 2])
    eager = model(x, t, y)
    compiled = torch.compile(model)(x, t, y)
    assert_close_scaled(compiled, eager, rtol=1e-4)


@pytest.mark.parametrize("query", ["static", "static_t"])
def test_logits_per_source_equal_logits_per_aggregator(query):
    model = randomize(build_model(tiny(routing=RoutingConfig(query=query, chunk_size=3)))).double()
    x, t, y = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.rand(2, dtype=torch.float64), torch.tensor([1, 2])
    results = []
    for precompute in (True, False):
        model.zero_grad()
        model.router.precompute_logits = precompute
        out = model(x, t, y)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert_close_scaled(results[0][0], results[1][0], rtol=1e-9)
    for n, g in results[1][1].items():
        assert_close_scaled(results[0][1][n], g, rtol=1e-8)


@pytest.mark.parametrize("routing", [RoutingConfig(mode="residual"), RoutingConfig(query="static"), RoutingConfig(query="dynamic")])
def test_stream_is_token_major(routing):
    """Every sublayer input is a contiguous [B, T, D] tensor: elementwise ops keep their first input's
    layout, so a transposed embedding would spread its [D, T] layout through the whole stream (on this
    CPU that made each weighted-sum pass 3x slower and every LayerNorm copy its input)."""
    model = build_model(tiny(routing=routing))
    rec = Recorder()
    model(torch.randn(2, 3, 32, 32), torch.rand(2), torch.tensor([1, 2]), inspect=rec)
    assert rec.inputs and all(h.is_contiguous() for h in rec.inputs)


def test_routing_stream_stores_token_major_sources():
    """A model that hands the router a transposed v_0 (a patch embedding's view) still gets contiguous
    sublayer inputs: the history is stored token-major."""
    from dar.routing import DepthRouter

    router = DepthRouter(8, 2, RoutingConfig(query="static", chunk_size=2))
    v0 = torch.randn(2, 8, 5).transpose(1, 2)  # [B, T, D] view of a [B, D, T] tensor
    stream = router.begin(v0)
    for _ in range(2):
        h = stream.next_input()
        assert h.is_contiguous()
        stream.push(torch.randn(2, 5, 8))
    assert stream.final_input().is_contiguous()


@pytest.mark.parametrize("query", ["static", "static_t", "dynamic"])
def test_checkpoints_with_the_old_key_norm_names_load_in_the_same_parameter_order(tmp_path, query):
    """Aggregators once held their key gain as ``key_norm.weight`` (an RMSNorm whose forward never ran).
    Such files load, and the parameter order, by which optimizer states are stored, is unchanged."""
    from safetensors.torch import save_file

    from dar.training.checkpoint import load_model
    from dar.training.config import resolve

    config = resolve("fmnist", ["model.arch=SiT-Pico/8", f"model.routing.query={query}"])
    model = randomize(build_model(config.model))
    old_names = [n.replace(".key_gain", ".key_norm.weight") for n, _ in model.named_parameters()]
    # the old order: a static query (own parameter) before the gain's submodule, which came before query_proj
    first, second = ("key_norm.weight", "query_proj.weight") if query == "dynamic" else ("query", "key_norm.weight")
    assert old_names.index(f"router.aggregators.0.{first}") + 1 == old_names.index(f"router.aggregators.0.{second}")
    old = {k.replace(".key_gain", ".key_norm.weight"): v.contiguous() for k, v in model.state_dict().items()}
    save_file(old, str(tmp_path / "old.safetensors"),
              metadata={"format": "dar-v1", "step": "7", "dar_run_config": config.to_json()})
    loaded, _, step = load_model(tmp_path / "old.safetensors")
    assert step == 7
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
