"""How much of a DAR model's sampling forward is spent in the routing itself, measured inside the model.

Whole-model ratios (``dar bench``) move by several percent between runs on a shared machine; this
times the routing operations where they run, in the real forward, so a change to them shows up even
when the forward's total drifts. It wraps the router's source entry (``source_logits``), its
per-aggregator logits (``query_logits``) and its mix (``mix``) with timers and reports, per forward
(medians over repeats): the forward's time, the time in each of them, and the mix's time per source
read. CPU only (CUDA launches are asynchronous, so host-side timers would not see the kernels; use
``dar bench`` there). Run it against another checkout (``PYTHONPATH=/path/to/other/checkout``) to
compare two versions on the same machine:

    python benchmarks/bench_routing_share.py --arch SiT-S/2 --batch 32 --variant static-c4
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace

import torch

import dar.routing as routing
from dar.bench import VARIANTS
from dar.models.sit import ModelConfig, build_model

TIMED = ("source_logits", "query_logits", "mix")


def timed(name, fn, clock):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        clock[name] += time.perf_counter() - start
        if name == "mix":
            clock["sources_read"] += len(args[0])
        return out

    return wrapper


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="SiT-S/2")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--variant", default="static-c4", choices=[v for v in VARIANTS if v != "residual"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    config = ModelConfig(arch=args.arch)
    model = build_model(replace(config, routing=VARIANTS[args.variant])).eval()
    with torch.no_grad():  # non-zero queries, so that the softmax is not a uniform average
        for aggregator in model.router.aggregators:
            if hasattr(aggregator, "query"):
                aggregator.query.normal_(0, 0.1)
    x = torch.randn(args.batch, config.in_channels, config.input_size, config.input_size)
    t, y = torch.rand(args.batch), torch.randint(0, config.num_classes, (args.batch,))

    clock = dict.fromkeys((*TIMED, "sources_read"), 0.0)
    originals = {name: getattr(routing, name) for name in TIMED}
    runs = []
    try:
        for name, fn in originals.items():
            setattr(routing, name, timed(name, fn, clock))
        with torch.no_grad():
            for i in range(args.warmup + args.repeats):
                clock.update(dict.fromkeys(clock, 0.0))
                start = time.perf_counter()
                model(x, t, y)
                total = time.perf_counter() - start
                if i >= args.warmup:
                    runs.append({"forward_s": total, **clock})
    finally:
        for name, fn in originals.items():
            setattr(routing, name, fn)
    median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    routing_s = sum(median[name] for name in TIMED)
    report = {
        "arch": args.arch, "batch": args.batch, "variant": args.variant, "repeats": args.repeats,
        "warmup": args.warmup, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "median": median, "routing_share": routing_s / median["forward_s"],
        "mix_ms_per_source_read": 1e3 * median["mix"] / max(median["sources_read"], 1),
    }
    print(f"{args.arch} {args.variant}, batch {args.batch}, sampling forward, median of {args.repeats} "
          f"({torch.get_num_threads()} threads, torch {torch.__version__}):")
    print(f"  forward {median['forward_s']:.3f} s; routing {routing_s:.3f} s ({100 * report['routing_share']:.1f} %): "
          + ", ".join(f"{name} {median[name]:.3f} s" for name in TIMED))
    print(f"  mix: {report['mix_ms_per_source_read']:.2f} ms per source read ({median['sources_read']:.0f} reads)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
