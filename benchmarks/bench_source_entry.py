"""A source entering the history: its logits for all n readers, recorded op by op vs one autograd node.

``dar.routing.source_logits`` computes ``(v . q_n) / rms(v)`` for n queries with a hand-written backward
(one matmul, one multiply-add). The recorded version is the same formula left to autograd, as the
router computed it before session 5. Forward + backward, both timed alternately in one process:

    python benchmarks/bench_source_entry.py
    python benchmarks/bench_source_entry.py --shapes 32x256x384 --readers 6 --rounds 50
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dar.routing_ops import source_logits


def recorded(v: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    inv_rms = torch.rsqrt(v.float().pow(2).mean(-1) + 1e-6)
    return (v @ queries.t()).float() * inv_rms.unsqueeze(-1)


def fwd_bwd_seconds(fn, v0: torch.Tensor, q0: torch.Tensor) -> float:
    v, q = v0.clone().requires_grad_(), q0.clone().requires_grad_()
    start = time.perf_counter()
    logits = fn(v, q)
    logits.backward(torch.ones_like(logits))
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="32x64x128,32x256x384", help="comma-separated BxTxD")
    parser.add_argument("--readers", type=int, default=6, help="n, the aggregators that read the source")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, n = {args.readers}, "
          f"median of {args.rounds} after {args.warmup}")
    print("| B x T x D | recorded (ms) | one node (ms) | ratio |")
    print("|---|---|---|---|")
    for shape in args.shapes.split(","):
        B, T, D = (int(x) for x in shape.split("x"))
        v0, q0 = torch.randn(B, T, D), torch.randn(args.readers, D) / D**0.5
        times = {"recorded": [], "node": []}
        for i in range(args.warmup + args.rounds):
            for name, fn in (("recorded", recorded), ("node", source_logits)):
                t = fwd_bwd_seconds(fn, v0, q0)
                if i >= args.warmup:
                    times[name].append(t)
        a, b = statistics.median(times["recorded"]), statistics.median(times["node"])
        print(f"| {shape} | {a * 1e3:.2f} | {b * 1e3:.2f} | {b / a:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
