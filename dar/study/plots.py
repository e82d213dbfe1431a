"""Figures of ``dar diagnose``, drawn from its JSON report alone (so they can be redrawn from the file).

Figures are plain :class:`matplotlib.figure.Figure` objects on an Agg canvas: no pyplot state, no
display, safe to call from a training job or a notebook without changing its backend.

    overview.png                  the paper's layout at one t: forward / backward magnitude, redundancy;
                                  every checkpoint overlaid
    symptoms_<name>.png           the same three panels for one checkpoint, one curve per t
    routing_by_t_<name>.png       DAR: alpha_{i->l}(t) heatmaps (source x t) for the chosen sublayers
    routing_by_layer_<name>.png   DAR: alpha_{i->l} as (source x layer) maps, one per t
    importance_<name>.png         residual: dL/dg_{i->l} as (source x layer) maps, one per t
    importance_normalised_<name>.png   the same, each layer divided by its total |dL/dg|
    probe.png                     held-out R^2 of the timestep probe per sublayer, every checkpoint
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from dar.study.diagnostics import sublayer_label

MASKED_COLOUR = "0.85"  # cells outside a layer's source set
PANELS_PER_ROW = 4
T_CONVENTION = "t = 0 noise, t = 1 data"


def slug(name: str) -> str:
    """A file-name-safe version of a checkpoint name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "checkpoint"


def write_figures(report: dict, out_dir: str | Path) -> list[Path]:
    """Draw every figure of ``report`` (the ``dar diagnose`` JSON) into ``out_dir``; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {"overview.png": overview_figure(report)}
    for entry in report["checkpoints"]:
        name = slug(entry["name"])
        figures[f"symptoms_{name}.png"] = symptoms_figure(entry)
        if entry["routing"] == "residual":
            figures[f"importance_{name}.png"] = importance_figure(entry, normalised=False)
            figures[f"importance_normalised_{name}.png"] = importance_figure(entry, normalised=True)
        elif entry["routing"].startswith("dar-"):
            figures[f"routing_by_t_{name}.png"] = routing_by_t_figure(entry)
            figures[f"routing_by_layer_{name}.png"] = routing_by_layer_figure(entry)
    figures["probe.png"] = probe_figure(report)
    paths = []
    for file, figure in figures.items():
        FigureCanvasAgg(figure).print_png(out_dir / file)
        paths.append(out_dir / file)
    return paths


def _values(rows) -> np.ndarray:
    """JSON lists (None = masked) -> float array with NaN."""
    return np.array(rows, dtype=float)


def _blocks(values) -> np.ndarray:
    return np.arange(1, len(values) + 1)


def _symptom_axes(figure: Figure):
    forward, backward, redundancy = figure.subplots(1, 3)
    forward.set(yscale="log", xlabel="block k", ylabel=r"RMS($z_k$)  (activation units, log scale)",
                title="Forward magnitude")
    backward.set(yscale="log", xlabel="block k", ylabel=r"RMS($\partial L / \partial z_k$)  (per sample, log scale)",
                 title="Backward magnitude")
    redundancy.set(xlabel=r"block k  (pair $z_k$, $z_{k+1}$)", ylabel=r"cosine($z_k$, $z_{k+1}$), token mean",
                   title="Redundancy")
    for ax in (forward, backward, redundancy):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3, which="both")
    return forward, backward, redundancy


def _plot_symptoms(axes, at_t: dict, **style) -> None:
    forward, backward, redundancy = axes
    forward.plot(_blocks(at_t["forward_rms"]), at_t["forward_rms"], **style)
    backward.plot(_blocks(at_t["backward_rms"]), at_t["backward_rms"], **style)
    redundancy.plot(_blocks(at_t["cosine_next"]), at_t["cosine_next"], **style)


def overview_figure(report: dict) -> Figure:
    """The paper's three-panel figure at the overview t, every checkpoint overlaid."""
    t = report["settings"]["overview_t"]
    figure = Figure(figsize=(15, 4.4), layout="constrained")
    axes = _symptom_axes(figure)
    colours = colormaps["tab10"]
    for n, entry in enumerate(report["checkpoints"]):
        at_t = next(p for p in entry["per_t"] if p["t"] == t)
        _plot_symptoms(axes, at_t, color=colours(n % 10), marker="o", markersize=3, label=entry["name"])
    axes[0].legend(fontsize=8)
    figure.suptitle(f"Depth-stream symptoms at t = {t:g} ({T_CONVENTION}); "
                    f"batch {report['settings']['batch']}, z_k = state leaving block k")
    return figure


def _t_colours(t_values):
    norm = Normalize(min(t_values), max(t_values) if max(t_values) > min(t_values) else min(t_values) + 1)
    return ScalarMappable(norm=norm, cmap=colormaps["viridis"])


def symptoms_figure(entry: dict) -> Figure:
    """The three symptoms for one checkpoint, one curve per t, coloured by t."""
    figure = Figure(figsize=(15.5, 4.4), layout="constrained")
    axes = _symptom_axes(figure)
    t_values = [p["t"] for p in entry["per_t"]]
    mappable = _t_colours(t_values)
    for at_t in entry["per_t"]:
        _plot_symptoms(axes, at_t, color=mappable.to_rgba(at_t["t"]), marker="o", markersize=2.5)
    figure.colorbar(mappable, ax=list(axes), label=f"t  ({T_CONVENTION})", pad=0.01)
    figure.suptitle(f"{entry['name']}: depth-stream symptoms across t")
    return figure


def _panel_grid(figure: Figure, count: int) -> list:
    columns = min(PANELS_PER_ROW, count)
    grid = figure.subplots(math.ceil(count / columns), columns, squeeze=False).ravel()
    for ax in grid[count:]:
        ax.set_visible(False)
    return list(grid[:count])


def _depth_ticks(count: int, first: int, final_label: str | None = None, max_ticks: int = 12):
    """Positions and labels for ``count`` consecutive indices starting at ``first``; the last one can
    carry a name (the final layer)."""
    positions = np.arange(first, first + count)
    step = max(1, math.ceil(count / max_ticks))
    chosen = [int(p) for p in positions[::step]]
    if chosen[-1] != positions[-1]:  # always label the last index (the final layer)
        if positions[-1] - chosen[-1] < step / 2:
            chosen.pop()  # its label would overlap the last one
        chosen.append(int(positions[-1]))
    labels = [str(p) for p in chosen]
    if final_label is not None:
        labels[-1] = final_label
    return chosen, labels


def _source_layer_map(ax, matrix: np.ndarray, cmap, norm, title: str):
    """A [source i = 0..L, layer l = 1..L+1] map; NaN cells (not a source of that layer) in grey."""
    sources, layers = matrix.shape
    image = ax.pcolormesh(np.arange(layers + 1) + 0.5, np.arange(sources + 1) - 0.5, np.ma.masked_invalid(matrix),
                          cmap=colormaps[cmap].with_extremes(bad=MASKED_COLOUR), norm=norm)
    ax.set_xticks(*_depth_ticks(layers, 1, final_label="final"))
    ax.set_yticks(*_depth_ticks(sources, 0))
    ax.set(xlabel="layer l (sublayer reading; final = final layer)", ylabel=r"source $v_i$, index i", title=title)
    return image


def routing_by_layer_figure(entry: dict) -> Figure:
    """alpha_{i->l}, one (source x layer) map per t; grey = v_i not in S_l."""
    per_t = entry["per_t"]
    maps = [_values(p["routing_alpha"]) for p in per_t]
    norm = Normalize(0.0, max(np.nanmax(m) for m in maps))
    figure = Figure(figsize=(4.2 * min(PANELS_PER_ROW, len(maps)) + 1, 3.9 * math.ceil(len(maps) / PANELS_PER_ROW)),
                    layout="constrained")
    axes = _panel_grid(figure, len(maps))
    for ax, matrix, at_t in zip(axes, maps, per_t):
        image = _source_layer_map(ax, matrix, "viridis", norm, f"t = {at_t['t']:g}")
    figure.colorbar(image, ax=axes, label=r"$\alpha_{i\rightarrow l}$ (mean over batch and tokens)")
    figure.suptitle(f"{entry['name']}: routing weights per layer ({T_CONVENTION}); grey: source not in $S_l$")
    return figure


def routing_by_t_figure(entry: dict) -> Figure:
    """alpha_{i->l}(t) for the chosen sublayers: rows = the sources in S_l, columns = t."""
    per_t, layers = entry["per_t"], entry["routing_layers"]
    tables = np.stack([_values(p["routing_alpha"]) for p in per_t])  # [t, source, layer]
    norm = Normalize(0.0, max(np.nanmax(tables[:, :, l - 1]) for l in layers))
    figure = Figure(figsize=(4.0 * min(PANELS_PER_ROW, len(layers)) + 1, 4.2 * math.ceil(len(layers) / PANELS_PER_ROW)),
                    layout="constrained")
    axes = _panel_grid(figure, len(layers))
    t_labels = [f"{p['t']:.2g}" for p in per_t]
    for ax, layer in zip(axes, layers):
        sources = entry["source_sets"][layer - 1]
        alpha = tables[:, sources, layer - 1].T  # [source, t]
        image = ax.pcolormesh(alpha, cmap=colormaps["viridis"], norm=norm)
        ax.set_xticks(np.arange(len(t_labels)) + 0.5, t_labels, rotation=90 if len(t_labels) > 6 else 0)
        ax.set_yticks(np.arange(len(sources)) + 0.5, [f"$v_{{{i}}}$" for i in sources])
        label = sublayer_label(layer, entry["num_sublayers"])
        ax.set(xlabel=f"t  ({T_CONVENTION})", ylabel="source", title=f"input of layer {label}")
    figure.colorbar(image, ax=axes, label=r"$\alpha_{i\rightarrow l}(t)$ (mean over batch and tokens)")
    figure.suptitle(f"{entry['name']}: routing weights across t")
    return figure


def importance_figure(entry: dict, normalised: bool) -> Figure:
    """Residual models: dL/dg_{i->l} per t. Red: the loss grows with more of v_i in h_l; blue: it falls."""
    key = "gate_gradient_normalised" if normalised else "gate_gradient"
    per_t = entry["per_t"]
    maps = [_values(p[key]) for p in per_t]
    width = 4.2 * min(PANELS_PER_ROW, len(maps)) + (1 if normalised else 2.5)
    figure = Figure(figsize=(width, 3.9 * math.ceil(len(maps) / PANELS_PER_ROW)), layout="constrained")
    axes = _panel_grid(figure, len(maps))
    for ax, matrix, at_t in zip(axes, maps, per_t):
        # raw gradients span orders of magnitude across t, so each raw panel gets its own symmetric scale
        limit = 1.0 if normalised else max(float(np.nanmax(np.abs(matrix))), 1e-30)
        image = _source_layer_map(ax, matrix, "RdBu_r", Normalize(-limit, limit), f"t = {at_t['t']:g}")
        if not normalised:
            figure.colorbar(image, ax=ax, label=r"$\partial L/\partial g_{i\rightarrow l}$ per sample")
    if normalised:
        figure.colorbar(image, ax=axes, label=r"$\partial L/\partial g_{i\rightarrow l}$ / "
                                              r"$\sum_i |\partial L/\partial g_{i\rightarrow l}|$")
    what = "share of the layer's total |dL/dg|" if normalised else "per sample"
    figure.suptitle(f"{entry['name']}: counterfactual source importance $\\partial L/\\partial g_{{i\\rightarrow l}}$ "
                    f"({what}); red: the loss rises if layer l reads more of $v_i$; {T_CONVENTION}")
    return figure


def probe_figure(report: dict) -> Figure:
    """Held-out R^2 of the ridge probe t <- mean-pooled h_l, per sublayer, every checkpoint."""
    figure = Figure(figsize=(9, 4.4), layout="constrained")
    ax = figure.subplots()
    colours = colormaps["tab10"]
    lowest = 0.0
    for n, entry in enumerate(report["checkpoints"]):
        r2 = _values(entry["probe_r2"])
        ax.plot(np.arange(1, len(r2) + 1), r2, color=colours(n % 10), marker="o", markersize=3, label=entry["name"])
        lowest = min(lowest, float(np.nanmin(r2)))
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    ax.set_ylim(lowest - 0.05, 1.05)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="sublayer l whose input $h_l$ is probed (last point = input of the final layer)",
           ylabel="held-out $R^2$ (1 = t read out exactly)",
           title=f"Timestep probe: ridge regression of t from token-mean $h_l$ "
                 f"({report['settings']['probe']['samples']} samples, t ~ U(0, 1))")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return figure
