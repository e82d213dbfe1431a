"""Op-level benchmark of DAR aggregation: naive stacking vs the backends of :mod:`dar.routing.backends`.

For each source count K it times, side by side in one run and on the same inputs,

* ``naive``: ``torch.stack`` of all sources into ``[B, T, K, D]``, then logits, softmax and the
  weighted sum as batched matmuls (what one writes first);
* ``torch``: :func:`dar.routing.aggregate` (per-source dot products, no stack);
* ``recompute``: :class:`dar.routing.kernels.recompute.RecomputeAggregate`;
* ``triton``: the fused kernels (CUDA only),

and reports the median forward and forward+backward times, the bytes autograd keeps between forward
and backward beyond the inputs ("saved"), and the peak memory of one forward+backward beyond the
inputs ("peak": CUDA allocator statistics; on the CPU, replayed from the profiler's allocation events,
since torch keeps no CPU allocator statistics). Ratios are against ``naive``.

    python benchmarks/bench_aggregate.py                       # CUDA: B*T = 32*256, D = 1152, bf16
    python benchmarks/bench_aggregate.py --device cpu --json bench.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from dar.routing.backends import triton_available
from dar.routing import aggregate, inverse_rms

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def naive_aggregate(sources, source_inv_rms, query):
    """Stack everything, then three batched matmuls: the straightforward version, for reference."""
    stacked = torch.stack(sources, dim=2)  # [B, T, K, D]: a full copy of every source
    q = query.to(stacked.dtype)
    q = q.view(1, 1, -1) if q.dim() == 1 else q.unsqueeze(1) if q.dim() == 2 else q  # against [B, T, D]
    logits = (stacked @ q.unsqueeze(-1)).squeeze(-1).float() * torch.stack(source_inv_rms, dim=-1)  # [B, T, K]
    alpha = torch.softmax(logits, dim=-1)
    h = (alpha.to(stacked.dtype).unsqueeze(-2) @ stacked).squeeze(-2)  # [B, T, 1, K] @ [B, T, K, D]
    return h, alpha


def variants(device: torch.device) -> dict:
    found = {
        "naive": naive_aggregate,
        "torch": aggregate,
        "recompute": lambda s, r, q: aggregate(s, r, q, backend="recompute"),
    }
    if device.type == "cuda" and triton_available(device):
        found["triton"] = lambda s, r, q: aggregate(s, r, q, backend="triton")
    return found


def make_inputs(num_sources, batch, tokens, dim, query_shape, dtype, device):
    """Leaves that need gradients, as in training: sources, their 1/rms, a [B, D] (static_t) query."""
    sources = [torch.randn(batch, tokens, dim, device=device, dtype=dtype) * (0.5 + k % 4) for k in range(num_sources)]
    inv_rms = [inverse_rms(v) for v in sources]
    shape = {"D": (dim,), "BD": (batch, dim), "BTD": (batch, tokens, dim)}[query_shape]
    query = torch.randn(shape, device=device) * 3 / dim**0.5
    leaves = [t.requires_grad_() for t in (*sources, *inv_rms, query)]
    grad_h = torch.randn(batch, tokens, dim, device=device, dtype=dtype)
    return leaves, grad_h


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_median_ms(steps: dict, device, warmup, iters) -> dict:
    """Median wall time of each ``steps[name]()``, timed round-robin so that drift and load on the
    machine hit every variant alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(iters):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def saved_bytes(fn, sources, inv_rms, query) -> int:
    """Bytes of the distinct storages autograd saves for backward that are not the inputs' own."""
    input_storages = {t.untyped_storage().data_ptr() for t in (*sources, *inv_rms, query)}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in input_storages:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(sources, inv_rms, query)
    return sum(storages.values())


def peak_bytes(step, device) -> int:
    """Peak memory of ``step()`` beyond what was allocated before it."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    allocations = sorted(
        (event.start_ns(), event.nbytes()) for event in prof.profiler.kineto_results.events() if event.name() == "[memory]"
    )  # signed sizes: + allocation, - free
    current = peak = 0
    for _, nbytes in allocations:
        current += nbytes
        peak = max(peak, current)
    return peak


def bench_sources(num_sources, batch, tokens, dim, query_shape, dtype, device, warmup, iters) -> list[dict]:
    """All variants on the same inputs for one K: one result dict per variant."""
    leaves, grad_h = make_inputs(num_sources, batch, tokens, dim, query_shape, dtype, device)
    sources, inv_rms, query = leaves[:num_sources], leaves[num_sources : 2 * num_sources], leaves[-1]
    steps = {}
    for name, fn in variants(device).items():
        steps[name, "forward"] = lambda fn=fn: fn(sources, inv_rms, query)
        # every leaf's gradient, returned rather than accumulated into .grad
        steps[name, "forward_backward"] = lambda fn=fn: torch.autograd.grad(
            fn(sources, inv_rms, query)[0], leaves, grad_h
        )
    times = interleaved_median_ms(steps, device, warmup, iters)
    return [
        {
            "num_sources": num_sources,
            "variant": name,
            "forward_ms": times[name, "forward"],
            "forward_backward_ms": times[name, "forward_backward"],
            "saved_mb": saved_bytes(fn, sources, inv_rms, query) / 2**20,
            "peak_mb": peak_bytes(steps[name, "forward_backward"], device) / 2**20,
        }
        for name, fn in variants(device).items()
    ]


def markdown_table(results: list[dict]) -> str:
    lines = [
        "| K | variant | fwd ms | fwd+bwd ms | fwd vs naive | fwd+bwd vs naive | saved MB | peak MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results:
        base = next(r for r in results if r["num_sources"] == row["num_sources"] and r["variant"] == "naive")
        lines.append(
            f"| {row['num_sources']} | {row['variant']} | {row['forward_ms']:.2f} | {row['forward_backward_ms']:.2f} "
            f"| {row['forward_ms'] / base['forward_ms']:.2f}x | {row['forward_backward_ms'] / base['forward_backward_ms']:.2f}x "
            f"| {row['saved_mb']:.2f} | {row['peak_mb']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sources", type=int, nargs="+", default=[18, 57], help="K values")
    parser.add_argument("--batch", type=int, help="default 32 on CUDA, 4 on the CPU")
    parser.add_argument("--tokens", type=int, help="default 256 on CUDA, 64 on the CPU")
    parser.add_argument("--dim", type=int, default=1152)
    parser.add_argument("--query", choices=("D", "BD", "BTD"), default="BD", help="query shape (BD: static_t)")
    parser.add_argument("--dtype", choices=DTYPES, help="default bf16 on CUDA, fp32 on the CPU")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads); fewer is steadier on a busy machine")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    batch = args.batch or (32 if on_cuda else 4)
    tokens = args.tokens or (256 if on_cuda else 64)
    dtype_name = args.dtype or ("bf16" if on_cuda else "fp32")
    torch.manual_seed(0)

    results = []
    for num_sources in args.sources:
        results += bench_sources(
            num_sources, batch, tokens, args.dim, args.query, DTYPES[dtype_name], device, args.warmup, args.iters
        )

    name = torch.cuda.get_device_name(device) if on_cuda else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"{name}, torch {torch.__version__}: B={batch} T={tokens} D={args.dim} {dtype_name}, query {args.query}, "
          f"median of {args.iters} after {args.warmup} warm-up\n")  # fmt: skip
    print(markdown_table(results))
    if args.json:
        config = {"device": name, "batch": batch, "tokens": tokens, "dim": args.dim, "dtype": dtype_name,
                  "query": args.query, "warmup": args.warmup, "iters": args.iters, "torch": torch.__version__}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump({"config": config, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
