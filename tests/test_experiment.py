import json
from pathlib import Path

import numpy as np
import pytest

from dar.study.experiment import bootstrap_interval, load_experiment, run_dirs, steps_to_reach, summarize

STUDY = """
name = "t"
preset = "fmnist"
overrides = ["model.arch=SiT-Pico/8", "train.global_batch=8", "train.steps=4", "train.sample_every=0",
             "train.eval_every=2", "train.eval_samples=20", "sampler.steps=2", "sampler.method=euler"]
[[group]]
name = "main"
seeds = [0, 1]
baseline = "residual"
[group.variants]
residual = ["model.routing.mode=residual"]
dar = ["model.routing.query=static_t"]
[[group]]
name = "chunk"
seeds = [0]
[group.variants]
c4 = ["model.routing.query=static_t"]
"""


def write(tmp_path, text=STUDY):
    path = tmp_path / "study.toml"
    path.write_text(text)
    return path


def test_identical_configs_share_a_run_and_seeds_differ(tmp_path):
    experiment = load_experiment(write(tmp_path))
    dirs = run_dirs(experiment, tmp_path)
    assert dirs["chunk", "c4", 0] == dirs["main", "dar", 0]
    assert len({dirs["main", "dar", 0], dirs["main", "dar", 1], dirs["main", "residual", 0]}) == 3


@pytest.mark.parametrize("text,message", [
    (STUDY.replace('name = "t"', 'nam = "t"'), "unknown key 'nam'"),
    (STUDY.replace('baseline = "residual"', 'baseline = "sit"'), "baseline 'sit'"),
    (STUDY.replace("train.steps=4", "train.stepz=4"), "unknown config key train.stepz"),
])
def test_bad_experiment_files_are_rejected_before_training(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_experiment(write(tmp_path, text))


def test_summary_speedup_against_each_seeds_baseline(tmp_path):
    path = write(tmp_path, STUDY.replace("train.steps=4", "train.steps=300"))  # the fake evaluations' length
    dirs = run_dirs(load_experiment(path), tmp_path)
    curves = {("residual", 0): [9, 7, 5], ("residual", 1): [10, 8, 6],
              ("dar", 0): [8, 5, 3], ("dar", 1): [9, 7, 4]}
    for (variant, seed), values in curves.items():
        d = dirs["main", variant, seed]
        d.mkdir(parents=True)
        lines = [json.dumps({"step": 100 * (i + 1), "eval/fd_fmnist": v}) for i, v in enumerate(values)]
        (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    table = summarize(path, tmp_path)["groups"]["main"]
    assert table["residual"]["final_mean"] == 5.5
    assert table["dar"]["final"] == [3.0, 4.0]
    # seed 0 hits 5 at step 200 (300/200 = 1.5x); seed 1 crosses 6 a third of the way from 7 (step
    # 200) to 4 (step 300): 233.3 (300/233.3 = 9/7 x)
    assert table["dar"]["iterations_to_baseline_final"] == pytest.approx([200, 700 / 3])
    assert table["dar"]["speedup_per_seed"] == pytest.approx([1.5, 9 / 7])
    assert table["dar"]["speedup_mean"] == pytest.approx((1.5 + 9 / 7) / 2)
    lo, hi = table["dar"]["speedup_ci95"]
    assert 9 / 7 - 1e-9 <= lo < hi <= 1.5 + 1e-9


def test_summary_leaves_out_runs_that_have_not_reached_their_last_step(tmp_path):
    """A run still training must not lend its intermediate value to the final statistics or speedups."""
    from dar.study.report import markdown_tables

    path = write(tmp_path, STUDY.replace("train.steps=4", "train.steps=300"))
    experiment = load_experiment(path)
    dirs = run_dirs(experiment, tmp_path)
    curves = {("residual", 0): [9, 7, 5], ("residual", 1): [10, 8, 6], ("dar", 0): [8, 5, 3], ("dar", 1): [4]}
    for (variant, seed), values in curves.items():
        d = dirs["main", variant, seed]
        d.mkdir(parents=True)
        lines = [json.dumps({"step": 100 * (i + 1), "eval/fd_fmnist": v}) for i, v in enumerate(values)]
        (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    summary = summarize(path, tmp_path)
    dar = summary["groups"]["main"]["dar"]
    assert dar["final"] == [3.0] and dar["seeds"] == [0] and dar["unfinished"] == {1: 100}
    assert dar["speedup_per_seed"] == pytest.approx([1.5]) and dar["reached_baseline"] == "1/1"
    assert summary["groups"]["chunk"]["c4"]["final"] == [3.0]  # the same run as main/dar/seed_0
    report = markdown_tables(experiment, tmp_path, summary)
    assert "| 3.00 | 3.00 (seeds 0) |" in report
    assert "dar seed 1 (at step 100)" in report


def test_report_draws_curves_and_tables_from_metrics(tmp_path):
    from dar.study.report import write_report

    path = write(tmp_path, STUDY.replace("train.steps=4", "train.steps=300"))
    experiment = load_experiment(path)
    dirs = run_dirs(experiment, tmp_path)
    curves = {("residual", 0): [9, 7, 5], ("residual", 1): [10, 8, 6], ("dar", 0): [8, 5, 3], ("dar", 1): [11, 9, 7]}
    for (variant, seed), values in curves.items():
        d = dirs["main", variant, seed]
        d.mkdir(parents=True)
        lines = [json.dumps({"step": 100 * (i + 1), "eval/fd_fmnist": v, "eval/class_acc": 0.1 * i})
                 for i, v in enumerate(values)]
        (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    written = write_report(experiment, tmp_path, summarize(path, tmp_path))
    assert {p.name for p in written} >= {"curves_main.png", "curves_chunk.png", "report.md"}
    report = (tmp_path / "report" / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| dar |"))
    # dar seed 1 (7) never reaches its baseline's final value (6): reported, not dropped
    assert "200, never (1/2 seeds)" in row and "1.50x" in row
    assert "5.00 ± 2.83" in row  # final FD mean ± std over seeds


def test_steps_to_reach_and_bootstrap():
    assert steps_to_reach(np.array([1, 2, 3]), np.array([5.0, 4.0, 3.0]), 4.0) == 2
    assert steps_to_reach(np.array([10, 20, 30]), np.array([5.0, 4.0, 3.0]), 3.25) == 27.5
    assert steps_to_reach(np.array([10, 20]), np.array([3.0, 2.0]), 4.0) == 10  # already there at the first eval
    assert steps_to_reach(np.array([1, 2]), np.array([5.0, 4.0]), 1.0) == float("inf")
    assert bootstrap_interval([2.0, 2.0, 2.0]) == (2.0, 2.0)


def test_execution_order_finishes_each_seed_across_groups_first(tmp_path):
    from dar.study.experiment import execution_order

    experiment = load_experiment(write(tmp_path))
    order = [(g.name, v, s) for _, (g, v, s, _) in execution_order(experiment, tmp_path)]
    # chunk/c4 seed 0 is main/dar seed 0 (same config): trained once, in its first place
    assert order == [("main", "residual", 0), ("main", "dar", 0), ("main", "residual", 1), ("main", "dar", 1)]


def test_workers_skip_runs_claimed_by_another_process(tmp_path, capsys):
    import subprocess
    import sys

    from dar.study.experiment import is_finished, run_experiment

    study = write(tmp_path)
    experiment = load_experiment(study)
    dirs = run_dirs(experiment, tmp_path / "out")
    configs = {(g.name, v, s): c for g, v, s, c in experiment.runs()}
    held = dirs["main", "dar", 1]
    worker = subprocess.Popen(  # another worker holding one run
        [sys.executable, "-c", "import sys, time; from dar.files import directory_lock\n"
         f"with directory_lock({str(held)!r}, 'dar experiment'):\n    print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline().strip() == "held"
        run_experiment(study, tmp_path / "out", progress=False)  # skips the held run, is not blocked by it
    finally:
        worker.kill()
        worker.wait()
    assert "1 run(s) are being trained by another process" in capsys.readouterr().out
    assert not is_finished(held, configs["main", "dar", 1])
    for key in [("main", "residual", 0), ("main", "residual", 1), ("main", "dar", 0)]:
        assert is_finished(dirs[key], configs[key])
    run_experiment(study, tmp_path / "out", progress=False)  # the claim is gone: the last run trains now
    assert is_finished(held, configs["main", "dar", 1])


@pytest.mark.parametrize("name", ["fmnist_study.toml", "fmnist_study_gpu.toml", "routers_study.toml",
                                  "routers_study_gpu.toml", "repa_study.toml", "depth_study.toml", "depth_study_gpu.toml",
                                  "finetune_study.toml"])
def test_shipped_study_configs_resolve(name):
    from pathlib import Path

    experiment = load_experiment(Path(__file__).parent.parent / "configs" / name)
    runs = list(experiment.runs())
    assert {c.train.seed for g, v, s, c in runs if len(g.seeds) > 1} == {0, 1, 2}
    assert all(c.model.routing.chunk_size == 4 for g, v, s, c in runs if v.startswith(("static", "dynamic")))
    assert all(c.model.dims[0] >= 12 for g, v, s, c in runs if not g.name.startswith("depth"))  # symptoms need depth


def test_the_published_study_keeps_its_run_directory_names():
    """docs/RESULTS.md names these directories; a config field added later (at its default) must not rename
    them, or rerunning the study would retrain it from scratch instead of continuing."""
    dirs = run_dirs(load_experiment(Path(__file__).parents[1] / "configs" / "fmnist_study.toml"), Path("out"))
    names = {variant: dirs["main", variant, 0].name for variant in ("residual", "static", "static_t", "dynamic")}
    assert names == {"residual": "9681b8b91340", "static": "07c2548113b7", "static_t": "61fa1d884fdd",
                     "dynamic": "3da90a3cdfad"}


def test_the_routers_study_reuses_the_main_studys_runs():
    configs = Path(__file__).parents[1] / "configs"
    routers = run_dirs(load_experiment(configs / "routers_study.toml"), Path("out"))
    main = run_dirs(load_experiment(configs / "fmnist_study.toml"), Path("out"))
    for variant in ("residual", "static_t", "dynamic"):
        assert routers["routers", variant, 2] == main["main", variant, 2]
    assert routers["routers-mhc", "residual", 1] == main["main", "residual", 1]
    assert len(set(routers.values()) - set(main.values())) == 12  # 4 routers x 3 seeds are new


LONGER = STUDY.replace('''[[group]]
name = "chunk"''', '''[[group]]
name = "long"
seeds = [0]
baseline = "residual"
[group.variants]
residual = ["model.routing.mode=residual", "train.steps=6"]
[[group]]
name = "chunk"''').replace('"train.steps=4",', '"train.steps=4", "train.ckpt_every=1", "train.keep_checkpoints=1",')


def test_a_longer_group_continues_the_shared_run_and_each_group_reads_its_own_length(tmp_path):
    from dar.study.experiment import execution_order, run_experiment

    path = write(tmp_path, LONGER)
    experiment = load_experiment(path)
    dirs = run_dirs(experiment, tmp_path)
    assert dirs["long", "residual", 0] == dirs["main", "residual", 0]
    order = [(p, item[3].train.steps) for p, item in execution_order(experiment, tmp_path)]
    shared = dirs["main", "residual", 0]
    assert order.index((shared, 4)) < order.index((shared, 6))  # trained to 4 first, then continued
    run_experiment(path, tmp_path, progress=False)
    evals = [json.loads(l)["step"] for l in (shared / "metrics.jsonl").read_text().splitlines() if "eval/fd_fmnist" in l]
    assert evals == [2, 4, 6]
    # the main group's final checkpoint survives the continuation, despite keep_checkpoints=1
    assert {c.name for c in (shared / "checkpoints").iterdir()} >= {"step_0000004", "step_0000006"}
    summary = summarize(path, tmp_path)
    assert len(summary["groups"]["main"]["residual"]["series"][0][0]) == 2  # steps 2 and 4 only
    assert summary["groups"]["long"]["residual"]["series"][0][0] == [2, 4, 6]


def test_a_run_interrupted_before_its_first_checkpoint_starts_again(tmp_path):
    from dar.study.experiment import is_finished, run_experiment

    path = write(tmp_path, STUDY.replace("seeds = [0, 1]", "seeds = [0]"))
    experiment = load_experiment(path)
    configs = {(g.name, v, s): c for g, v, s, c in experiment.runs()}
    dirs = run_dirs(experiment, tmp_path)
    interrupted = dirs["main", "residual", 0]
    interrupted.mkdir(parents=True)  # what a kill between the first log line and the first checkpoint leaves
    (interrupted / "config.json").write_text(configs["main", "residual", 0].to_json())
    (interrupted / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    run_experiment(path, tmp_path, progress=False)
    assert all(is_finished(dirs[key], config) for key, config in configs.items())
