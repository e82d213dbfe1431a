"""The ``dar`` command line. Every subcommand rejects unknown options; config values are given as
``key=value`` overrides (``train.steps=500 model.routing.query=dynamic``) and validated by type."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dar.config import PRESETS, from_dict, resolve
from dar.models.sit import ARCH_NAMES
from dar.sampling import SamplerConfig

EXAMPLES = """examples:
  dar train                                    # DAR (static_t, c4) on the built-in Fashion-MNIST
  dar train --preset fmnist-residual --run-dir runs/residual
  dar train train.steps=500 model.routing.query=dynamic --run-dir runs/dyn
  dar sample runs/fmnist --num 80 --grid grid.png
  dar sample runs/fmnist --num 10000 --out samples/fmnist sampler.method=sde sampler.steps=250
  dar info runs/fmnist
"""


def _train(args) -> int:
    from dar.train import train

    config = resolve(args.preset, args.overrides)
    run_dir = Path(args.run_dir or f"runs/{args.preset}")
    summary = train(config, run_dir, resume=args.resume, device=args.device, progress=not args.no_progress)
    print(json.dumps(summary))
    return 0


def _sampler_from(overrides: list[str], base: SamplerConfig) -> SamplerConfig:
    values = base.to_dict()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("sampler."):
            raise ValueError(f"override {item!r}: `dar sample` takes sampler.KEY=VALUE overrides only")
        values[key[len("sampler."):]] = value
    return from_dict(SamplerConfig, values, "sampler.")


def _sample(args) -> int:
    from dar.checkpoint import load_model

    _, run_config, _ = load_model(args.checkpoint, which=args.weights)
    sampler = _sampler_from(args.overrides, run_config.sampler)
    if args.out is None and args.grid is None:
        raise ValueError("give --out DIR (an ADM .npz + JSON sidecar) and/or --grid PNG")
    if args.out is not None:
        from dar.generate import generate

        path = generate(args.checkpoint, args.out, args.num, sampler, batch_size=args.batch_size, seed=args.seed,
                        labels=args.labels, which=args.weights, device=args.device, progress=not args.no_progress)
        print(f"wrote {path} and {path.with_suffix('.json')}")
    if args.grid is not None:
        _grid(args, sampler)
    return 0


def _grid(args, sampler) -> None:
    from dar.checkpoint import load_model
    from dar.data import make_dataset, to_uint8
    from dar.generate import initial_noise, sample_labels
    from dar.images import save_labelled_grid
    from dar.sampling import sample

    model, config, step = load_model(args.checkpoint, which=args.weights, device=args.device or "cpu")
    m = config.model
    n = min(args.num, 160)
    labels = sample_labels(n, min(m.num_classes, 10), "balanced", args.seed)
    noise = initial_noise(range(n), (m.in_channels, m.input_size, m.input_size), args.seed)
    x, info = sample(model, noise.to(args.device or "cpu"), labels.to(args.device or "cpu"), sampler)
    try:
        names = make_dataset(config.data.name, config.data.path, "train", config.data.image_size).class_names
    except (ValueError, OSError):
        names = [str(i) for i in range(m.num_classes)]
    path = save_labelled_grid(to_uint8(x.cpu()), labels.tolist(), names, args.grid)
    print(f"wrote {path} (step {step}, {sampler.method}, NFE {info['nfe']}, cfg {sampler.cfg_scale})")


def _info(args) -> int:
    from dar.checkpoint import load_model
    from dar.models.sit import count_parameters

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
          f"final={routing.final}, time_query={routing.time_query})" if routing.mode == "dar" else "routing     residual")
    print(f"parameters  {p['total']:,} total, {p['trainable']:,} trainable, {p['routing']:,} routing")
    if info["source_set_sizes"]:
        print(f"sources     per aggregator: {info['source_set_sizes']}")
    print(f"data        {config.data.name}; train {config.train.steps} steps, batch {config.train.global_batch}, "
          f"lr {config.train.lr}, seed {config.train.seed}")
    return 0


def _convert_sit(args) -> int:
    """An official SiT/DiT state dict (.pt, loaded with weights_only=True) -> a self-describing dar
    weights file that `dar sample/info/diagnose` accept."""
    import torch
    from safetensors.torch import save_file

    from dar.checkpoint import FORMAT
    from dar.models.sit import build_model, load_official_sit_state_dict

    config = resolve(args.preset, [f"model.arch={args.arch}", "model.routing.mode=residual", *args.overrides])
    try:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for unreadable/unsafe files
        raise ValueError(f"cannot read {args.checkpoint} as a plain state dict: {error}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{args.checkpoint} holds a {type(state).__name__}, not a state dict")
    model = build_model(config.model)
    load_official_sit_state_dict(model, state)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(out), metadata={"format": FORMAT, "step": "-1", "dar_run_config": config.to_json()})
    print(f"wrote {out} ({config.model.arch}, residual, from {args.checkpoint})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dar", description="Diffusion-Adaptive Routing for diffusion transformers",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (or continue) a run", formatter_class=argparse.RawDescriptionHelpFormatter,
                       usage="dar train [options] [KEY=VALUE ...]",
                       epilog="KEY=VALUE overrides any config field, e.g. train.steps=500 model.routing.query=dynamic\n"
                              "presets: " + ", ".join(PRESETS) + "\nA run dir with checkpoints is continued.")
    p.add_argument("--preset", default="fmnist", choices=sorted(PRESETS))
    p.add_argument("--run-dir", help="output directory (default runs/PRESET)")
    p.add_argument("--resume", action="store_true", help="require an existing checkpoint to continue from")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)

    p = sub.add_parser("sample", help="generate samples: a labelled grid PNG and/or an ADM .npz",
                       usage="dar sample CHECKPOINT [options] [sampler.KEY=VALUE ...]",
                       epilog="sampler.KEY=VALUE overrides the checkpoint's sampler, e.g. sampler.method=sde "
                              "sampler.steps=250 sampler.cfg_scale=1.5 sampler.guidance_interval=0,0.7")
    p.add_argument("checkpoint", help="run dir (latest checkpoint), checkpoint dir, or .safetensors file")
    p.add_argument("--num", type=int, default=80, help="number of samples")
    p.add_argument("--out", help="directory for samples.npz + samples.json (sharded, resumable, torchrun-aware)")
    p.add_argument("--grid", help="PNG path for a labelled grid of the first samples (at most 160)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--labels", default="balanced", choices=["balanced", "random"])
    p.add_argument("--weights", default="ema", choices=["ema", "model"])
    p.add_argument("--device")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_sample)

    p = sub.add_parser("info", help="show a checkpoint's config, step, parameters and routing")
    p.add_argument("checkpoint")
    p.add_argument("--weights", default="ema", choices=["ema", "model"])
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_info)

    p = sub.add_parser("convert-sit", help="turn an official SiT/DiT checkpoint into a dar weights file",
                       usage="dar convert-sit CHECKPOINT --arch ARCH --out FILE [options] [KEY=VALUE ...]",
                       epilog="KEY=VALUE sets the rest of the config stored with the weights, e.g. data.path=latents/")
    p.add_argument("checkpoint", help="e.g. SiT-XL-2-256x256.pt (a raw state dict, learn_sigma rows are dropped)")
    p.add_argument("--arch", required=True, choices=ARCH_NAMES)
    p.add_argument("--out", required=True, help=".safetensors file to write")
    p.add_argument("--preset", default="imagenet256-xl-residual", choices=sorted(PRESETS),
                   help="config the converted weights carry (data, sampler)")
    p.set_defaults(func=_convert_sit)

    for register in _module_commands():
        register(sub)
    return parser


def _module_commands():
    """Subcommands that live beside the code they drive."""
    from dar.bench import add_bench_parser
    from dar.diagnose_cli import add_diagnose_parser
    from dar.evaluate.cli import add_eval_parser
    from dar.experiment import add_experiment_parser

    return [add_eval_parser, add_diagnose_parser, add_bench_parser, add_experiment_parser]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # KEY=VALUE tokens are config overrides wherever they appear; everything else is an option.
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    parser = build_parser()
    args = parser.parse_args([a for a in argv if a not in overrides])
    args.overrides = overrides
    if overrides and args.command not in ("train", "sample", "convert-sit"):
        parser.error(f"`dar {args.command}` takes no KEY=VALUE overrides (got {overrides[0]})")
    from dar.checkpoint import CheckpointError
    from dar.train import TrainingDiverged

    try:
        return args.func(args)
    except (ValueError, CheckpointError, TrainingDiverged) as error:
        print(f"dar {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
