"""Does DAR's gain grow with depth? One figure and one JSON from the depth study's summary and,
optionally, one ``dar diagnose`` report per depth (configs/depth_study.toml; docs/DIAGNOSTICS.md
"Symptom strength vs depth").

    python scripts/depth_scaling.py --summary DIR/summary.json \\
        --diagnostics 6=D6/report.json 12=D12/report.json 24=D24/report.json --out runs/depth

writes ``OUT/depth_scaling.png`` (final-FD gap and speedup vs depth; with ``--diagnostics`` also the
residual model's norm growth, gradient ratio and adjacent cosine vs depth) and ``OUT/depth_scaling.json``
(the rows, the symptom strengths, their definitions, the command, every input's path and SHA-256 and
the package versions), so the figure can be redrawn and checked against its inputs.

The depth groups default to the study's ``depth6``, ``depth12`` and ``depth24`` (``--groups``); each
report's residual checkpoint is the one with ``routing_config.mode == "residual"`` unless
``--residual-name`` names it.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402

from dar.provenance import file_sha256, package_versions  # noqa: E402
from dar.study.depth import (  # noqa: E402
    DEFINITIONS, depth_figure, depth_scaling, residual_checkpoint, symptom_strengths,
)

DEFAULT_GROUPS = {6: "depth6", 12: "depth12", 24: "depth24"}


class InputError(Exception):
    """An input file is missing, unreadable or lacks what the figure needs."""


def _depth_pairs(items: list[str], what: str) -> dict[int, str]:
    pairs = {}
    for item in items:
        depth, sep, value = item.partition("=")
        if not sep or not depth.strip().isdigit() or not value.strip():
            raise InputError(f"{what}: expected DEPTH=VALUE (e.g. 12=runs/diag12/report.json), got {item!r}")
        if int(depth) in pairs:
            raise InputError(f"{what}: depth {int(depth)} given twice")
        pairs[int(depth)] = value.strip()
    return pairs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--summary", required=True, help="summary.json of dar experiment configs/depth_study.toml")
    parser.add_argument("--diagnostics", nargs="+", default=[], metavar="DEPTH=REPORT",
                        help="dar diagnose report.json per depth, e.g. 6=D6/report.json (optional)")
    parser.add_argument("--groups", nargs="+", metavar="DEPTH=GROUP",
                        help="summary group per depth (default: 6=depth6 12=depth12 24=depth24)")
    parser.add_argument("--baseline", default="residual", help="baseline variant of each group (default residual)")
    parser.add_argument("--variant", default="dynamic", help="DAR variant compared with it (default dynamic)")
    parser.add_argument("--residual-name", help="name of the residual checkpoint in every diagnose report "
                                                "(default: the one with routing_config.mode == residual)")
    parser.add_argument("--out", required=True, help="output directory")
    return parser.parse_args(argv)


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{what} {path} is not readable JSON: {error}") from None


def _strict(value):
    """NaN / inf -> None, so the JSON written is strict."""
    if isinstance(value, dict):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def build(args: argparse.Namespace) -> dict:
    """Every number of the figure, with its inputs' provenance; raises InputError on a bad input."""
    groups = _depth_pairs(args.groups, "--groups") if args.groups else dict(DEFAULT_GROUPS)
    reports = _depth_pairs(args.diagnostics, "--diagnostics")
    summary_path = Path(args.summary)
    summary = _read_json(summary_path, "summary")
    try:
        rows = depth_scaling(summary, groups, args.baseline, args.variant)
    except KeyError as error:
        raise InputError(f"{summary_path}: {error.args[0]}") from None
    except ValueError as error:
        raise InputError(f"{summary_path}: {error}") from None

    symptoms, diagnostics = {}, {}
    for depth, file in sorted(reports.items()):
        path = Path(file)
        report = _read_json(path, f"diagnose report for depth {depth}")
        try:
            name = residual_checkpoint(report, args.residual_name)
            strengths = symptom_strengths(report, name)[name]
        except (KeyError, ValueError) as error:
            raise InputError(f"{path} (depth {depth}): {error}") from None
        if strengths["num_blocks"] != depth:
            raise InputError(f"{path}: checkpoint {name!r} has num_blocks {strengths['num_blocks']}, "
                             f"but it was given for depth {depth}")
        symptoms[depth] = strengths
        diagnostics[str(depth)] = {"path": str(path), "sha256": file_sha256(path), "checkpoint": name,
                                   "weights_sha256": next(e.get("weights_sha256") for e in report["checkpoints"]
                                                          if e.get("name") == name)}
    return {
        "command": shlex.join(["python", "scripts/depth_scaling.py", *args.argv]),
        "inputs": {"summary": {"path": str(summary_path), "sha256": file_sha256(summary_path),
                               "experiment": summary.get("experiment"), "metric": summary.get("metric")},
                   "diagnostics": diagnostics},
        "groups": {str(d): g for d, g in sorted(groups.items())},
        "baseline": args.baseline,
        "variant": args.variant,
        "definitions": DEFINITIONS,
        "rows": rows,
        "symptoms": {str(d): s for d, s in symptoms.items()},
        "versions": package_versions(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        record = build(args)
    except InputError as error:
        print(f"depth_scaling.py: error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figure = depth_figure(record["rows"], {int(d): s for d, s in record["symptoms"].items()} or None)
    FigureCanvasAgg(figure).print_png(out / "depth_scaling.png")
    record["figure"] = "depth_scaling.png"
    (out / "depth_scaling.json").write_text(json.dumps(_strict(record), indent=1, allow_nan=False))

    metric = record["inputs"]["summary"]["metric"] or "final metric"
    print(f"{args.variant} vs {args.baseline}, {metric}: gap (mean ± std over seeds) | speedup [bootstrap] | reached")
    for row in record["rows"]:
        gap = f"{row['fd_gap_mean']:+.2f}" if row["fd_gap_mean"] is not None else "n/a"
        rel = f"{row['relative_gap_pct_mean']:+.1f} %" if row["relative_gap_pct_mean"] is not None else ""
        std = f" ± {row['relative_gap_pct_std']:.1f}" if row["relative_gap_pct_std"] is not None else ""
        speed = (f"{row['speedup_mean']:.2f}x [{row['speedup_ci95'][0]:.2f}, {row['speedup_ci95'][1]:.2f}]"
                 if row["speedup_mean"] is not None and row["speedup_ci95"] else "never")
        print(f"  depth {row['depth']:>3}: {gap} ({rel}{std}) | {speed} | {row['reached_baseline']}")
        if not row["steps_match"]:
            print(f"    warning: {row['group']}: baseline and variant end at different steps "
                  f"{row['final_step']} (an unfinished run?)", file=sys.stderr)
    for depth, s in sorted(record["symptoms"].items(), key=lambda item: int(item[0])):
        print(f"  depth {depth:>3} residual: norm growth {s['norm_growth']:.3g}x, gradient ratio "
              f"{s['gradient_ratio']:.3g}x, adjacent cosine {s['adjacent_cosine']:.3f} (mean over t)")
    print(f"wrote {out / 'depth_scaling.png'} and {out / 'depth_scaling.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
