"""``dar train``: train (or continue) a run from a preset and ``KEY=VALUE`` overrides."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dar.training.config import PRESETS

TAKES_OVERRIDES = True


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train (or continue) a run", formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="dar train [options] [KEY=VALUE ...]",
        epilog="KEY=VALUE overrides any config field, e.g. train.steps=500 model.routing.query=dynamic\n"
               "presets: " + ", ".join(PRESETS) + "\nA run dir with checkpoints is continued from its latest one.")
    p.add_argument("--preset", default="fmnist", choices=sorted(PRESETS))
    p.add_argument("--run-dir", help="output directory (default runs/PRESET)")
    p.add_argument("--resume", action="store_true", help="require an existing checkpoint to continue from")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run's records (metrics, config, grids) in a run dir without checkpoints")
    p.add_argument("--allow-data-change", action="store_true",
                   help="continue a run on data that differ from its checkpoint's (recorded in the run)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (plain log lines instead)")
    p.set_defaults(func=run)


def run(args) -> int:
    from dar.training.config import resolve
    from dar.training.trainer import train

    config = resolve(args.preset, args.overrides)
    run_dir = Path(args.run_dir or f"runs/{args.preset}")
    summary = train(config, run_dir, resume=args.resume, device=args.device, progress=not args.no_progress,
                    overwrite=args.overwrite, allow_data_change=args.allow_data_change)
    print(json.dumps(summary))
    return 0
