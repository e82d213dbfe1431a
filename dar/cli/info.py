"""``dar info``: a checkpoint's config, step, parameter counts and routing."""

from __future__ import annotations

import json


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("info", help="show a checkpoint's config, step, parameters and routing")
    p.add_argument("checkpoint")
    p.add_argument("--weights", default="ema", choices=["ema", "model"])
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args) -> int:
    from dar.models.sit import count_parameters
    from dar.training.checkpoint import load_model

    model, config, step = load_model(args.checkpoint, which=args.weights)
    routing = config.model.routing
    info = {
        "checkpoint": str(args.checkpoint),
        "step": step,
        "arch": config.model.arch,
        "routing": routing.describe,
        "parameters": count_parameters(model),
        "source_set_sizes": [len(s) for s in model.router.source_sets] if routing.mode == "dar" else None,
        "config": config.to_dict(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    p = info["parameters"]
    print(f"checkpoint  {info['checkpoint']} (step {step})")
    print(f"model       {config.model.arch}, {config.model.in_channels}x{config.model.input_size}^2 input, "
          f"{config.model.num_classes} classes")
    print(f"routing     {routing.describe}  (query={routing.query}, chunk_size={routing.chunk_size}, "
          f"final={routing.final}, time_query={routing.time_query})" if routing.mode == "dar"
          else f"routing     {routing.describe}")
    print(f"parameters  {p['total']:,} total, {p['trainable']:,} trainable, {p['routing']:,} routing"
          + (f", {p['projector']:,} REPA projector (unused in sampling)" if p["projector"] else ""))
    if info["source_set_sizes"]:
        print(f"sources     per aggregator: {info['source_set_sizes']}")
    print(f"data        {config.data.name}; train {config.train.steps} steps, batch {config.train.global_batch}, "
          f"lr {config.train.lr}, seed {config.train.seed}")
    return 0
