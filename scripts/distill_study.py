"""The distillation study on the built-in data: residual vs DAR student, one-step and 4-step generators,
3 seeds, all distilled from one `dar train` teacher, with the teacher's own quality at 10/25/50 ODE steps.

Every run is a `dar distill` run directory under OUT/runs/, so rerunning the script continues where it
stopped (a run interrupted before its first checkpoint starts again). `--summary` trains nothing and
writes OUT/summary.json: per run the FD-FMNIST / class-accuracy series of its periodic evaluations (500
samples, fixed noise and labels), the final values, whether any logged loss was not finite, and per
(student, steps) the mean and std over seeds; plus the teacher evaluated with the same evaluation at
Euler 10/25/50 steps (its record: file and weights hash).

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
    """The teacher at Euler 10/25/50 steps (no guidance), with the evaluation the runs use."""
    from dar.diffusion.samplers import SamplerConfig
    from dar.training.checkpoint import load_model, weights_file
    from dar.training.monitors import PeriodicEval
    from dar.training.runtime import Distributed
    from dar.provenance import weights_sha256

    model, config, step = load_model(teacher)
    env = Distributed("cpu")
    try:
        rows = {}
        for steps in TEACHER_ODE_STEPS:
            evaluated = replace(config, sampler=SamplerConfig(method="euler", steps=steps),
                                train=replace(config.train, eval_samples=500, seed=0))
            rows[f"euler-{steps}"] = PeriodicEval(evaluated, env)(model)
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
        per_run[name] = {"steps": steps, "fd": fd, "class_acc": accuracy, "diverged": diverged(run),
                         "final_fd": fd[-1] if fd else None, "final_class_acc": accuracy[-1] if accuracy else None}
        if fd:
            groups.setdefault(name.rsplit("-seed", 1)[0], []).append((fd[-1], accuracy[-1]))
    table = {key: {"seeds": len(v), "fd_mean": float(np.mean([f for f, _ in v])),
                   "fd_std": float(np.std([f for f, _ in v], ddof=1)) if len(v) > 1 else None,
                   "class_acc_mean": float(np.mean([a for _, a in v]))} for key, v in groups.items()}
    summary = {"command": sys.argv, "teacher": teacher_quality(teacher), "common_overrides": COMMON,
               "students": STUDENTS, "runs": per_run, "table": table, "versions": package_versions()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


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
        table = summarize(teacher, out, seeds)["table"]
        print(json.dumps(table, indent=2))
    else:
        train_all(teacher, out, seeds, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
