"""The autograd nodes of dar.routing.ops against the same formulas recorded op by op (forward + backward).

* source entry: a source's logits for its n readers, ``(v . q_n) / rms(v)`` (static, static_t);
* aggregator logits: ``(v_k . q) r_k`` for K sources and a per-token query (dynamic), followed by
  the mix in both cases, since that is how the router uses them.

The recorded versions are the same formulas left to autograd op by op (the plain transcription). Both are
timed alternately in one process:

    python benchmarks/bench_routing_ops.py
    python benchmarks/bench_routing_ops.py --shapes 32x256x384 --readers 6 --sources 5 --rounds 50
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dar.routing.ops import mix, query_logits, source_logits


def entry_recorded(v, queries, inv_rms):
    inv_rms = torch.rsqrt(v.float().pow(2).mean(-1) + 1e-6)
    return (v @ queries.t()).float() * inv_rms.unsqueeze(-1)


def entry_node(v, queries, inv_rms):
    return source_logits(v, queries)


def aggregator_recorded(sources, query, inv_rms):
    logits = [(v * query).sum(-1) * r for v, r in zip(sources, inv_rms)]
    return mix(sources, logits)[0]


def aggregator_node(sources, query, inv_rms):
    return mix(sources, query_logits(sources, inv_rms, query))[0]


def fwd_bwd_seconds(fn, first, second, inv_rms) -> float:
    leaves = [x.clone().requires_grad_() for x in (first if isinstance(first, list) else [first])]
    second, inv_rms = second.clone().requires_grad_(), [r.clone().requires_grad_() for r in inv_rms]
    start = time.perf_counter()
    out = fn(leaves if isinstance(first, list) else leaves[0], second, inv_rms)
    out.backward(torch.ones_like(out))
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="32x64x128,32x256x384", help="comma-separated BxTxD")
    parser.add_argument("--readers", type=int, default=6, help="n, the aggregators that read an entering source")
    parser.add_argument("--sources", type=int, default=5, help="K, the sources of one aggregator")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, n = {args.readers}, "
          f"K = {args.sources}, median of {args.rounds} after {args.warmup}")
    print("| op | B x T x D | recorded (ms) | one node (ms) | ratio |")
    print("|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for shape in args.shapes.split(","):
        B, T, D = (int(x) for x in shape.split("x"))
        v = torch.randn(B, T, D, generator=gen)
        sources = [torch.randn(B, T, D, generator=gen) for _ in range(args.sources)]
        inv_rms = [torch.rand(B, T, generator=gen) + 0.5 for _ in range(args.sources)]
        cases = {
            "source entry": ((entry_recorded, entry_node), v, torch.randn(args.readers, D, generator=gen) / D**0.5, []),
            "aggregator (dynamic)": ((aggregator_recorded, aggregator_node), sources,
                                     torch.randn(B, T, D, generator=gen) / D**0.5, inv_rms),
        }
        for op, ((recorded, node), first, second, rms) in cases.items():
            times = {recorded: [], node: []}
            for i in range(args.warmup + args.rounds):
                for fn in (recorded, node):
                    t = fwd_bwd_seconds(fn, first, second, rms)
                    if i >= args.warmup:
                        times[fn].append(t)
            a, b = statistics.median(times[recorded]), statistics.median(times[node])
            print(f"| {op} | {shape} | {a * 1e3:.2f} | {b * 1e3:.2f} | {b / a:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
