"""The residual stream's three symptom strengths (norm growth, gradient ratio, adjacent cosine) of every
checkpoint in one or more ``dar diagnose`` reports, as one Markdown table and one JSON
(definitions: docs/DIAGNOSTICS.md "Symptom strength vs depth").

    python scripts/symptoms.py runs/diag/routers/report.json --out runs/diag/routers/symptoms.json

prints the table (mean over the report's t grid, [min, max] over it, and the value at the overview t;
for routed checkpoints also how far the routing weights moved from uniform) and writes the JSON: every number per t, the definitions, the inputs' paths and SHA-256, the command
and the package versions. Checkpoint names must be unique across the reports.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dar.files import atomic_write_text  # noqa: E402
from dar.provenance import file_sha256, package_versions  # noqa: E402
from dar.study.depth import DEFINITIONS, SYMPTOMS, symptom_strengths  # noqa: E402

LABELS = {"norm_growth": "norm growth", "gradient_ratio": "gradient ratio", "adjacent_cosine": "adjacent cosine"}


def departure_from_uniform(entry: dict) -> dict | None:
    """How far the routing left its initialisation (zero queries: uniform weights 1/K over each
    aggregator's K sources): per aggregator with K > 1, max_i |alpha_i - 1/K|; then its mean and max
    over aggregators and the report's t grid. None for checkpoints without routing weights."""
    per_t = [point.get("routing_alpha") for point in entry.get("per_t", [])]
    if not per_t or any(a is None for a in per_t):
        return None
    distances = []
    for alpha in per_t:
        alpha = np.array(alpha, dtype=float)  # [source, layer], NaN where a layer does not read a source
        for column in alpha.T:
            weights = column[np.isfinite(column)]
            if len(weights) > 1:
                distances.append(float(np.abs(weights - 1.0 / len(weights)).max()))
    return {"mean": float(np.mean(distances)), "max": float(np.max(distances))} if distances else None


def collect(reports: list[Path], at_t: float | None = None) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    for path in reports:
        try:
            report = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise SystemExit(f"symptoms: {path} is not a readable dar diagnose report.json: {error}")
        try:
            strengths = symptom_strengths(report, at_t=at_t)
        except ValueError as error:
            raise SystemExit(f"symptoms: {path}: {error}")
        for name, row in strengths.items():
            if name in rows:
                raise SystemExit(f"symptoms: checkpoint name {name!r} appears in more than one report "
                                 "(rename with dar diagnose --names)")
            entry = next(e for e in report["checkpoints"] if e.get("name") == name)
            rows[name] = {**row, "departure_from_uniform": departure_from_uniform(entry), "report": str(path)}
    return rows


def markdown(rows: dict[str, dict]) -> str:
    def cell(row, key, digits):
        lo, hi = row["range"][key]
        return f"{row[key]:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}] ({row['at_overview_t'][key]:.{digits}f})"

    t = {row["at_overview_t"]["t"] for row in rows.values()}
    lines = [f"mean over the t grid [min, max over t] (value at t = {', '.join(f'{v:g}' for v in sorted(t))})", "",
             "| checkpoint | blocks | " + " | ".join(LABELS[k] for k in SYMPTOMS)
             + " | routing: distance from uniform, mean (max) |",
             "|---|---|" + "---|" * (len(SYMPTOMS) + 1)]
    for name, row in rows.items():
        digits = {"norm_growth": 2, "gradient_ratio": 2, "adjacent_cosine": 3}
        lines.append(f"| {name} | {row['num_blocks']} | "
                     + " | ".join(cell(row, k, digits[k]) for k in SYMPTOMS) + " | "
                     + (f"{d['mean']:.3f} ({d['max']:.3f})" if (d := row["departure_from_uniform"]) else "—") + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", type=Path, help="dar diagnose report.json files")
    parser.add_argument("--at-t", type=float, help="t of the single-t column (default: each report's overview t)")
    parser.add_argument("--out", type=Path, help="write the JSON here (default: print the table only)")
    args = parser.parse_args(argv)
    rows = collect(args.reports, args.at_t)
    table = markdown(rows)
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps({
            "command": "python scripts/symptoms.py " + " ".join(map(shlex.quote, argv if argv is not None else sys.argv[1:])),
            "definitions": DEFINITIONS,
            "inputs": {str(p): file_sha256(p) for p in args.reports},
            "versions": package_versions(),
            "checkpoints": rows,
            "markdown": table,
        }, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
