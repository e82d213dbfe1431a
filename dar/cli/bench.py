"""``dar bench``: residual vs DAR variants timed side by side, as ratios (see docs/PERFORMANCE.md)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dar.routing import BACKENDS


def add_parser(subparsers) -> None:
    from dar.study.bench import BENCH_PRESETS, DEFAULT_VARIANTS, VARIANTS

    p = subparsers.add_parser("bench", help="time residual vs DAR variants side by side")
    p.add_argument("--preset", default="cpu", choices=sorted(BENCH_PRESETS))
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help="comma-separated, from: " + ", ".join(VARIANTS) + " (default: residual and the DAR ones)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--sample-steps", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="torch.compile every model first")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="DAR aggregation implementation")
    p.add_argument("--batch", type=int, help="training batch (default: the preset's)")
    p.add_argument("--sample-batch", type=int, help="sampling batch (default: the preset's)")
    p.add_argument("--peak-tflops", type=float,
                   help="device peak for MFU (default: data-sheet bf16 peak of known GPUs when --precision bf16)")
    p.add_argument("--json", help="also write the full report here")
    p.set_defaults(func=run)


def run(args) -> int:
    from dar.study.bench import run_bench, to_markdown
    from dar.training.runtime import resolve_device

    resolve_device(args.device)
    report = run_bench(args.preset, [v for v in args.variants.split(",") if v], args.device, args.precision,
                       args.repeats, args.warmup, args.sample_steps, args.compile, args.backend,
                       batch=args.batch, sample_batch=args.sample_batch, peak_tflops=args.peak_tflops)
    print(to_markdown(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0
