"""scripts/distill_study.py end to end at toy size: every run trains, a rerun continues instead of
retraining, and the summary holds each run's series, the per-group table and the teacher's quality."""

import importlib.util
import json
from pathlib import Path

import pytest

from dar.training.config import resolve
from dar.training.trainer import train

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "distill_study.py"


@pytest.fixture()
def study(monkeypatch):
    spec = importlib.util.spec_from_file_location("distill_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "COMMON", ["distill.steps=2", "distill.eval_every=2", "distill.eval_samples=20",
                                           "distill.sample_every=0", "distill.ckpt_every=0", "distill.global_batch=4",
                                           "distill.update_ratio=1"])
    monkeypatch.setattr(module, "TEACHER_ODE_STEPS", (2,))
    return module


def test_the_study_trains_every_run_once_and_summarises_them(tmp_path, study, capsys):
    teacher = tmp_path / "teacher"
    train(resolve("fmnist-residual", ["model.arch=SiT-Pico/8", "train.steps=2", "train.global_batch=4",
                                      "train.sample_every=0"]), teacher, progress=False)
    out = tmp_path / "study"
    assert study.main(["--teacher", str(teacher), "--out", str(out), "--seeds", "0", "--no-progress"]) == 0
    names = sorted(p.name for p in (out / "runs").iterdir())
    assert names == sorted(study.runs([0])) and len(names) == 4
    assert study.main(["--teacher", str(teacher), "--out", str(out), "--seeds", "0", "--no-progress"]) == 0
    assert capsys.readouterr().out.count("already finished") >= 4  # a rerun continues, nothing retrains
    assert study.main(["--teacher", str(teacher), "--out", str(out), "--seeds", "0", "--summary"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["table"]) == {"residual-1step", "residual-4step", "dar-1step", "dar-4step"}
    run = summary["runs"]["dar-4step-seed0"]
    assert run["steps"] == [2] and run["final_fd"] == run["fd"][-1] and run["diverged"] is False
    assert len(summary["teacher"]["weights_sha256"]) == 64
    assert set(summary["teacher"]["evaluations"]) == {"euler-2", "euler-2-cfg1.5"}  # unguided, and as distilled
    assert all((out / name).stat().st_size > 0 for name in ("curves.png", "losses.png"))


def test_a_missing_teacher_is_named(tmp_path, study):
    with pytest.raises(SystemExit):
        study.main(["--teacher", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
