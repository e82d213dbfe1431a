"""The eager router's two ways of forming static/static_t logits, side by side in one process.

Per source (default in eager mode): when a source enters the history it is dotted with the queries
of every aggregator that will read it, in one matmul. Per aggregator (what compiled graphs use):
each aggregator dots its own query with each of its sources. Both compute the same function
(tests/test_model.py); this measures eager training steps and sampling forwards of both against
residual. (Compiled graphs always use the per-aggregator form, so there is nothing to compare there.)

    python benchmarks/bench_routing_paths.py
    python benchmarks/bench_routing_paths.py --variants static-c4 --rounds 20
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace

import torch

from dar.study.bench import BENCH_PRESETS, VARIANTS, device_name, seconds
from dar.models.sit import build_model
from dar.diffusion.transport import Transport


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu", choices=sorted(BENCH_PRESETS))
    parser.add_argument("--variants", default="static-c4,static_t-c4,static-c1")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS or VARIANTS[v].mode == "residual" or VARIANTS[v].query == "dynamic"]
    if unknown:
        raise SystemExit(f"--variants: {unknown[0]!r} is not a static or static_t DAR variant of {', '.join(VARIANTS)}")

    spec, dev = BENCH_PRESETS[args.preset], torch.device(args.device)
    m = spec.model
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(spec.batch, m.in_channels, m.input_size, m.input_size, generator=g).to(dev)
    x0, t = torch.randn(x1.shape, generator=g).to(dev), torch.rand(spec.batch, generator=g).to(dev)
    y = torch.randint(m.num_classes, (spec.batch,), generator=g).to(dev)
    xs = torch.randn(spec.sample_batch, *x1.shape[1:], generator=g).to(dev)
    ts, ys = torch.rand(spec.sample_batch, generator=g).to(dev), torch.randint(m.num_classes, (spec.sample_batch,), generator=g).to(dev)
    transport = Transport()

    cases = [("residual", True)] + [(v, precompute) for v in variants for precompute in (True, False)]
    models = {}
    for name, precompute in cases:
        torch.manual_seed(0)
        model = build_model(replace(m, routing=VARIANTS[name])).to(dev)
        for p in model.parameters():
            p.data.add_(torch.randn_like(p) * 0.02)
        model.router.precompute_logits = precompute
        models[name, precompute] = model

    def train(model):
        transport.loss(model, x1, y, x0, t).mean().backward()
        model.zero_grad(set_to_none=True)

    @torch.no_grad()
    def forward(model):
        model(xs, ts, ys)

    times = {(case, kind): [] for case in cases for kind in ("train", "forward")}
    for round_ in range(args.warmup + args.rounds):
        for kind, fn in (("train", train), ("forward", forward)):
            for case in cases:
                elapsed = seconds(lambda: fn(models[case]), dev)
                if round_ >= args.warmup:
                    times[case, kind].append(elapsed)

    print(f"**{m.arch}** ({args.preset}), {device_name(dev)} ({args.device}, {torch.get_num_threads()} threads), "
          f"eager, torch {torch.__version__}, median of {args.rounds} after {args.warmup} warm-up\n")
    print("| variant | logits | train step (s) | / residual | forward (s) | / residual |")
    print("|---|---|---|---|---|---|")
    base = {kind: statistics.median(times[cases[0], kind]) for kind in ("train", "forward")}
    for case in cases:
        train_s, forward_s = (statistics.median(times[case, kind]) for kind in ("train", "forward"))
        label = "—" if case[0] == "residual" else ("per source" if case[1] else "per aggregator")
        print(f"| {case[0]} | {label} | {train_s:.4f} | {train_s / base['train']:.3f}x "
              f"| {forward_s:.4f} | {forward_s / base['forward']:.3f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
