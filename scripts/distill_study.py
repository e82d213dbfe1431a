"""The distillation study on the built-in data: residual vs DAR student, one-step and 4-step generators,
3 seeds, all distilled from one `dar train` teacher, with the teacher's own quality at 10/25/50 ODE steps.

Every run is a `dar distill` run directory under OUT/runs/, so rerunning the script continues where it
stopped (a run interrupted before its first checkpoint starts again). `--summary` trains nothing and
writes OUT/summary.json, OUT/curves.png, OUT/losses.png and OUT/samples.png: per run the FD-FMNIST / class-accuracy / recall
series of its periodic evaluations (500 samples, fixed noise and labels), the final values, whether any logged loss was not finite, and per
(student, steps) the mean and std over seeds; plus the teacher evaluated with the same evaluation at
Euler 10/25/50 steps without and with the real score's guidance (its record: file and weights hash).

Run from the repository root, after the main study's residual seed-0 run exists (the default teacher):

    python scripts/distill_study.py --out runs/experiments/fmnist-distill
    python scripts/distill_study.py --out runs/experiments/fmnist-distill --summary

Cost on 2 CPU cores: 12 runs of 1,000 steps (one-step ~4 min, 4-step ~5 min, plus 4 evaluations each).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

STUDENTS = {
    "residual": [],
    "dar": ["student.routing.mode=dar", "student.routing.query=static_t", "student.routing.chunk_size=4",
            "student.routing.summary=sum"],
}
GENERATOR_STEPS = (1, 4)
COMMON = ["distill.steps=1000", "distill.eval_every=250", "distill.eval_samples=500", "distill.sample_every=500",
          "distill.ckpt_every=250"]
TEACHER_ODE_STEPS = (10, 25, 50)


def runs(seeds: list[int]) -> dict[str, list[str]]:
    """Run name -> its overrides; seeds outermost, so a study cut short has every comparison at seed 0."""
    return {f"{student}-{steps}step-seed{seed}": [*COMMON, f"distill.generator_steps={steps}", f"distill.seed={seed}",
                                                   *overrides]
            for seed in seeds for student, overrides in STUDENTS.items() for steps in GENERATOR_STEPS}


def train_all(teacher: Path, out: Path, seeds: list[int], progress: bool) -> None:
    from dar.distillation import distill

    for name, overrides in runs(seeds).items():
        print(f"[distill study] {name}", flush=True)
        # the directory is this run's own: records without a checkpoint are an interrupted start of it
        distill(teacher, out / "runs" / name, overrides, progress=progress, overwrite=True)


def series(run: Path, key: str) -> tuple[list[int], list[float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    points = [(r["step"], r[key]) for r in records if key in r]
    return [s for s, _ in points], [v for _, v in points]


def diverged(run: Path) -> bool:
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if any(isinstance(v, float) and not math.isfinite(v) for v in record.values()):
            return True
    return False


def teacher_quality(teacher: Path) -> dict:
    """The teacher at Euler 10/25/50 steps, without guidance and with the real score's guidance (the
    distillation's default cfg_scale, what the generators are trained to match), evaluated as the runs are."""
    from dar.distillation.config import DistillConfig
    from dar.diffusion.samplers import SamplerConfig
    from dar.training.checkpoint import load_model, weights_file
    from dar.training.monitors import PeriodicEval
    from dar.training.runtime import Distributed
    from dar.provenance import weights_sha256

    model, config, step = load_model(teacher)
    env = Distributed("cpu")
    try:
        rows = {}
        for cfg in sorted({1.0, DistillConfig().cfg_scale}):
            for steps in TEACHER_ODE_STEPS:
                evaluated = replace(config, sampler=SamplerConfig(method="euler", steps=steps, cfg_scale=cfg),
                                    train=replace(config.train, eval_samples=500, seed=0))
                rows[f"euler-{steps}" + ("" if cfg == 1.0 else f"-cfg{cfg:g}")] = PeriodicEval(evaluated, env)(model)
    finally:
        env.close()
    file = weights_file(teacher)
    return {"file": str(file), "weights_sha256": weights_sha256(file), "step": step, "evaluations": rows}


def summarize(teacher: Path, out: Path, seeds: list[int]) -> dict:
    from dar.provenance import package_versions

    per_run, groups = {}, {}
    for name in runs(seeds):
        run = out / "runs" / name
        if not (run / "metrics.jsonl").exists():
            continue
        steps, fd = series(run, "eval/fd_fmnist")
        _, accuracy = series(run, "eval/class_acc")
        _, recall = series(run, "eval/recall")
        per_run[name] = {"steps": steps, "fd": fd, "class_acc": accuracy, "recall": recall, "diverged": diverged(run),
                         "final_fd": fd[-1] if fd else None, "final_class_acc": accuracy[-1] if accuracy else None,
                         "final_recall": recall[-1] if recall else None}
        if fd:
            groups.setdefault(name.rsplit("-seed", 1)[0], []).append((fd[-1], accuracy[-1], recall[-1]))
    table = {key: {"seeds": len(v), "fd_mean": float(np.mean([f for f, _, _ in v])),
                   "fd_std": float(np.std([f for f, _, _ in v], ddof=1)) if len(v) > 1 else None,
                   "class_acc_mean": float(np.mean([a for _, a, _ in v])),
                   "recall_mean": float(np.mean([r for _, _, r in v]))} for key, v in groups.items()}
    summary = {"command": sys.argv, "teacher": teacher_quality(teacher), "common_overrides": COMMON,
               "students": STUDENTS, "runs": per_run, "table": table, "versions": package_versions()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def figures(summary: dict, teacher: Path, out: Path, seeds: list[int]) -> list[Path]:
    """OUT/curves.png: FD and class accuracy against distillation step, per seed (thin) and mean (thick),
    the teacher's Euler 10-step values as dashed lines; OUT/losses.png: every run's logged losses;
    OUT/samples.png: the last EMA grid of every
    (student, steps) at the first seed beside the teacher's last training grid (same class rows)."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.image import imread

    kinds = list(dict.fromkeys(name.rsplit("-seed", 1)[0] for name in runs(seeds)))
    figure = Figure(figsize=(10, 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    colours = colormaps["tab10"]
    teacher_rows = summary["teacher"]["evaluations"]
    for ax, (key, label) in zip(figure.subplots(1, 2), (("fd", "FD-FMNIST"), ("class_acc", "class accuracy"))):
        for i, kind in enumerate(kinds):
            curves = [summary["runs"][f"{kind}-seed{seed}"] for seed in seeds if f"{kind}-seed{seed}" in summary["runs"]]
            for curve in curves:
                ax.plot(curve["steps"], curve[key], color=colours(i), alpha=0.3, linewidth=0.8)
            common = [c for c in curves if c["steps"] == curves[0]["steps"]] if curves else []
            if common:
                ax.plot(common[0]["steps"], np.mean([c[key] for c in common], 0), color=colours(i), linewidth=1.8,
                        label=f"{kind} (n={len(common)})")
        metric = "eval/fd_fmnist" if key == "fd" else "eval/class_acc"
        for j, (row, style) in enumerate((("euler-10", ":"), ("euler-10-cfg1.5", "--"))):
            if row in teacher_rows:
                ax.axhline(teacher_rows[row][metric], color="black", linestyle=style, linewidth=1,
                           label=f"teacher, {row} (NFE {teacher_rows[row]['eval/nfe']})")
        ax.set_xlabel("distillation step")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    figure.axes[0].legend(fontsize=7)
    written = [out / "curves.png"]
    figure.savefig(written[0], dpi=110)

    # stability: every run's logged losses (the fake score's denoising loss, the generator's DM loss)
    figure = Figure(figsize=(10, 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    for ax, (key, label) in zip(figure.subplots(1, 2), (("fake_loss", "fake-score loss"),
                                                         ("generator_loss", "generator (DM) loss"))):
        for i, kind in enumerate(kinds):
            for j, seed in enumerate(seeds):
                run = out / "runs" / f"{kind}-seed{seed}"
                if (run / "metrics.jsonl").exists():
                    steps, values = series(run, key)
                    ax.plot(steps, values, color=colours(i), alpha=0.8, linewidth=0.8,
                            label=kind if j == 0 else None)
        ax.set_xlabel("distillation step")
        ax.set_title(f"{label}, every run", fontsize=10)
        ax.grid(alpha=0.3)
    figure.axes[0].legend(fontsize=7)
    written.append(out / "losses.png")
    figure.savefig(written[-1], dpi=110)

    panels = [("teacher (Euler 10, no guidance)", sorted((teacher / "samples").glob("step_*.png")))]
    panels += [(f"{kind} (seed {seeds[0]})", sorted((out / "runs" / f"{kind}-seed{seeds[0]}" / "samples").glob("step_*.png")))
               for kind in kinds]
    panels = [(title, files[-1]) for title, files in panels if files]
    if panels:
        figure = Figure(figsize=(3.2 * len(panels), 3.6), layout="constrained")
        FigureCanvasAgg(figure)
        for ax, (title, file) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
            ax.imshow(imread(file), cmap="gray")
            ax.set_title(f"{title}\n{file.stem}", fontsize=8)
            ax.axis("off")
        written.append(out / "samples.png")
        figure.savefig(written[-1], dpi=110)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="runs/experiments/fmnist-study/runs/9681b8b91340",
                        help="a `dar train` run (default: the main study's residual run, seed 0)")
    parser.add_argument("--out", default="runs/experiments/fmnist-distill")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--summary", action="store_true", help="train nothing; write OUT/summary.json")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    teacher, out = Path(args.teacher), Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not teacher.exists():
        parser.error(f"teacher {teacher} does not exist: train it first (docs/RESULTS.md has the main study's "
                     "command) or give --teacher")
    if args.summary:
        summary = summarize(teacher, out, seeds)
        print(json.dumps(summary["table"], indent=2))
        for path in figures(summary, teacher, out, seeds):
            print(f"wrote {path}")
    else:
        train_all(teacher, out, seeds, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
