"""``dar diagnose``: the paper's depth-stream diagnostics for one or more checkpoints, as PNG figures
and one JSON report of every number (see docs/DIAGNOSTICS.md)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from dar.data import SPLITS

EPILOG = """examples:
  dar diagnose runs/fmnist-residual runs/fmnist --out runs/diag/fmnist
  dar diagnose runs/a runs/b --names residual,dar --t 0.1,0.5,0.9 --batch 32 --out runs/diag/ab
  dar diagnose runs/xl --device cuda --batch 16 --num-t 4 --layers 14,28,final --out runs/diag/xl

t = 0 is noise and t = 1 data (SiT's convention). The figures are drawn from report.json alone."""


def _float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one value")
    return values


def _text_list(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(","))
    if not all(values):
        raise argparse.ArgumentTypeError(f"empty item in {text!r}")
    return values


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "diagnose", help="forward/backward magnitude, redundancy, routing maps and a timestep probe per checkpoint",
        usage="dar diagnose CKPT [CKPT ...] --out DIR [options]", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", metavar="CKPT",
                   help="run dir (latest checkpoint), checkpoint dir, or .safetensors file")
    p.add_argument("--out", required=True, help="directory for the PNG figures and report.json")
    grid = p.add_mutually_exclusive_group()
    grid.add_argument("--t", type=_float_list, help="comma-separated noise levels in [0, 1]")
    grid.add_argument("--num-t", type=int, default=8, help="number of evenly spaced t in [0.02, 0.98] (default 8)")
    p.add_argument("--overview-t", type=float,
                   help="t of the overview figure (nearest grid value; default the middle of the grid)")
    p.add_argument("--batch", type=int, default=64, help="fixed evaluation batch size (default 64)")
    p.add_argument("--probe-samples", type=int, default=512, help="samples of the timestep probe (default 512)")
    p.add_argument("--split", choices=SPLITS, help="data split (default: test when the dataset has one, else train)")
    p.add_argument("--layers", type=_text_list,
                   help="sublayers for the routing-vs-t heatmaps, 1-based, 'final' = final aggregator "
                        "(default: 1/4, 1/2, 3/4 of the depth and final)")
    p.add_argument("--names", type=_text_list, help="comma-separated legend names, one per checkpoint")
    p.add_argument("--weights", default="ema", choices=["ema", "model"])
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="fixes the evaluation batch, its noise and the probe data")
    p.set_defaults(func=run)


def checkpoint_record(path: str, which: str, run_config, step: int) -> dict:
    """Where a checkpoint came from and what it is: path, weights file and its SHA-256, config."""
    from dar.training.checkpoint import resolve_checkpoint
    from dar.provenance import weights_sha256

    resolved = resolve_checkpoint(path)
    weights = resolved if resolved.is_file() else resolved / f"{which}.safetensors"
    checkpoint_dir = weights.parent
    run_dir = checkpoint_dir.parent.parent if checkpoint_dir.parent.name == "checkpoints" else checkpoint_dir
    return {
        "path": str(path),
        "run_dir": str(run_dir),
        "weights_file": str(weights),
        "weights_sha256": weights_sha256(weights),
        "weights": which,
        "step": step,
        "arch": run_config.model.arch,
        "routing": run_config.model.routing.describe,
        "routing_config": dataclasses.asdict(run_config.model.routing),
        "data": dataclasses.asdict(run_config.data),
        "transport_path": run_config.transport_path,
    }


def default_name(record: dict) -> str:
    return f"{Path(record['run_dir']).name} ({record['routing']}, step {record['step']})"


def run(args) -> int:
    from dar.provenance import package_versions
    from dar.training.checkpoint import load_model
    from dar.training.runtime import resolve_device
    from dar.study.diagnostics import DiagnoseSettings, diagnose_model, make_t_grid, settings_record
    from dar.study.plots import write_figures

    if args.names is not None and len(args.names) != len(args.checkpoints):
        raise ValueError(f"--names gives {len(args.names)} names for {len(args.checkpoints)} checkpoints")
    settings = DiagnoseSettings(t_grid=args.t or make_t_grid(args.num_t), batch=args.batch,
                                probe_samples=args.probe_samples, split=args.split, seed=args.seed, layers=args.layers)
    grid = settings.t_grid
    overview_t = grid[len(grid) // 2] if args.overview_t is None else min(grid, key=lambda t: abs(t - args.overview_t))
    device = str(resolve_device(args.device))

    entries = []
    for n, path in enumerate(args.checkpoints):
        model, run_config, step = load_model(path, which=args.weights, device=device)
        record = checkpoint_record(path, args.weights, run_config, step)
        name = args.names[n] if args.names else default_name(record)
        started = time.perf_counter()
        results = diagnose_model(model, run_config, settings)
        seconds = time.perf_counter() - started
        print(f"{name}: {len(grid)} t values, batch {settings.batch}, {seconds:.1f} s")
        entries.append({"name": name, **record, "seconds": round(seconds, 2), **results})
        del model
    names = [e["name"] for e in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"checkpoint names must be unique (figures are named after them), got {names}; use --names")

    report = {
        "command": "dar diagnose",
        "versions": package_versions(),
        "settings": {**settings_record(settings), "overview_t": overview_t, "device": device},
        "checkpoints": entries,
    }
    out = Path(args.out)
    figures = write_figures(report, out)
    report["figures"] = [p.name for p in figures]
    (out / "report.json").write_text(json.dumps(report, indent=1))
    _print_summary(report)
    print(f"wrote {len(figures)} figures and report.json to {out}")
    return 0


def _print_summary(report: dict) -> None:
    t = report["settings"]["overview_t"]
    print(f"at t = {t:g}:  RMS(z_1) -> RMS(z_B) | RMS(dL/dz_1) -> RMS(dL/dz_B) | mean cosine | best probe R^2")
    for entry in report["checkpoints"]:
        at_t = next(p for p in entry["per_t"] if p["t"] == t)
        f, b, c = at_t["forward_rms"], at_t["backward_rms"], at_t["cosine_next"]
        mean_cosine = sum(c) / len(c) if c else float("nan")
        best_r2 = max(r for r in entry["probe_r2"] if r is not None)
        print(f"  {entry['name']}: {f[0]:.3g} -> {f[-1]:.3g} | {b[0]:.3g} -> {b[-1]:.3g} | {mean_cosine:.3f} | "
              f"{best_r2:.3f}")
