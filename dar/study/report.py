"""The report of a ``dar experiment`` study: metric-vs-iteration figures (per-seed curves, mean ± std),
final sample grids side by side, and Markdown tables, drawn from the runs' metrics.jsonl alone.

    OUT/report/curves_<group>.png    every periodic-evaluation metric against training iteration
    OUT/report/samples_<group>.png   the last EMA sample grid of each variant (first seed)
    OUT/report/report.md             final values, iterations to reach the baseline, speedups
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import imread

from dar.study.experiment import Experiment, eval_series, evaluated_to_the_end, run_dirs, run_steps

METRICS = {  # key -> (label, lower is better)
    "eval/fd_fmnist": ("FD (in-domain classifier features)", True),
    "eval/class_acc": ("class-conditional accuracy", False),
    "eval/precision": ("precision", False),
    "eval/recall": ("recall", False),
}


def _common_series(runs: list[tuple[np.ndarray, np.ndarray]]):
    """Steps every seed evaluated, and the [seed, step] matrix of values on them."""
    runs = [(s, v) for s, v in runs if len(v)]
    if not runs:
        return np.array([]), np.empty((0, 0))
    steps = sorted(set.intersection(*(set(s.tolist()) for s, _ in runs)))
    values = np.array([[dict(zip(s.tolist(), v))[step] for step in steps] for s, v in runs])
    return np.array(steps), values


def curves_figure(experiment: Experiment, out: Path, group, metrics=tuple(METRICS)) -> Figure:
    dirs, lengths = run_dirs(experiment, out), run_steps(experiment)
    figure = Figure(figsize=(4.2 * len(metrics), 3.4), layout="constrained")
    FigureCanvasAgg(figure)
    colours = colormaps["tab10"]
    for ax, key in zip(figure.subplots(1, len(metrics), squeeze=False)[0], metrics):
        for i, variant in enumerate(group.variants):
            series = [eval_series(dirs[group.name, variant, seed], key, lengths[group.name, variant, seed])
                      for seed in group.seeds]
            for steps, values in series:
                ax.plot(steps, values, color=colours(i), alpha=0.3, linewidth=0.8)
            # the mean is over finished runs: a run still training would cut it to its own length
            finished = [(s, v) for (s, v), seed in zip(series, group.seeds)
                        if evaluated_to_the_end(s, lengths[group.name, variant, seed])]
            steps, matrix = _common_series(finished)
            if len(steps):
                mean = matrix.mean(0)
                ax.plot(steps, mean, color=colours(i), linewidth=1.8, label=f"{variant} (n={len(matrix)})")
                if len(matrix) > 1:
                    std = matrix.std(0, ddof=1)
                    ax.fill_between(steps, mean - std, mean + std, color=colours(i), alpha=0.15, linewidth=0)
        ax.set_xlabel("training iteration")
        ax.set_title(METRICS.get(key, (key,))[0], fontsize=10)
        ax.grid(alpha=0.3)
    figure.axes[0].legend(fontsize=8)
    figure.suptitle(f"{experiment.name} / {group.name}: thin = one seed, thick = mean, band = ±1 std", fontsize=10)
    return figure


def last_grid(run: Path, until: int) -> Path | None:
    grids = [g for g in sorted((run / "samples").glob("step_*.png")) if int(g.stem.split("_")[1]) <= until]
    return grids[-1] if grids else None


def samples_figure(experiment: Experiment, out: Path, group) -> Figure | None:
    dirs, lengths = run_dirs(experiment, out), run_steps(experiment)
    first = group.seeds[0]
    grids = {v: last_grid(dirs[group.name, v, first], lengths[group.name, v, first]) for v in group.variants}
    grids = {v: g for v, g in grids.items() if g is not None}
    if not grids:
        return None
    figure = Figure(figsize=(3.6 * len(grids), 3.9), layout="constrained")
    FigureCanvasAgg(figure)
    for ax, (variant, grid) in zip(figure.subplots(1, len(grids), squeeze=False)[0], grids.items()):
        ax.imshow(imread(grid), cmap="gray")
        ax.set_title(f"{variant} ({grid.stem.replace('_', ' ')}, seed {group.seeds[0]})", fontsize=9)
        ax.axis("off")
    return figure


def _fmt(values, digits=2):
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def markdown_tables(experiment: Experiment, out: Path, summary: dict) -> str:
    dirs, lengths = run_dirs(experiment, out), run_steps(experiment)
    metric = summary["metric"]
    lines = []
    for group in experiment.groups:
        table = summary["groups"][group.name]
        lines += [f"### {group.name} (seeds {', '.join(map(str, group.seeds))})", ""]
        header = f"| variant | final {metric} | per seed | final class acc | iterations to baseline final | speedup [95% CI] |"
        lines += [header, "|" + "---|" * 6]
        for variant, row in table.items():
            accs = []
            for seed in row["seeds"]:
                _, values = eval_series(dirs[group.name, variant, seed], "eval/class_acc", lengths[group.name, variant, seed])
                if len(values):
                    accs.append(float(values[-1]))
            reach = "—"
            speedup = "—"
            if group.baseline and variant != group.baseline and row.get("iterations_to_baseline_final"):
                reach = ", ".join("never" if r is None else f"{r:.0f}"
                                  for r in row["iterations_to_baseline_final"])
                reach += f" ({row['reached_baseline']} seeds)"
                if row.get("speedup_mean") is not None:
                    lo, hi = row["speedup_ci95"]
                    speedup = f"{row['speedup_mean']:.2f}x [{lo:.2f}, {hi:.2f}]"
            name = f"{variant} (baseline)" if variant == group.baseline else variant
            per_seed = ", ".join(f"{v:.2f}" for v in row["final"]) or "—"
            if len(row["seeds"]) < len(group.seeds):
                per_seed += f" (seeds {', '.join(map(str, row['seeds'])) or 'none'})"
            lines.append(f"| {name} | {_fmt(row['final'])} | {per_seed} "
                         f"| {_fmt(accs, 3)} | {reach} | {speedup} |")
        unfinished = [f"{variant} seed {seed} ({'no evaluation yet' if step is None else f'at step {step}'})"
                      for variant, row in table.items() for seed, step in row["unfinished"].items()]
        if unfinished:
            lines += ["", "Not finished, left out of the table: " + "; ".join(unfinished) + "."]
        lines.append("")
    return "\n".join(lines)


def write_report(experiment: Experiment, out: str | Path, summary: dict) -> list[Path]:
    out = Path(out)
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    written = []
    for group in experiment.groups:
        figures = {f"curves_{group.name}.png": curves_figure(experiment, out, group),
                   f"samples_{group.name}.png": samples_figure(experiment, out, group)}
        for name, figure in figures.items():
            if figure is not None:
                figure.savefig(report / name, dpi=110)
                written.append(report / name)
    (report / "report.md").write_text(
        f"# {experiment.name}\n\nMetric: `{summary['metric']}` (lower is better). Speedup = the baseline's last "
        "evaluated iteration / the iteration at which the variant first reaches the baseline's final "
        "value (linear interpolation between the two evaluations around the crossing), per seed against "
        "the same seed's baseline; the interval is a percentile bootstrap over seeds that reached it.\n\n"
        + markdown_tables(experiment, out, summary))
    written.append(report / "report.md")
    return written
