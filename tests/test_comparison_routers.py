"""The comparison routers run through everything a DAR model runs through: training, checkpoints,
`dar info`, `dar sample`, `dar diagnose` (symptoms and probe) and `dar bench` (cost ratios beside the
residual in one run). Each router's equations are tested in tests/test_router_<name>.py."""

import json

import pytest

from dar.cli import main
from dar.study.bench import run_bench

MODES = {"denseformer": "denseformer-b2", "hyper": "hyper-n4-dynamic", "mhc": "mhc-n4-dynamic",
         "attnres": "attnres-b2"}
TINY = ["model.arch=SiT-Pico/8", "train.steps=2", "train.global_batch=4", "train.sample_every=0",
        "train.log_every=1", "sampler.method=euler", "sampler.steps=2"]


@pytest.mark.parametrize("mode", MODES)
def test_router_trains_diagnoses_and_reports(mode, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, f"model.routing.mode={mode}", "--run-dir", str(run), "--no-progress"]) == 0
    assert main(["info", str(run)]) == 0
    assert f"routing     {MODES[mode]}" in capsys.readouterr().out
    out = tmp_path / "diag"
    assert main(["diagnose", str(run), "--out", str(out), "--batch", "4", "--t", "0.5", "--probe-samples", "16",
                 "--names", mode]) == 0
    entry = json.loads((out / "report.json").read_text())["checkpoints"][0]
    assert entry["routing"] == MODES[mode] and len(entry["per_t"][0]["forward_rms"]) == 12
    assert "routing_alpha" not in entry["per_t"][0] and "gate_gradient" not in entry["per_t"][0]
    assert len(entry["probe_r2"]) == 25


def test_bench_measures_the_routers_beside_the_residual():
    report = run_bench("cpu", ["denseformer", "hyper-n4", "mhc-n4", "attnres"], "cpu", "fp32",
                       repeats=1, warmup=0, sample_steps=1, compile_models=False, batch=2, sample_batch=2)
    results = report["results"]
    assert list(results) == ["residual", "denseformer", "hyper-n4", "mhc-n4", "attnres"]
    for name in ("denseformer", "hyper-n4", "mhc-n4", "attnres"):
        assert results[name]["parameters"] > results["residual"]["parameters"]
        assert results[name]["train_step_ratio"] > 0


def test_fused_backends_are_refused_for_the_routers(tmp_path, capsys):
    assert main(["train", *TINY, "model.routing.mode=attnres", "train.routing_backend=recompute",
                 "--run-dir", str(tmp_path), "--no-progress"]) == 2
    assert "DAR" in capsys.readouterr().err
