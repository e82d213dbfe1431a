import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dar.training.checkpoint import CheckpointError, latest_checkpoint, load_model
from dar.cli import main
from dar.training.config import resolve

TINY = ["model.arch=SiT-Pico/8", "train.global_batch=8", "train.steps=2", "train.sample_every=2",
        "train.log_every=1", "sampler.steps=2", "sampler.method=euler"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    assert main(["train", *TINY, "--run-dir", str(path), "--no-progress"]) == 0
    return path


def test_train_writes_config_metrics_grid_and_checkpoint(run_dir):
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["arch"] == "SiT-Pico/8" and config["train"]["steps"] == 2
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    assert (run_dir / "samples" / "step_0000002.png").stat().st_size > 0
    ckpt = latest_checkpoint(run_dir)
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "ema.safetensors", "optimizer.pt",
                                                 "rng.safetensors", "state.json"}
    assert json.loads((ckpt / "state.json").read_text())["data_position"] == 16


def test_info_reads_everything_from_the_checkpoint(run_dir, capsys):
    assert main(["info", str(run_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["step"] == 2 and info["routing"] == "dar-static_t-c4"
    assert info["source_set_sizes"][:5] == [1, 2, 3, 4, 2]


def test_sample_npz_is_resumable_and_records_settings(run_dir, tmp_path, capsys):
    out = tmp_path / "s"
    args = ["sample", str(run_dir), "--num", "10", "--batch-size", "4", "--out", str(out), "--no-progress",
            "sampler.method=euler", "sampler.steps=3"]
    assert main(args) == 0
    data = np.load(out / "samples.npz")
    assert data["arr_0"].shape == (10, 32, 32, 1) and data["arr_0"].dtype == np.uint8
    assert data["labels"].tolist() == [i % 10 for i in range(10)]
    record = json.loads((out / "samples.json").read_text())
    assert record["nfe"] == 3 and record["sampler"]["method"] == "euler" and record["step"] == 2
    assert len(record["weights_sha256"]) == 64 and record["class_counts"] == [1] * 10
    first = data["arr_0"].copy()
    (out / "shards" / "shard_000001.npz").unlink()  # an interrupted run: one shard missing
    assert main(args) == 0
    assert np.array_equal(np.load(out / "samples.npz")["arr_0"], first)
    assert main(args[:-1] + ["sampler.steps=4"]) == 2
    assert "different settings (sampler)" in capsys.readouterr().err


def test_sample_grid(run_dir, tmp_path):
    assert main(["sample", str(run_dir), "--num", "20", "--grid", str(tmp_path / "g.png"), "sampler.steps=2"]) == 0
    assert (tmp_path / "g.png").stat().st_size > 0


def test_unknown_option_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--stepz", "10"])
    assert exit_info.value.code == 2
    assert "--stepz" in capsys.readouterr().err


@pytest.mark.parametrize("override,message", [
    ("train.stepz=10", "unknown config key train.stepz"),
    ("train.steps=ten", "train.steps must be an integer"),
    ("model.routing.query=fast", "routing.query='fast'"),
    ("train.precision=fp8", "train.precision='fp8'"),
])
def test_bad_config_values_name_the_key(override, message, capsys, tmp_path):
    assert main(["train", override, "--run-dir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_unknown_preset_and_sampler_override_errors(run_dir, capsys):
    assert main(["sample", str(run_dir), "--grid", "x.png", "train.steps=3"]) == 2
    assert "sampler.KEY=VALUE overrides only" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown preset"):
        resolve("nope")
    with pytest.raises(SystemExit):
        main(["train", "--preset", "nope"])


def test_truncated_and_mismatched_checkpoints_are_clear_errors(run_dir, tmp_path):
    ckpt = latest_checkpoint(run_dir)
    data = (ckpt / "ema.safetensors").read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(truncated)
    tensors = load_file(str(ckpt / "ema.safetensors"))
    from safetensors import safe_open

    with safe_open(str(ckpt / "ema.safetensors"), "pt") as f:
        metadata = f.metadata()
    tensors["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    wrong = tmp_path / "wrong.safetensors"
    save_file(tensors, str(wrong), metadata=metadata)
    with pytest.raises(CheckpointError, match=r"blocks.0.attn.qkv.weight has shape \(3, 3\)"):
        load_model(wrong)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "missing")
    assert main(["info", str(truncated)]) == 2


def test_convert_official_sit_checkpoint(tmp_path, capsys):
    from dar.models.sit import ModelConfig, build_model
    from dar.routing import RoutingConfig

    official = build_model(ModelConfig(arch="SiT-Pico/8", learn_sigma=True, num_classes=1000,
                                       routing=RoutingConfig(mode="residual")))
    with torch.no_grad():
        for p in official.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    torch.save(official.state_dict(), tmp_path / "SiT-Pico-8.pt")
    out = tmp_path / "converted.safetensors"
    assert main(["convert-sit", str(tmp_path / "SiT-Pico-8.pt"), "--arch", "SiT-Pico/8", "--out", str(out)]) == 0
    model, config, step = load_model(out)
    assert config.model.routing.mode == "residual" and not config.model.learn_sigma and step == -1
    x, t, y = torch.randn(2, 4, 32, 32), torch.rand(2), torch.tensor([3, 999])
    torch.testing.assert_close(model(x, t, y), official.eval()(x, t, y))
    torch.save({"not": "weights"}, tmp_path / "bad.pt")
    assert main(["convert-sit", str(tmp_path / "bad.pt"), "--arch", "SiT-Pico/8", "--out", str(out)]) == 2
    assert "does not match SiT-Pico/8" in capsys.readouterr().err


def test_convert_sit_to_a_dar_model_says_so_and_routes(tmp_path, capsys):
    from dar.models.sit import ModelConfig, build_model
    from dar.routing import RoutingConfig

    official = build_model(ModelConfig(arch="SiT-Pico/8", learn_sigma=True, routing=RoutingConfig(mode="residual")))
    torch.save(official.state_dict(), tmp_path / "official.pt")
    out = tmp_path / "dar.safetensors"
    assert main(["convert-sit", str(tmp_path / "official.pt"), "--arch", "SiT-Pico/8", "--out", str(out),
                 "model.routing.mode=dar"]) == 0
    assert "(SiT-Pico/8, dar-static_t-c4, from" in capsys.readouterr().out
    model, config, _ = load_model(out)
    assert config.model.routing.mode == "dar" and len(model.router.aggregators) == 25
    assert not list(tmp_path.glob(".dar.safetensors.tmp-*"))


def test_convert_sit_refuses_pickled_code_without_torch_advice(tmp_path, capsys):
    import pickle

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"w": print}, f)
    assert main(["convert-sit", str(tmp_path / "evil.pt"), "--arch", "SiT-Pico/8", "--out",
                 str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "cannot read" in err and "weights_only" not in err and not (tmp_path / "x.safetensors").exists()
