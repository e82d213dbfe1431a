"""The depth-scaling analysis (dar/study/depth.py, scripts/depth_scaling.py): symptom strengths from a
diagnose report, per-depth rows from a study summary, the figure and the script."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dar.provenance import file_sha256
from dar.study.depth import depth_figure, depth_scaling, residual_checkpoint, symptom_strengths
from dar.study.experiment import load_experiment, run_dirs, summarize

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_DIAGNOSTICS = ROOT / "docs" / "assets" / "study" / "diagnostics_seed0.json"
SHIPPED_SUMMARY = ROOT / "docs" / "assets" / "study" / "summary.json"
SCRIPT = ROOT / "scripts" / "depth_scaling.py"

STUDY = """
name = "depth"
preset = "fmnist"
overrides = ["model.arch=SiT-Pico/8", "train.global_batch=8", "train.steps=300", "train.sample_every=0",
             "train.eval_every=100", "train.eval_samples=20", "sampler.steps=2", "sampler.method=euler"]
[[group]]
name = "depth6"
seeds = [0, 1]
baseline = "residual"
[group.variants]
residual = ["model.depth=6", "model.routing.mode=residual"]
dynamic = ["model.depth=6", "model.routing.query=dynamic"]
[[group]]
name = "depth12"
seeds = [0, 1]
baseline = "residual"
[group.variants]
residual = ["model.routing.mode=residual"]
dynamic = ["model.routing.query=dynamic"]
"""

# FD at steps 100, 200, 300 per (group, variant, seed)
CURVES = {
    ("depth6", "residual", 0): [9, 7, 5], ("depth6", "residual", 1): [10, 8, 6],
    ("depth6", "dynamic", 0): [8, 5, 3], ("depth6", "dynamic", 1): [9, 7, 4],
    ("depth12", "residual", 0): [9, 7, 5], ("depth12", "residual", 1): [10, 8, 6],
    ("depth12", "dynamic", 0): [9, 7, 5.5], ("depth12", "dynamic", 1): [9, 6, 5],
}


@pytest.fixture
def study_summary(tmp_path):
    """summarize()'s real output for fake runs (metrics.jsonl only), and its JSON round trip."""
    path = tmp_path / "study.toml"
    path.write_text(STUDY)
    dirs = run_dirs(load_experiment(path), tmp_path)
    for key, values in CURVES.items():
        dirs[key].mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"step": 100 * (i + 1), "eval/fd_fmnist": v}) for i, v in enumerate(values)]
        (dirs[key] / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    summary = summarize(path, tmp_path)
    file = tmp_path / "summary.json"
    file.write_text(json.dumps(summary, indent=2))  # as dar experiment --summary writes it (NaN included)
    return summary, file


def synthetic_report(num_blocks=4, t_grid=(0.2, 0.5, 0.8), name="res", mode="residual", growth=100.0,
                     extra=()):
    """forward_rms linear from 1 to ``growth``; backward_rms from 4 + i to 1 + i at the i-th t (ratios
    4, 2.5, 2 for i = 0, 1, 2); cosine_next constant 0.9 + 0.02 i."""
    per_t = []
    for i, t in enumerate(t_grid):
        per_t.append({"t": t, "loss": 0.3,
                      "forward_rms": np.linspace(1.0, growth, num_blocks).tolist(),
                      "backward_rms": np.linspace(4.0 + i, 1.0 + i, num_blocks).tolist(),
                      "cosine_next": [0.9 + 0.02 * i] * (num_blocks - 1)})
    entry = {"name": name, "num_blocks": num_blocks, "routing": mode, "step": 300, "weights_sha256": "ab" * 32,
             "routing_config": {"mode": mode, "query": "dynamic", "chunk_size": 4}, "per_t": per_t}
    return {"command": "dar diagnose", "settings": {"t_grid": list(t_grid), "overview_t": t_grid[1]},
            "checkpoints": [entry, *extra]}


# ---------------------------------------------------------------------------------------------
# symptom_strengths
# ---------------------------------------------------------------------------------------------


def test_symptom_strengths_of_known_curves():
    s = symptom_strengths(synthetic_report())["res"]
    assert s["num_blocks"] == 4 and s["mode"] == "residual"
    assert s["norm_growth"] == pytest.approx(100.0)  # 1 -> 100 at every t
    assert s["per_t"]["gradient_ratio"] == pytest.approx([4.0, 2.5, 2.0])  # first / last
    assert s["gradient_ratio"] == pytest.approx((4.0 + 2.5 + 2.0) / 3)
    assert s["adjacent_cosine"] == pytest.approx(0.92)
    assert s["range"]["adjacent_cosine"] == pytest.approx([0.9, 0.94])
    # the report's overview t (0.5) unless asked otherwise, nearest grid value
    assert s["at_overview_t"] == pytest.approx({"t": 0.5, "norm_growth": 100.0, "gradient_ratio": 2.5,
                                                "adjacent_cosine": 0.92})
    other = symptom_strengths(synthetic_report(), at_t=0.75)["res"]["at_overview_t"]
    assert other["t"] == 0.8 and other["gradient_ratio"] == pytest.approx(2.0)


def test_symptom_strengths_per_checkpoint_and_by_name():
    dar = synthetic_report(name="dar", mode="dar", growth=0.5)["checkpoints"][0]
    report = synthetic_report(extra=[dar])
    both = symptom_strengths(report)
    assert set(both) == {"res", "dar"}
    assert both["dar"]["norm_growth"] == pytest.approx(0.5)
    assert set(symptom_strengths(report, "dar")) == {"dar"}
    with pytest.raises(ValueError, match="no checkpoint named 'nope'"):
        symptom_strengths(report, "nope")
    assert residual_checkpoint(report) == "res"
    assert residual_checkpoint(report, "dar") == "dar"
    with pytest.raises(ValueError, match="no residual checkpoint"):
        residual_checkpoint({"checkpoints": [dar]})
    with pytest.raises(ValueError, match="several residual"):
        residual_checkpoint(synthetic_report(extra=[synthetic_report(name="res2")["checkpoints"][0]]))


def test_symptom_strengths_of_the_shipped_diagnostics_match_the_docs():
    """docs/RESULTS.md §3 quotes the residual model of diagnostics_seed0.json at t = 0.569: RMS(z_1) ->
    RMS(z_12) 0.783 -> 1.377 (1.76x), the gradient falling 4.5x from block 1 to 12, mean cosine 0.955;
    across the grid growth 1.3x near data to 2.1x near noise and cosine 0.91-0.96; §5 'norm growth 1.8x'."""
    report = json.loads(SHIPPED_DIAGNOSTICS.read_text())
    every = symptom_strengths(report)
    s = every[residual_checkpoint(report)]
    assert s["num_blocks"] == 12
    assert all(np.isfinite(s[k]) for k in ("norm_growth", "gradient_ratio", "adjacent_cosine"))
    assert s["norm_growth"] > 1 and s["gradient_ratio"] > 1
    at = s["at_overview_t"]
    assert at["t"] == 0.569
    assert round(at["norm_growth"], 2) == 1.76
    assert round(at["gradient_ratio"], 1) == 4.5
    assert round(at["adjacent_cosine"], 3) == 0.955
    assert [round(v, 1) for v in s["range"]["norm_growth"]] == [1.3, 2.1]
    assert [round(v, 2) for v in s["range"]["adjacent_cosine"]] == [0.91, 0.96]
    assert round(s["norm_growth"], 1) == 1.8  # mean over the 8 t
    # under DAR the state's RMS falls with depth (§3: 0.34x, 0.60x, 0.42x at t = 0.569)
    assert [round(every[n]["at_overview_t"]["norm_growth"], 2) for n in ("static", "static_t", "dynamic")] == \
        [0.34, 0.60, 0.42]


# ---------------------------------------------------------------------------------------------
# depth_scaling
# ---------------------------------------------------------------------------------------------


def test_depth_scaling_rows_by_hand(study_summary):
    summary, file = study_summary
    rows = depth_scaling(summary, {12: "depth12", 6: "depth6"})
    assert [r["depth"] for r in rows] == [6, 12]
    six, twelve = rows
    assert six["seeds"] == [0, 1] and six["steps_match"]
    assert six["fd_gap_per_seed"] == pytest.approx([3 - 5, 4 - 6])
    assert six["fd_gap_mean"] == pytest.approx(-2.0) and six["fd_gap_std"] == pytest.approx(0.0)
    assert six["relative_gap_pct_per_seed"] == pytest.approx([-40.0, -100 / 3])
    assert six["relative_gap_pct_mean"] == pytest.approx((-40.0 - 100 / 3) / 2)
    # seed 0 reaches 5 at step 200: 300/200; seed 1 crosses 6 a third of the way from 7 to 4: 300/(700/3)
    assert six["speedup_per_seed"] == pytest.approx([1.5, 9 / 7])
    assert six["speedup_mean"] == pytest.approx((1.5 + 9 / 7) / 2)
    assert six["reached_baseline_seeds"] == [0, 1] and six["reached_baseline"] == "2/2"
    # depth 12: seed 0 ends at 5.5 above its baseline's 5 (never reaches it); seed 1 reaches 6 at step 200
    assert twelve["fd_gap_per_seed"] == pytest.approx([0.5, -1.0])
    assert twelve["fd_gap_mean"] == pytest.approx(-0.25)
    assert twelve["fd_gap_std"] == pytest.approx(np.std([0.5, -1.0], ddof=1))
    assert twelve["relative_gap_pct_per_seed"] == pytest.approx([10.0, -100 / 6])
    assert twelve["speedup_per_seed"][0] is None and twelve["speedup_per_seed"][1] == pytest.approx(1.5)
    assert twelve["iterations_to_baseline_final"] == [None, 200.0]
    assert twelve["speedup_mean"] == pytest.approx(1.5) and twelve["speedup_ci95"] == pytest.approx([1.5, 1.5])
    assert twelve["reached_baseline_seeds"] == [1] and twelve["reached_baseline"] == "1/2"
    # the JSON file (string seed keys, NaN speedups) gives the same rows
    assert depth_scaling(json.loads(file.read_text()), {6: "depth6", 12: "depth12"}) == rows


def test_depth_scaling_names_what_is_missing(study_summary):
    summary, _ = study_summary
    with pytest.raises(KeyError, match="no group 'depth24' for depth 24"):
        depth_scaling(summary, {6: "depth6", 24: "depth24"})
    with pytest.raises(KeyError, match="no variant 'static'"):
        depth_scaling(summary, {6: "depth6"}, variant="static")


def test_depth_scaling_of_the_shipped_summary_matches_the_docs():
    """docs/RESULTS.md §1: dynamic minus residual per seed -2.74, -3.40, -3.57; 1.28x [1.25, 1.30]."""
    (row,) = depth_scaling(json.loads(SHIPPED_SUMMARY.read_text()), {12: "main"})
    assert row["fd_gap_per_seed"] == pytest.approx([-2.74, -3.40, -3.57], abs=0.01)
    assert round(row["speedup_mean"], 2) == 1.28
    assert [round(v, 2) for v in row["speedup_ci95"]] == [1.25, 1.30]
    assert row["reached_baseline"] == "3/3"


# ---------------------------------------------------------------------------------------------
# Figure and script
# ---------------------------------------------------------------------------------------------


def test_depth_figure_draws(study_summary, tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    rows = depth_scaling(study_summary[0], {6: "depth6", 12: "depth12"})
    assert len(depth_figure(rows, None).axes) == 2
    symptoms = {d: symptom_strengths(synthetic_report(num_blocks=d, growth=g))["res"]
                for d, g in ((6, 3.0), (12, 10.0), (24, 100.0))}
    figure = depth_figure(rows, symptoms)
    assert len(figure.axes) == 4
    assert figure.axes[2].get_yscale() == "log" and figure.axes[0].get_xscale() == "log"
    FigureCanvasAgg(figure).print_png(tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 0


def load_script():
    spec = importlib.util.spec_from_file_location("depth_scaling_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_reports(tmp_path, depths=(6, 12)):
    paths = {}
    for d in depths:
        dar = synthetic_report(num_blocks=d, name="dar", mode="dar", growth=0.5)["checkpoints"][0]
        report = synthetic_report(num_blocks=d, growth=d / 2, extra=[dar])
        paths[d] = tmp_path / f"diag{d}" / "report.json"
        paths[d].parent.mkdir()
        paths[d].write_text(json.dumps(report))
    return paths


def test_script_end_to_end(study_summary, tmp_path, capsys):
    _, summary = study_summary
    reports = write_reports(tmp_path)
    out = tmp_path / "out"
    script = load_script()
    argv = ["--summary", str(summary), "--groups", "6=depth6", "12=depth12",
            "--diagnostics", *(f"{d}={p}" for d, p in reports.items()), "--out", str(out)]
    assert script.main(argv) == 0
    assert "depth   6: -2.00" in capsys.readouterr().out
    assert (out / "depth_scaling.png").stat().st_size > 0
    record = json.loads((out / "depth_scaling.json").read_text(),
                        parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert record["inputs"]["summary"] == {"path": str(summary), "sha256": file_sha256(summary),
                                           "experiment": "depth", "metric": "eval/fd_fmnist"}
    assert record["inputs"]["diagnostics"]["12"]["sha256"] == file_sha256(reports[12])
    assert record["inputs"]["diagnostics"]["12"]["checkpoint"] == "res"
    assert {"torch", "numpy", "dar"} <= set(record["versions"])
    assert record["command"].startswith("python scripts/depth_scaling.py --summary")
    assert [r["depth"] for r in record["rows"]] == [6, 12]
    assert record["rows"][1]["speedup_per_seed"][0] is None
    assert record["symptoms"]["12"]["norm_growth"] == pytest.approx(6.0)
    assert record["symptoms"]["6"]["num_blocks"] == 6
    # the residual checkpoint by name instead
    assert script.main([*argv[:-2], "--residual-name", "dar", "--out", str(tmp_path / "o2")]) == 0
    assert json.loads((tmp_path / "o2" / "depth_scaling.json").read_text())["symptoms"]["6"]["mode"] == "dar"


def test_script_errors_name_the_file_and_field(study_summary, tmp_path, capsys):
    _, summary = study_summary
    script = load_script()
    out = ["--out", str(tmp_path / "out")]

    def error(*argv):
        assert script.main([*argv, *out]) == 2
        return capsys.readouterr().err

    missing = tmp_path / "nope.json"
    assert f"summary {missing} does not exist" in error("--summary", str(missing))
    message = error("--summary", str(summary))  # default groups: depth24 is not in this summary
    assert str(summary) in message and "no group 'depth24' for depth 24" in message
    reports = write_reports(tmp_path, depths=(6,))
    no_residual = tmp_path / "dar_only.json"
    report = json.loads(reports[6].read_text())
    report["checkpoints"] = [e for e in report["checkpoints"] if e["routing_config"]["mode"] != "residual"]
    no_residual.write_text(json.dumps(report))
    message = error("--summary", str(summary), "--groups", "6=depth6", "--diagnostics", f"6={no_residual}")
    assert str(no_residual) in message and "no residual checkpoint (routing_config.mode == 'residual')" in message
    message = error("--summary", str(summary), "--groups", "6=depth6", "--diagnostics", f"12={reports[6]}")
    assert "num_blocks 6" in message and "depth 12" in message
    assert "expected DEPTH=VALUE" in error("--summary", str(summary), "--diagnostics", str(reports[6]))
    assert "no checkpoint named 'x'" in error("--summary", str(summary), "--groups", "6=depth6",
                                              "--diagnostics", f"6={reports[6]}", "--residual-name", "x")
    assert not (tmp_path / "out").exists()


def test_script_runs_as_a_command(study_summary, tmp_path):
    _, summary = study_summary
    out = tmp_path / "cmd"
    done = subprocess.run([sys.executable, str(SCRIPT), "--summary", str(summary), "--groups", "6=depth6",
                           "--out", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (out / "depth_scaling.png").exists() and (out / "depth_scaling.json").exists()
    assert json.loads((out / "depth_scaling.json").read_text())["symptoms"] == {}


# ---------------------------------------------------------------------------------------------
# scripts/symptoms.py: the symptom table of any diagnose reports
# ---------------------------------------------------------------------------------------------


def run_symptoms_script(*args):
    return subprocess.run([sys.executable, str(SCRIPT.parent / "symptoms.py"), *map(str, args)],
                          capture_output=True, text=True)


def test_symptoms_script_table_and_json(tmp_path):
    paths = write_reports(tmp_path, depths=(6,))
    other = tmp_path / "other.json"
    other.write_text(json.dumps(synthetic_report(name="deep", growth=8.0)))
    out = tmp_path / "sym" / "symptoms.json"
    done = run_symptoms_script(paths[6], other, "--out", out)
    assert done.returncode == 0, done.stderr
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines() if line.startswith("| ")}
    # synthetic residual at depth 6: growth 3, gradient ratios 4, 2.5, 2 (mean 17/6), cosine 0.92
    assert "| res | 6 | 3.00 [3.00, 3.00] (3.00) | 2.83 [2.00, 4.00] (2.50) | 0.920 [0.900, 0.940] (0.920) |" \
        in rows["res"]
    assert rows["deep"].startswith("| deep | 4 | 8.00")
    written = json.loads(out.read_text())
    assert set(written["checkpoints"]) == {"res", "dar", "deep"}
    assert written["checkpoints"]["dar"]["norm_growth"] == pytest.approx(0.5)
    assert written["inputs"][str(other)] == file_sha256(other)


def test_symptoms_script_rejects_duplicate_names_and_bad_files(tmp_path):
    paths = write_reports(tmp_path, depths=(6, 12))
    done = run_symptoms_script(paths[6], paths[12])
    assert done.returncode != 0 and "'res' appears in more than one report" in done.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    done = run_symptoms_script(bad)
    assert done.returncode != 0 and "bad.json is not a readable dar diagnose report.json" in done.stderr


def test_symptoms_script_departure_from_uniform():
    spec = importlib.util.spec_from_file_location("symptoms_script", SCRIPT.parent / "symptoms.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    nan = float("nan")
    # layer 1 reads one source (no choice: left out); layer 2 reads 0.7 / 0.3 (0.2 from uniform), then
    # 0.5 / 0.5 at the second t; layer 3 reads three sources, 0.6 / 0.2 / 0.2 (max 0.6 - 1/3)
    alphas = [[[1.0, 0.7, 0.6], [nan, 0.3, 0.2], [nan, nan, 0.2]],
              [[1.0, 0.5, 0.6], [nan, 0.5, 0.2], [nan, nan, 0.2]]]
    entry = {"per_t": [{"routing_alpha": a} for a in alphas]}
    found = module.departure_from_uniform(entry)
    assert found["max"] == pytest.approx(0.6 - 1 / 3)
    assert found["mean"] == pytest.approx((0.2 + (0.6 - 1 / 3) + 0.0 + (0.6 - 1 / 3)) / 4)
    assert module.departure_from_uniform({"per_t": [{"t": 0.5}]}) is None  # residual: no routing weights
