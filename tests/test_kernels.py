"""The ``recompute`` and ``triton`` aggregation backends against :func:`dar.routing.aggregate`.

Every case checks h, alpha and the gradients with respect to every source, every inv_rms and the
query, with upstream gradients on both h and alpha. The expected values are the reference run on
float64 copies of the very same (dtype-rounded) inputs (its dot products pass through fp32), so the
tolerance only has to cover the backend's own rounding: fp32 arithmetic, plus one rounding of h and
of the source gradients to bf16 or fp16.

Without CUDA the Triton kernels run on the CPU through Triton's interpreter, which is why
``TRITON_INTERPRET`` is set before anything imports :mod:`dar.routing.kernels.triton_aggregate` and why
those cases are tiny. With CUDA they run compiled on the GPU.
"""

import importlib.util
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated, at import

from dar.routing.backends import BACKENDS, triton_available  # noqa: E402
from dar.routing.kernels.recompute import RecomputeAggregate  # noqa: E402
from dar.routing import aggregate, inverse_rms  # noqa: E402
from tolerances import assert_close_scaled

DEVICE = torch.device("cuda" if CUDA else "cpu")
if importlib.util.find_spec("triton") is None:
    TRITON_SKIP = "triton is not installed (pip install 'dar[triton]')"
elif not triton_available(DEVICE):
    TRITON_SKIP = (
        "dar.routing.kernels.triton_aggregate was compiled for CUDA (imported before TRITON_INTERPRET=1 was set) "
        "and there is no CUDA device"
    )
else:
    TRITON_SKIP = None
needs_triton = pytest.mark.skipif(TRITON_SKIP is not None, reason=str(TRITON_SKIP))

QUERY_SHAPES = ("D", "BD", "BTD")
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def make_inputs(num_sources, batch, tokens, dim, query_shape, dtype, seed=0):
    """Sources of different scales (so 1/rms matters), their fp32 1/rms, a query giving O(1) logits,
    and random upstream gradients for h and alpha."""
    gen = torch.Generator().manual_seed(seed)
    sources = [
        (torch.randn(batch, tokens, dim, generator=gen) * (0.5 + k % 4)).to(dtype) for k in range(num_sources)
    ]
    inv_rms = [inverse_rms(v) for v in sources]  # fp32 [B, T]
    shape = {"D": (dim,), "BD": (batch, dim), "BTD": (batch, tokens, dim)}[query_shape]
    query = torch.randn(shape, generator=gen) * 3 / dim**0.5  # logits ~ N(0, 9)
    grad_h = torch.randn(batch, tokens, dim, generator=gen).to(dtype)
    grad_alpha = torch.randn(batch, tokens, num_sources, generator=gen)
    return sources, inv_rms, query, grad_h, grad_alpha


def outputs_and_grads(fn, sources, inv_rms, query, grad_h, grad_alpha, device=DEVICE, dtype=None):
    """Run ``fn(sources, inv_rms, query)`` on fresh leaves (cast to ``dtype`` if given) and backprop
    ``grad_h`` and ``grad_alpha``: {"h", "alpha", "query", "sources", "inv_rms"} -> tensors on the CPU."""

    def leaf(t):
        return t.to(device=device, dtype=dtype or t.dtype).detach().requires_grad_()

    sources, inv_rms, query = [leaf(v) for v in sources], [leaf(r) for r in inv_rms], leaf(query)
    h, alpha = fn(sources, inv_rms, query)
    torch.autograd.backward((h, alpha), (grad_h.to(device, h.dtype), grad_alpha.to(device, alpha.dtype)))
    return {
        "h": [h.detach().cpu()],
        "alpha": [alpha.detach().cpu()],
        "query": [query.grad.cpu()],
        "sources": [v.grad.cpu() for v in sources],
        "inv_rms": [r.grad.cpu() for r in inv_rms],
    }


def assert_matches_reference(backend, num_sources, batch, tokens, dim, query_shape, dtype):
    inputs = make_inputs(num_sources, batch, tokens, dim, query_shape, dtype)
    expected = outputs_and_grads(aggregate, *inputs, device="cpu", dtype=torch.float64)
    actual = outputs_and_grads(lambda *args: aggregate(*args, backend=backend), *inputs)
    assert actual["h"][0].dtype == dtype and actual["alpha"][0].dtype == torch.float32
    assert all(g.dtype == dtype for g in actual["sources"]) and actual["query"][0].dtype == torch.float32
    for name, tensors in expected.items():
        # error relative to the largest expected value of the group (all sources, all inv_rms, ...)
        scale = max(t.abs().max().item() for t in tensors)
        error = max((a.double() - e).abs().max().item() for a, e in zip(actual[name], tensors))
        assert error <= TOLERANCE[dtype] * scale, f"{name}: max error {error:.3g} vs scale {scale:.3g}"


def sizes(dim):
    """(batch, tokens): T = 3 leaves a partial token tile (BLOCK_T is a power of two); fewer tokens at
    D = 1152, where the interpreter is slowest."""
    return (2, 2) if dim == 1152 else (2, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dim", [96, 128, 1152])
@pytest.mark.parametrize("num_sources", [1, 3, 18, 57])
@pytest.mark.parametrize("query_shape", QUERY_SHAPES)
def test_recompute_matches_reference(query_shape, num_sources, dim, dtype):
    assert_matches_reference("recompute", num_sources, *sizes(dim), dim, query_shape, dtype)


# The interpreter runs every program of the grid in Python, one source at a time, so on the CPU the
# dtype rotates instead of multiplying the cases: every (K, D, query shape) still runs, and every
# pair of them meets both fp32 and bf16. CUDA runs the full product.
TRITON_CASES = [
    (query_shape, num_sources, dim, dtype)
    for q_i, query_shape in enumerate(QUERY_SHAPES)
    for k_i, num_sources in enumerate((1, 3, 18, 57))
    for d_i, dim in enumerate((96, 128, 1152))
    for dtype in ((torch.float32, torch.bfloat16) if CUDA else ((torch.float32, torch.bfloat16)[(q_i + k_i + d_i) % 2],))
]


@needs_triton
@pytest.mark.parametrize(
    "query_shape,num_sources,dim,dtype",
    TRITON_CASES,
    ids=[f"{q}-K{k}-D{d}-{str(t).split('.')[-1]}" for q, k, d, t in TRITON_CASES],
)
def test_triton_matches_reference(query_shape, num_sources, dim, dtype):
    assert_matches_reference("triton", num_sources, *sizes(dim), dim, query_shape, dtype)


@pytest.mark.parametrize("backend", ["recompute", pytest.param("triton", marks=needs_triton)])
def test_fp16_sources(backend):
    assert_matches_reference(backend, 5, 2, 3, 96, "BD", torch.float16)


@needs_triton
@pytest.mark.parametrize("query_shape", QUERY_SHAPES)
def test_triton_many_token_tiles(query_shape):
    """Several token tiles per batch row, the last one partial: per-program query-gradient partials."""
    assert_matches_reference("triton", 3, 2, 37, 96, query_shape, torch.float32)


@needs_triton
def test_triton_copies_non_contiguous_and_misaligned_sources():
    sources, inv_rms, query, grad_h, grad_alpha = make_inputs(3, 2, 3, 96, "BD", torch.float32)
    padded = torch.zeros(2, 3, 98, device=DEVICE)
    padded[..., 1:97] = sources[0]
    sources[0] = padded[..., 1:97]  # a strided view starting 4 bytes past an aligned address
    sources[1] = sources[1].to(DEVICE).transpose(0, 1).contiguous().transpose(0, 1)  # [B, T, D], T-major
    expected = outputs_and_grads(aggregate, sources, inv_rms, query, grad_h, grad_alpha)
    actual = outputs_and_grads(
        lambda *args: aggregate(*args, backend="triton"), sources, inv_rms, query, grad_h, grad_alpha
    )
    for name in expected:
        for a, e in zip(actual[name], expected[name]):
            assert_close_scaled(a, e, rtol=1e-4)


@pytest.mark.parametrize("query_shape", QUERY_SHAPES)
def test_recompute_gradcheck_float64(query_shape):
    sources, inv_rms, query, _, _ = make_inputs(3, 2, 3, 5, query_shape, torch.float64)
    leaves = [t.double().requires_grad_() for t in (query, *sources, *inv_rms)]
    assert torch.autograd.gradcheck(lambda *args: RecomputeAggregate.apply(*args), leaves)


@pytest.mark.parametrize("backend", ["recompute", pytest.param("triton", marks=needs_triton)])
def test_saves_only_inputs_and_per_token_statistics(backend):
    """What autograd keeps until backward: the inputs themselves plus [B, T] statistics, never a
    [K, B, T, D] stack, a per-source fp32 copy or [B, T, K] routing weights."""
    sources, inv_rms, query, _, _ = make_inputs(4, 2, 3, 96, "BTD", torch.bfloat16)
    leaves = [t.to(DEVICE).requires_grad_() for t in (*sources, *inv_rms, query)]
    input_ptrs = {t.data_ptr() for t in leaves}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        aggregate(leaves[:4], leaves[4:8], leaves[8], backend=backend)
    extra = [tuple(t.shape) for t in saved if t.data_ptr() not in input_ptrs]
    assert extra == [(2, 3)], extra


def test_dispatch():
    sources, inv_rms, query, _, _ = make_inputs(3, 2, 3, 8, "D", torch.float32)
    h, alpha = aggregate(sources, inv_rms, query, backend="torch")
    h_ref, alpha_ref = aggregate(sources, inv_rms, query)
    assert torch.equal(h, h_ref) and torch.equal(alpha, alpha_ref)
    assert set(BACKENDS) == {"torch", "recompute", "triton"}
    with pytest.raises(ValueError, match="unknown aggregation backend"):
        aggregate(sources, inv_rms, query, backend="cuda")
    with pytest.raises(ValueError, match="query must be"):
        aggregate(sources, inv_rms, query[:4], backend="recompute")
