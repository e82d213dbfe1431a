"""``dar experiment``: run (or continue) a multi-variant, multi-seed study, then summarise and report it."""

from __future__ import annotations

import json
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("experiment", help="run (or continue) a multi-variant, multi-seed study")
    p.add_argument("config", help="experiment TOML (see configs/)")
    p.add_argument("--out", help="study directory (default runs/experiments/NAME)")
    p.add_argument("--summary", action="store_true", help="do not train; write OUT/summary.json from finished evals")
    p.add_argument("--report", action="store_true",
                   help="also draw OUT/report/: metric-vs-iteration curves, sample grids, Markdown tables")
    p.add_argument("--metric", default="eval/fd_fmnist", help="metric for the summary (lower is better)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from dar.study.experiment import load_experiment, run_experiment, summarize

    experiment = load_experiment(args.config)
    out = Path(args.out or f"runs/experiments/{experiment.name}")
    if not args.summary:
        run_experiment(args.config, out, progress=not args.no_progress)
    summary = summarize(args.config, out, args.metric)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if args.report:
        from dar.study.report import write_report

        for path in write_report(experiment, out, summary):
            print(f"wrote {path}")
    for group, table in summary["groups"].items():
        print(f"\n{group}: final {args.metric} (mean ± std over seeds)")
        for variant, row in table.items():
            mean, std = row["final_mean"], row["final_std"]
            line = f"  {variant:<16} {'—' if mean is None else f'{mean:.3f}'}"
            line += f" ± {std:.3f}" if std is not None else ""
            if row.get("speedup_mean") is not None:
                lo, hi = row["speedup_ci95"]
                line += (f"   speedup to baseline final: {row['speedup_mean']:.2f}x [{lo:.2f}, {hi:.2f}] "
                         f"(reached in {row['reached_baseline']} seeds)")
            if row["unfinished"]:
                line += "   unfinished: " + ", ".join(
                    f"seed {seed} ({'no eval' if step is None else f'step {step}'})"
                    for seed, step in row["unfinished"].items())
            print(line)
    print(f"\nwrote {out / 'summary.json'}")
    return 0
