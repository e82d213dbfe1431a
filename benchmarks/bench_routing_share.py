"""How much of a DAR model's forward (or training forward + backward) is spent in the routing itself.

Whole-model ratios (``dar bench``) move by several percent between runs on a shared machine; this
times the routing operations where they run, inside the real model, so a change to them shows up even
when the total drifts. It wraps the router's source entry (``source_logits``), its per-aggregator
logits (``query_logits``) and its mix (``mix``) with timers and, with ``--train``, the backward of
their autograd nodes too, and reports per pass (medians over repeats): the total time, the time in
each of them, their share, and the mix's forward time per source read. CPU only (CUDA launches are
asynchronous, so host-side timers would not see the kernels; use ``dar bench`` there). Run it against
another checkout (``PYTHONPATH=/path/to/other/checkout``) to compare two versions on one machine:

    python benchmarks/bench_routing_share.py --arch SiT-S/2 --batch 32 --variant static-c4
    python benchmarks/bench_routing_share.py --arch SiT-S/2 --batch 16 --variant static-c4 --train
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import contextmanager
from dataclasses import replace

import torch

import dar.routing.backends as backends
import dar.routing.ops as routing_ops
import dar.routing.router as router
from dar.models.sit import ModelConfig, build_model
from dar.study.bench import VARIANTS

# The routing operations and the modules that call them (each call site is patched)
TIMED = {"source_logits": (router,), "query_logits": (backends,), "mix": (router, backends)}
TIMED_BACKWARD = ("_SourceLogits", "_QueryLogits", "_Mix")  # their autograd nodes in dar.routing.ops


def timed(name, fn, clock):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        clock[name] += time.perf_counter() - start
        if name == "mix":
            clock["sources_read"] += len(args[0])
        return out

    return wrapper


@contextmanager
def routing_timers(clock):
    """Route every timed call through ``clock`` for the duration, then put the originals back."""
    functions = {(module, name): getattr(module, name) for name, modules in TIMED.items() for module in modules}
    nodes = {name: getattr(routing_ops, name) for name in TIMED_BACKWARD if hasattr(routing_ops, name)}
    backwards = {name: node.__dict__["backward"] for name, node in nodes.items()}
    try:
        for (module, name), fn in functions.items():
            setattr(module, name, timed(name, fn, clock))
        for name, node in nodes.items():  # autograd looks backward up on the class when it runs
            node.backward = staticmethod(timed(f"{name}.backward", backwards[name].__func__, clock))
        yield
    finally:
        for (module, name), fn in functions.items():
            setattr(module, name, fn)
        for name, node in nodes.items():
            node.backward = backwards[name]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="SiT-S/2")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--variant", default="static-c4", choices=[v for v in VARIANTS if v != "residual"])
    parser.add_argument("--train", action="store_true", help="time forward + backward (no optimizer) instead of a sampling forward")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    config = ModelConfig(arch=args.arch)
    model = build_model(replace(config, routing=VARIANTS[args.variant])).train(args.train)
    with torch.no_grad():  # non-zero queries, so that the softmax is not a uniform average
        for aggregator in model.router.aggregators:
            if hasattr(aggregator, "query"):
                aggregator.query.normal_(0, 0.1)
    x = torch.randn(args.batch, config.in_channels, config.input_size, config.input_size)
    t, y = torch.rand(args.batch), torch.randint(0, config.num_classes, (args.batch,))

    def one_pass():
        if args.train:
            model.zero_grad(set_to_none=True)
            model(x, t, y).square().mean().backward()
        else:
            with torch.no_grad():
                model(x, t, y)

    names = tuple(TIMED) + (tuple(f"{name}.backward" for name in TIMED_BACKWARD) if args.train else ())
    clock = dict.fromkeys((*names, "sources_read"), 0.0)
    runs = []
    with routing_timers(clock):
        for i in range(args.warmup + args.repeats):
            clock.update(dict.fromkeys(clock, 0.0))
            start = time.perf_counter()
            one_pass()
            total = time.perf_counter() - start
            if i >= args.warmup:
                runs.append({"total_s": total, **clock})
    median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    routing_s = sum(median[name] for name in names)
    what = "forward + backward" if args.train else "sampling forward"
    report = {
        "arch": args.arch, "batch": args.batch, "variant": args.variant, "pass": what, "repeats": args.repeats,
        "warmup": args.warmup, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "median": median, "routing_share": routing_s / median["total_s"],
        "mix_ms_per_source_read": 1e3 * median["mix"] / max(median["sources_read"], 1),
    }
    print(f"{args.arch} {args.variant}, batch {args.batch}, {what}, median of {args.repeats} "
          f"({torch.get_num_threads()} threads, torch {torch.__version__}):")
    print(f"  total {median['total_s']:.3f} s; routing {routing_s:.3f} s ({100 * report['routing_share']:.1f} %)")
    print("  " + ", ".join(f"{name} {median[name]:.3f} s" for name in names))
    print(f"  mix forward: {report['mix_ms_per_source_read']:.2f} ms per source read ({median['sources_read']:.0f} reads)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
