"""``dar distill``: DMD2 distillation of a `dar train` teacher into a one- or few-step generator."""

from __future__ import annotations

import argparse
import json

TAKES_OVERRIDES = True


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "distill", help="distil a trained model into a one- or few-step generator (DMD2)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="dar distill --teacher RUN_OR_CHECKPOINT --run-dir RUN_DIR [options] [KEY=VALUE ...]",
        epilog="KEY=VALUE: distill.KEY=VALUE (e.g. distill.generator_steps=4 distill.steps=2000 distill.cfg_scale=1.5)\n"
               "and student.routing.KEY=VALUE (default: the teacher's routing), e.g. a DAR student from a residual\n"
               "teacher: student.routing.mode=dar student.routing.query=static_t student.routing.chunk_size=4\n"
               "student.routing.summary=sum. A run dir with checkpoints is continued from its latest one\n"
               "(--teacher may then be left out). docs/DISTILLATION.md lists every key.")
    p.add_argument("--teacher", help="the teacher: a `dar train` run dir (latest checkpoint), checkpoint dir or "
                                     ".safetensors file (required for a new run)")
    p.add_argument("--run-dir", required=True, help="output directory of the distillation run")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run's records (metrics, config, grids) in a run dir without checkpoints")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (plain log lines instead)")
    p.set_defaults(func=run)


def run(args) -> int:
    from dar.distillation import distill

    summary = distill(args.teacher, args.run_dir, args.overrides, device=args.device, progress=not args.no_progress,
                      overwrite=args.overwrite)
    print(json.dumps(summary))
    return 0
