import math

import pytest
import torch

from dar.routing import DepthRouter, RoutingConfig, aggregate, reader_ranges, reference_aggregate, source_indices
from dar.routing.ops import inverse_rms, mix, query_logits, source_logits
from tolerances import assert_close_scaled


@pytest.mark.parametrize("query_shape", ["d", "bd", "btd"])
def test_aggregate_equals_naive_formula(query_shape):
    B, T, D, K = 2, 5, 16, 4
    sources = [torch.randn(B, T, D) * (i + 1) for i in range(K)]
    shape = {"d": (D,), "bd": (B, D), "btd": (B, T, D)}[query_shape]
    q, gain = torch.randn(shape), torch.rand(D) + 0.5
    h, alpha = aggregate(sources, [inverse_rms(v) for v in sources], q * gain / math.sqrt(D))
    h_ref, alpha_ref = reference_aggregate(sources, q, gain)
    assert_close_scaled(h, h_ref, rtol=1e-5)
    assert_close_scaled(alpha, alpha_ref, rtol=1e-5)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(B, T))


@pytest.mark.parametrize("query_shape", [(6,), (2, 6), (2, 3, 6)])
def test_aggregate_gradcheck_float64(query_shape):
    sources = [torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    inv = [torch.rand(2, 3, dtype=torch.float64, requires_grad=True) + 0.5 for _ in range(3)]
    q = torch.randn(query_shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: aggregate(a[:3], a[3:6], a[6])[0], (*sources, *inv, q))


@pytest.mark.parametrize("num_sources", [1, 2, 5])
def test_mix_gradcheck_through_h_and_alpha(num_sources):
    """The hand-written backward of mix (one autograd node per aggregator), upstream gradients on both
    outputs, K = 1 included (its single weight is exactly 1, its logit gradient exactly 0)."""
    sources = [torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True) for _ in range(num_sources)]
    logits = [torch.randn(2, 3, dtype=torch.float64, requires_grad=True) for _ in range(num_sources)]
    K = num_sources
    assert torch.autograd.gradcheck(lambda *a: mix(a[K:], a[:K]), (*logits, *sources))
    h, alpha = mix(sources, logits)
    torch.testing.assert_close(alpha, torch.softmax(torch.stack(logits, -1), -1))
    torch.testing.assert_close(h, sum(alpha[..., k, None] * v for k, v in enumerate(sources)))


@pytest.mark.parametrize("query_shape", [(4, 6), (2, 4, 6)], ids=["shared", "per-sample"])
def test_source_logits_gradcheck_and_formula(query_shape):
    """The fused entry of a source (its logits for all readers, hand-written backward) against the
    definition q_n . v / rms(v), and its gradients for v and the queries."""
    v = (torch.randn(2, 3, 6, dtype=torch.float64) * 3).requires_grad_()
    queries = torch.randn(query_shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(source_logits, (v, queries))
    rms = v.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    expected = (v / rms) @ queries.transpose(-1, -2)  # [B, T, n]
    torch.testing.assert_close(source_logits(v, queries), expected)


@pytest.mark.parametrize("query_shape", [(6,), (2, 6), (2, 3, 6)], ids=["D", "BD", "BTD"])
@pytest.mark.parametrize("num_sources", [1, 3])
def test_query_logits_gradcheck_and_formula(query_shape, num_sources):
    """One aggregator's logits as one node (hand-written backward) against (v_k . q) r_k, with the
    gradients for the query, every source and every 1/rms."""
    sources = [torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True) for _ in range(num_sources)]
    inv_rms = [torch.rand(2, 3, dtype=torch.float64, requires_grad=True) for _ in range(num_sources)]
    query = torch.randn(query_shape, dtype=torch.float64, requires_grad=True)
    K = num_sources
    assert torch.autograd.gradcheck(lambda q, *a: tuple(query_logits(a[:K], a[K:], q)), (query, *sources, *inv_rms))
    q = query if query.dim() != 2 else query[:, None]
    for z, v, r in zip(query_logits(sources, inv_rms, query), sources, inv_rms):
        torch.testing.assert_close(z, (v * q).sum(-1) * r)


def test_mix_rejects_mismatched_lists():
    with pytest.raises(ValueError, match="3 sources but 2 logits"):
        mix([torch.randn(1, 2, 4)] * 3, [torch.randn(1, 2)] * 2)


@pytest.mark.parametrize("query_shape", [(32,), (2, 32), (2, 16, 32)], ids=["D", "BD", "BTD"])
def test_bf16_logits_are_not_rounded_to_bf16(query_shape):
    """With bf16 sources and logits of order 10, rounding each logit to bf16 (spacing 0.06 there)
    moves the weights by about 1e-2; multiplied by the fp32 query and summed in fp32 they match the
    exact weights of the same rounded inputs to fp32 precision, on both paths (per aggregator and
    per source)."""
    gen = torch.Generator().manual_seed(0)
    sources = [torch.randn(2, 16, 32, generator=gen).bfloat16() for _ in range(4)]
    query = torch.randn(query_shape, generator=gen) * 10 / 32**0.5
    exact = [v.double() for v in sources]
    _, alpha_exact = aggregate(exact, [inverse_rms(v) for v in exact], query.double())
    _, alpha = aggregate(sources, [inverse_rms(v) for v in sources], query)
    assert (alpha.double() - alpha_exact).abs().max() < 1e-5  # 1e-2 with bf16-rounded logits
    if len(query_shape) == 1:  # the per-source path takes a table of queries
        logits = source_logits(sources[0], query[None])[..., 0]
        expected = source_logits(exact[0], query[None].double())[..., 0]
        assert (logits.double() - expected).abs().max() < 1e-4


def test_softmax_statistics_are_fp32_for_bf16_sources():
    sources = [torch.randn(2, 4, 8).bfloat16() for _ in range(3)]
    h, alpha = aggregate(sources, [inverse_rms(v) for v in sources], torch.randn(8))
    assert alpha.dtype == torch.float32 and h.dtype == torch.bfloat16
    torch.testing.assert_close(alpha.sum(-1), torch.ones(2, 4))


def test_source_sets_dense_chunked_and_single_chunk():
    L = 24
    dense = [source_indices(l, L, 1) for l in range(1, L + 2)]
    assert dense == [list(range(l)) for l in range(1, L + 2)]
    whole = [source_indices(l, L, L) for l in range(1, L + 2)]
    assert whole == dense  # one chunk holding everything is the dense history too
    c4 = {l: source_indices(l, L, 4) for l in range(1, L + 2)}
    assert c4[1] == [0] and c4[2] == [0, 1] and c4[4] == [0, 1, 2, 3]
    assert c4[5] == [0, 4] and c4[6] == [0, 4, 5] and c4[8] == [0, 4, 5, 6, 7] and c4[9] == [0, 4, 8]
    assert c4[L + 1] == [0, 4, 8, 12, 16, 20, 21, 22, 23, 24]
    for l in range(1, L + 2):  # |S_l| <= S + N
        assert len(c4[l]) <= 4 + 6


def test_source_set_of_final_aggregator_with_partial_last_chunk():
    assert source_indices(11, 10, 4) == [0, 4, 8, 9, 10]
    with pytest.raises(ValueError, match="layer must be in"):
        source_indices(12, 10, 4)


def test_bad_routing_config_names_the_field():
    with pytest.raises(ValueError, match="routing.query='dyn'"):
        RoutingConfig(query="dyn")
    with pytest.raises(ValueError, match="chunk_size"):
        RoutingConfig(chunk_size=0)


@pytest.mark.parametrize("query", ["static", "static_t", "dynamic"])
def test_zero_initialised_router_is_uniform_and_residual_is_a_sum(query):
    L, B, T, D = 8, 2, 3, 16
    router = DepthRouter(D, L, RoutingConfig(query=query, chunk_size=4))
    stream = router.begin(torch.randn(B, T, D), torch.randn(B, D), record_weights=True)
    for _ in range(L):
        stream.next_input()
        stream.push(torch.randn(B, T, D) * 5)
    stream.final_input()
    assert len(stream.weights) == L + 1
    for l, alpha in enumerate(stream.weights, start=1):
        k = len(source_indices(l, L, 4))
        torch.testing.assert_close(alpha, torch.full((B, T, k), 1.0 / k))

    residual = DepthRouter(D, 2, RoutingConfig(mode="residual"))
    assert len(list(residual.parameters())) == 0
    v0, v1, v2 = torch.randn(3, B, T, D)
    s = residual.begin(v0)
    s.push(v1)
    s.push(v2)
    assert torch.equal(s.final_input(), v0 + v1 + v2)


def test_static_t_requires_the_timestep_embedding():
    router = DepthRouter(8, 2, RoutingConfig(query="static_t", chunk_size=2))
    with pytest.raises(ValueError, match="t_emb"):
        router.begin(torch.randn(1, 2, 8))


def test_final_input_before_all_sublayers_is_an_error():
    router = DepthRouter(8, 4, RoutingConfig(query="static"))
    stream = router.begin(torch.randn(1, 2, 8))
    stream.push(torch.randn(1, 2, 8))
    with pytest.raises(RuntimeError, match="1 of 4"):
        stream.final_input()


@pytest.mark.parametrize("num_layers,chunk", [(24, 4), (12, 1), (12, 5), (7, 3), (6, 6)])
def test_every_source_is_read_by_a_contiguous_range_of_layers(num_layers, chunk):
    sets = [source_indices(l, num_layers, chunk) for l in range(1, num_layers + 2)]
    ranges = reader_ranges(sets)
    assert sorted(ranges) == list(range(num_layers + 1))  # every source is read by someone
    for i, (first, last) in ranges.items():
        assert first == i + 1  # the next layer always reads the newest output
        assert [l for l in range(1, num_layers + 2) if i in sets[l - 1]] == list(range(first, last + 1))
    with pytest.raises(ValueError, match="source 0 is read by non-contiguous layers"):
        reader_ranges([[0], [1], [0, 2]])


def test_auto_backend_is_the_kernel_on_cuda_except_inside_compiled_graphs(monkeypatch):
    import dar.routing.backends
    import dar.routing.router

    router = DepthRouter(8, 4, RoutingConfig(query="static"))
    monkeypatch.setattr(dar.routing.backends, "triton_available", lambda device: True)
    assert router.resolve_backend(torch.device("cuda")) == "triton"
    assert router.resolve_backend(torch.device("cpu")) == "torch"
    monkeypatch.setattr(dar.routing.router, "compiling", lambda: True)
    assert router.resolve_backend(torch.device("cuda")) == "torch"
    router.set_backend("triton")  # an explicit choice is kept
    assert router.resolve_backend(torch.device("cuda")) == "triton"
