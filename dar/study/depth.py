"""Does DAR's gain grow with depth? The depth study's numbers side by side with how strong the residual
stream's symptoms are at each depth (configs/depth_study.toml, docs/DIAGNOSTICS.md "Symptom strength vs
depth").

Two inputs, both files other commands write:

* ``dar experiment configs/depth_study.toml --out DIR --summary`` -> ``DIR/summary.json``
  (:func:`dar.study.experiment.summarize`): :func:`depth_scaling` turns its depth groups into one row
  per depth (paired final-FD gap, speedup and its bootstrap interval, which seeds reached the baseline);
* ``dar diagnose CKPT ... --out D`` -> ``D/report.json``: :func:`symptom_strengths` reduces each
  checkpoint's per-t curves to the three symptom strengths of docs/METHOD.md §7.

:func:`depth_figure` draws both against depth. Everything here reads plain dicts (the JSON files), so it
needs neither torch nor the runs themselves; ``scripts/depth_scaling.py`` is the command.
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter, NullLocator

SYMPTOMS = ("norm_growth", "gradient_ratio", "adjacent_cosine")

DEFINITIONS = {
    "z_k": "state leaving block k (k = 1..B), as in dar diagnose: forward_rms[k-1], backward_rms[k-1]; "
           "z_1 is block 1's output (not the embedding v_0), z_B the input of the final layer",
    "norm_growth": "RMS(z_B) / RMS(z_1) at each t of the report's grid, then the mean over t "
                   "(norm inflation: > 1 means the state grows with depth)",
    "gradient_ratio": "RMS(dL/dz_1) / RMS(dL/dz_B) at each t, then the mean over t (gradient decay: > 1 means "
                      "the gradient reaching a block's state shrinks with depth)",
    "adjacent_cosine": "cosine(z_k, z_k+1) averaged over k = 1..B-1 and over t (block redundancy: near 1 means "
                       "consecutive blocks barely turn the state)",
    "range": "[min, max] of the per-t value over the t grid",
    "at_overview_t": "the same three numbers at the report's overview t only (the t of docs/RESULTS.md §3's table)",
    "fd_gap": "final FD of the variant minus that seed's baseline final FD (negative: the variant is better)",
    "relative_gap_pct": "100 * fd_gap / the seed's baseline final FD, per seed; mean and std (ddof 1) over seeds",
    "speedup": "baseline's last evaluated step / the step at which the variant first reaches that seed's baseline "
               "final FD (from summary.json; mean over the seeds that reach it, percentile bootstrap interval)",
}
"""What every number of :func:`symptom_strengths` and :func:`depth_scaling` means (written into the JSON)."""


def _floats(values) -> np.ndarray:
    """A JSON list (``null`` for NaN, as ``dar diagnose`` writes it) as a float array."""
    return np.array([float("nan") if v is None else float(v) for v in values], dtype=float)


def _ratio(a: float, b: float) -> float:
    if b == 0:
        return float("nan") if a == 0 else math.copysign(float("inf"), a)
    return a / b


def _symptoms_at(point: dict) -> dict[str, float]:
    forward, backward = _floats(point["forward_rms"]), _floats(point["backward_rms"])
    cosine = _floats(point["cosine_next"])
    if not len(forward) or not len(backward):
        raise ValueError(f"t = {point.get('t')}: empty forward_rms / backward_rms")
    return {
        "norm_growth": _ratio(float(forward[-1]), float(forward[0])),
        "gradient_ratio": _ratio(float(backward[0]), float(backward[-1])),
        "adjacent_cosine": float(cosine.mean()) if len(cosine) else float("nan"),
    }


def symptom_strengths(report: dict, name: str | None = None, *, at_t: float | None = None) -> dict[str, dict]:
    """The residual stream's three symptom strengths for each checkpoint of a ``dar diagnose`` report.

    Returns ``{checkpoint name: {...}}`` (only ``name`` when given). The curves of the report are per
    block state z_k = h_(2k+1), k = 1..B (docs/DIAGNOSTICS.md), so "first" is z_1, block 1's output, and
    "last" z_B, the input of the final layer: the same end points as docs/RESULTS.md §3's
    "RMS(z_1) -> RMS(z_12)" table. At every t of the report's grid:

    * ``norm_growth`` = RMS(z_B) / RMS(z_1): norm inflation; > 1 when the state grows with depth
      (the paper's SiT-XL/2: 1576 / 15.5 ~ 100x);
    * ``gradient_ratio`` = RMS(dL/dz_1) / RMS(dL/dz_B), first over last. The loss gradient reaching a
      block's state is dL/dz_k; "gradient decay" is that it shrinks with depth k, so the ratio is
      written first / last to read like ``norm_growth``: > 1 is the symptom, and the larger the
      stronger. (In a residual stream dL/dz_1 = dL/dz_B plus every later block's contribution, so
      early states collect more gradient while late, inflated states get little: a deep block's
      output is a small perturbation of a large state and moves the loss little.)
    * ``adjacent_cosine`` = mean over k = 1..B-1 of cosine(z_k, z_k+1): block redundancy; near 1
      when consecutive blocks barely turn the state.

    The headline values are the (arithmetic) mean over the t grid of these per-t numbers; ``per_t``
    keeps each t, ``range`` the [min, max] over t, and ``at_overview_t`` the values at one t
    (``at_t``, nearest grid value; default the report's ``settings.overview_t``, else the grid's
    middle): that is the t of docs/RESULTS.md §3's table.
    """
    entries = report.get("checkpoints")
    if not entries:
        raise ValueError("the diagnose report has no 'checkpoints'")
    if name is not None:
        entries = [e for e in entries if e.get("name") == name]
        if not entries:
            names = [e.get("name") for e in report["checkpoints"]]
            raise ValueError(f"no checkpoint named {name!r} in the diagnose report (it has {names})")
    result = {}
    for entry in entries:
        label = entry.get("name", "?")
        per_t_points = entry.get("per_t")
        if not per_t_points:
            raise ValueError(f"checkpoint {label!r}: no 'per_t' measurements")
        try:
            values = [_symptoms_at(point) for point in per_t_points]
        except (KeyError, ValueError) as error:
            raise ValueError(f"checkpoint {label!r}: per_t lacks or has a bad field: {error}") from None
        grid = [float(point["t"]) for point in per_t_points]
        target = at_t if at_t is not None else report.get("settings", {}).get("overview_t")
        if target is None:
            target = grid[len(grid) // 2]
        index = min(range(len(grid)), key=lambda i: abs(grid[i] - target))
        per_t = {key: [v[key] for v in values] for key in SYMPTOMS}
        result[label] = {
            "num_blocks": entry.get("num_blocks", len(per_t_points[0]["forward_rms"])),
            "mode": (entry.get("routing_config") or {}).get("mode"),
            "routing": entry.get("routing"),
            "step": entry.get("step"),
            **{key: float(np.mean(per_t[key])) for key in SYMPTOMS},
            "t": grid,
            "per_t": per_t,
            "range": {key: [float(np.min(per_t[key])), float(np.max(per_t[key]))] for key in SYMPTOMS},
            "at_overview_t": {"t": grid[index], **values[index]},
        }
    return result


def residual_checkpoint(report: dict, name: str | None = None) -> str:
    """Name of the report's residual checkpoint: ``name`` if given (and present), else the one checkpoint
    with ``routing_config.mode == "residual"``."""
    entries = report.get("checkpoints") or []
    names = [e.get("name") for e in entries]
    if name is not None:
        if name not in names:
            raise ValueError(f"no checkpoint named {name!r} (it has {names})")
        return name
    residual = [e.get("name") for e in entries if (e.get("routing_config") or {}).get("mode") == "residual"]
    if not residual:
        raise ValueError(f"no residual checkpoint (routing_config.mode == 'residual') among {names}")
    if len(residual) > 1:
        raise ValueError(f"several residual checkpoints {residual}: choose one by name")
    return residual[0]


# ---------------------------------------------------------------------------------------------
# The study's summary -> one row per depth
# ---------------------------------------------------------------------------------------------


def _series(row: dict, seed) -> tuple[list, list]:
    """(steps, values) of one seed in a summary row; JSON turns the int seed keys into strings."""
    series = row.get("series", {})
    found = series.get(seed, series.get(str(seed)))
    return (list(found[0]), list(found[1])) if found else ([], [])


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def _finite_or_none(value):
    return None if value is None or not math.isfinite(value) else float(value)


def depth_row(summary: dict, depth: int, group: str, baseline: str = "residual", variant: str = "dynamic") -> dict:
    """One depth's row of :func:`depth_scaling` from the summary's ``group``."""
    groups = summary.get("groups", {})
    if group not in groups:
        raise KeyError(f"summary has no group {group!r} for depth {depth} (it has {sorted(groups)})")
    table = groups[group]
    for which in (baseline, variant):
        if which not in table:
            raise KeyError(f"summary group {group!r} has no variant {which!r} (it has {sorted(table)})")
    base, var = table[baseline], table[variant]
    if "speedup_per_seed" not in var:
        raise KeyError(f"summary group {group!r}: variant {variant!r} has no speedup_per_seed "
                       "(the group needs a baseline in the experiment file)")
    seeds = list(base.get("series", {}))
    seeds = [int(s) if isinstance(s, str) and s.lstrip("-").isdigit() else s for s in seeds]
    # summarize's per-seed lists hold the seeds where both variants have evaluations, in seed order
    paired = [s for s in seeds if _series(base, s)[1] and _series(var, s)[1]]
    speedups, reaches = var["speedup_per_seed"], var.get("iterations_to_baseline_final", [None] * len(paired))
    if len(speedups) != len(paired):
        raise ValueError(f"summary group {group!r}: {len(speedups)} speedups for the {len(paired)} seeds with "
                         f"evaluations of both {baseline!r} and {variant!r}")
    base_final = [float(_series(base, s)[1][-1]) for s in paired]
    var_final = [float(_series(var, s)[1][-1]) for s in paired]
    base_step = [_series(base, s)[0][-1] for s in paired]
    var_step = [_series(var, s)[0][-1] for s in paired]
    gaps = [v - b for v, b in zip(var_final, base_final)]
    relative = [100.0 * g / b for g, b in zip(gaps, base_final)]
    gap_mean, gap_std = _mean_std(gaps)
    rel_mean, rel_std = _mean_std(relative)
    speedup_per_seed = [_finite_or_none(s) for s in speedups]
    ci = var.get("speedup_ci95")
    return {
        "depth": depth,
        "group": group,
        "baseline": baseline,
        "variant": variant,
        "seeds": paired,
        "final_step": {"baseline": base_step, "variant": var_step},
        "steps_match": base_step == var_step,
        "baseline_final": base_final,
        "variant_final": var_final,
        "fd_gap_per_seed": gaps,
        "fd_gap_mean": gap_mean,
        "fd_gap_std": gap_std,
        "relative_gap_pct_per_seed": relative,
        "relative_gap_pct_mean": rel_mean,
        "relative_gap_pct_std": rel_std,
        "iterations_to_baseline_final": [_finite_or_none(r) for r in reaches],
        "speedup_per_seed": speedup_per_seed,
        "speedup_mean": var.get("speedup_mean"),
        "speedup_ci95": list(ci) if ci is not None else None,
        "reached_baseline_seeds": [s for s, v in zip(paired, speedup_per_seed) if v is not None],
        "reached_baseline": f"{sum(v is not None for v in speedup_per_seed)}/{len(paired)}",
    }


def depth_scaling(summary: dict, groups: dict[int, str], baseline: str = "residual",
                  variant: str = "dynamic") -> list[dict]:
    """One row per depth (ascending) of the ``variant``-vs-``baseline`` comparison in ``summary``
    (:func:`dar.study.experiment.summarize`'s dict or its ``summary.json``); ``groups`` maps depth ->
    group name, e.g. ``{6: "depth6", 12: "depth12", 24: "depth24"}``.

    Per row: the final-FD gap variant minus baseline, paired by seed (``fd_gap_per_seed``, mean, std
    with ddof 1), the same relative to the seed's baseline in % (``relative_gap_pct_*``), the speedup
    mean and bootstrap interval exactly as the summary stores them, per-seed speedups (``None``: never
    reached) and which seeds reached the baseline's final FD. Only seeds with evaluations of both
    variants count; ``steps_match`` is False when a seed's two runs end at different steps (an
    unfinished run), which makes its gap unfair.
    """
    return [depth_row(summary, depth, groups[depth], baseline, variant) for depth in sorted(groups)]


# ---------------------------------------------------------------------------------------------
# Figure
# ---------------------------------------------------------------------------------------------


def _depth_axis(ax, depths) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.xaxis.set_minor_locator(NullLocator())
    if depths:
        ax.set_xlim(min(depths) / 1.3, max(depths) * 1.3)
    ax.set_xlabel("depth (blocks)")
    ax.grid(alpha=0.3)


def _error(values, centre):
    """Asymmetric error bars [[below], [above]] of intervals ``values`` around ``centre``."""
    return np.array([[c - lo for (lo, _), c in zip(values, centre)], [hi - c for (_, hi), c in zip(values, centre)]])


def depth_figure(rows: list[dict], symptoms_by_depth: dict[int, dict] | None = None) -> Figure:
    """FD gap (%) and speedup vs depth (rows of :func:`depth_scaling`), and, when given, the residual
    model's symptom strengths vs depth (``{depth: one checkpoint's symptom_strengths entry}``): norm
    growth and gradient ratio on one log axis, adjacent cosine on its own. Depth on a log2 axis; the
    symptoms show their mean over t with the [min, max] over t as bars."""
    panels = 4 if symptoms_by_depth else 2
    figure = Figure(figsize=(4.0 * panels, 3.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, panels, squeeze=False)[0]
    depths = [row["depth"] for row in rows]
    variant = rows[0]["variant"] if rows else "variant"
    baseline = rows[0]["baseline"] if rows else "baseline"

    ax = axes[0]
    for row in rows:
        per_seed = row["relative_gap_pct_per_seed"]
        ax.scatter([row["depth"]] * len(per_seed), per_seed, color="C0", alpha=0.45, s=18, linewidths=0,
                   label="per seed" if row is rows[0] else None)
    means = [(row["depth"], row["relative_gap_pct_mean"], row["relative_gap_pct_std"] or 0.0)
             for row in rows if row["relative_gap_pct_mean"] is not None]
    if means:
        x, y, e = zip(*means)
        ax.errorbar(x, y, yerr=e, color="C0", marker="o", capsize=4, linewidth=1.5, label="mean ± std")
    ax.axhline(0.0, color="0.3", linewidth=0.8)
    ax.set_ylabel(f"final FD, {variant} − {baseline} (%)")
    ax.set_title("final-FD gap (below 0: DAR better)", fontsize=10)
    _depth_axis(ax, depths)
    ax.legend(fontsize=8)

    ax = axes[1]
    for row in rows:
        reached = [s for s in row["speedup_per_seed"] if s is not None]
        ax.scatter([row["depth"]] * len(reached), reached, color="C1", alpha=0.45, s=18, linewidths=0,
                   label="per seed" if row is rows[0] else None)
        ax.text(row["depth"], 0.02, f"{row['reached_baseline']} reached", transform=ax.get_xaxis_transform(),
                ha="center", va="bottom", fontsize=7, color="0.35")
    with_mean = [row for row in rows if row["speedup_mean"] is not None]
    if with_mean:
        x = [row["depth"] for row in with_mean]
        y = [row["speedup_mean"] for row in with_mean]
        ci = [row["speedup_ci95"] or (m, m) for row, m in zip(with_mean, y)]
        ax.errorbar(x, y, yerr=_error(ci, y), color="C1", marker="o", capsize=4, linewidth=1.5,
                    label="mean [bootstrap 95 %]")
    ax.axhline(1.0, color="0.3", linewidth=0.8)
    ax.margins(y=0.15)  # room for the "reached" labels under the 1x line
    ax.set_ylabel(f"speedup to {baseline}'s final FD (x)")
    ax.set_title("iterations saved", fontsize=10)
    _depth_axis(ax, depths)
    ax.legend(fontsize=8)

    if symptoms_by_depth:
        sym_depths = sorted(symptoms_by_depth)
        ax = axes[2]
        for key, label, colour in (("norm_growth", "norm growth RMS(z_B)/RMS(z_1)", "C3"),
                                   ("gradient_ratio", "gradient ratio RMS(dL/dz_1)/RMS(dL/dz_B)", "C2")):
            y = [symptoms_by_depth[d][key] for d in sym_depths]
            ranges = [symptoms_by_depth[d].get("range", {}).get(key, (v, v)) for d, v in zip(sym_depths, y)]
            ax.errorbar(sym_depths, y, yerr=_error(ranges, y), color=colour, marker="o", capsize=4,
                        linewidth=1.5, label=label)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))  # plain numbers, not 6x10^0
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        ax.axhline(1.0, color="0.3", linewidth=0.8)
        ax.set_ylabel("ratio (mean over t; bars: range over t)")
        ax.set_title(f"{baseline}: norm inflation, gradient decay", fontsize=10)
        _depth_axis(ax, sym_depths)
        ax.legend(fontsize=8)

        ax = axes[3]
        y = [symptoms_by_depth[d]["adjacent_cosine"] for d in sym_depths]
        ranges = [symptoms_by_depth[d].get("range", {}).get("adjacent_cosine", (v, v)) for d, v in zip(sym_depths, y)]
        ax.errorbar(sym_depths, y, yerr=_error(ranges, y), color="C4", marker="o", capsize=4, linewidth=1.5)
        ax.set_ylabel("mean cos(z_k, z_k+1)")
        ax.set_title(f"{baseline}: block redundancy", fontsize=10)
        _depth_axis(ax, sym_depths)
    return figure
