import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from dar.training.checkpoint import CheckpointError, latest_checkpoint, load_model
from dar.training.config import resolve
from dar.training.trainer import TrainingDiverged, train

TINY = ["model.arch=SiT-Pico/8", "train.global_batch=8", "train.ckpt_every=0", "train.sample_every=0",
        "train.log_every=1", "train.keep_checkpoints=0"]


def tiny_config(*extra, routing="model.routing.query=static_t"):
    return resolve("fmnist", [*TINY, routing, *extra])


def weights(run_dir, which="model"):
    return load_file(str(latest_checkpoint(run_dir) / f"{which}.safetensors"))


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("routing", ["model.routing.mode=residual", "model.routing.query=dynamic"])
def test_resume_is_exact(tmp_path, routing):
    config = tiny_config("train.steps=6", routing=routing)
    train(config, tmp_path / "straight", progress=False)
    train(config, tmp_path / "interrupted", progress=False, stop_after=3)
    assert latest_checkpoint(tmp_path / "interrupted").name == "step_0000003"
    train(config, tmp_path / "interrupted", resume=True, progress=False)
    for which in ("model", "ema"):
        assert_identical(weights(tmp_path / "straight", which), weights(tmp_path / "interrupted", which))
    losses = [[json.loads(l)["loss"] for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("straight", "interrupted")]
    assert losses[0] == losses[1] and len(losses[0]) == 6


def test_resume_refuses_a_different_config(tmp_path):
    train(tiny_config("train.steps=2"), tmp_path, progress=False)
    with pytest.raises(ValueError, match="train.lr"):
        train(tiny_config("train.steps=4", "train.lr=0.01"), tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(tiny_config(), tmp_path / "empty", resume=True, progress=False)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    from dar.diffusion import transport

    real, calls = transport.Transport.loss, {"n": 0}

    def poisoned(self, *args):
        calls["n"] += 1
        loss = real(self, *args)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(transport.Transport, "loss", poisoned)
    with pytest.raises(TrainingDiverged, match="step 4.*step 2"):
        train(tiny_config("train.steps=6", "train.ckpt_every=2"), tmp_path, progress=False)
    assert latest_checkpoint(tmp_path).name == "step_0000002"
    model, config, step = load_model(tmp_path)
    assert step == 2 and all(torch.isfinite(p).all() for p in model.parameters())


def test_data_and_model_mismatch_is_reported(tmp_path):
    with pytest.raises(ValueError, match="model.in_channels=3 but the data has 1"):
        train(tiny_config("model.in_channels=3"), tmp_path, progress=False)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, config, run_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    train(config, run_dir, device="cpu", progress=False)


def test_two_process_ddp_equals_one_process(tmp_path):
    config = tiny_config("train.steps=3")
    torch.set_num_threads(1)
    train(config, tmp_path / "single", device="cpu", progress=False)
    mp.spawn(_ddp_worker, args=(2, _free_port(), config, tmp_path / "ddp"), nprocs=2, join=True)
    single, ddp = weights(tmp_path / "single"), weights(tmp_path / "ddp")
    for k in single:
        # relative to the tensor, or to one step's update (lr) for tensors that start at zero
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-4, atol=1e-3 * config.train.lr)
    with pytest.raises(mp.ProcessRaisedException, match="not divisible by 2 processes"):
        mp_config = tiny_config("train.global_batch=7")
        mp.spawn(_ddp_worker, args=(2, _free_port(), mp_config, tmp_path / "odd"), nprocs=2, join=True)


def test_ema_update_is_a_lerp_towards_the_model():
    from dar.training.trainer import update_ema

    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in ema.parameters()]
    update_ema(ema, model, 0.9)
    for e, b, m in zip(ema.parameters(), before, model.parameters()):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * m)


def test_periodic_evaluation_logs_an_fd_vs_iteration_series(tmp_path):
    config = tiny_config("train.steps=4", "train.eval_every=2", "train.eval_samples=20", "sampler.method=euler",
                         "sampler.steps=2")
    train(config, tmp_path, progress=False)
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/fd_fmnist" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert r["eval/num_samples"] == 20 and r["eval/nfe"] == 2 and r["eval/sampler"] == "euler"
        assert 0.0 <= r["eval/class_acc"] <= 1.0 and r["eval/fd_fmnist"] > 0
    with pytest.raises(ValueError, match="eval_every needs data.name=builtin"):
        tiny_config("train.eval_every=2", "data.name=idx", "data.path=/data/mnist")


def test_a_checkpoint_written_before_a_config_field_existed_resumes(tmp_path):
    # Fields added to the config later are absent from older checkpoints: they count as their defaults
    train(tiny_config("train.steps=2"), tmp_path, stop_after=1, progress=False)
    state_file = latest_checkpoint(tmp_path) / "state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["repa"], state["config"]["train"]["router_lr_scale"], state["config"]["model"]["depth"]
    state_file.write_text(json.dumps(state))
    assert train(tiny_config("train.steps=2"), tmp_path, progress=False)["step"] == 2
    with pytest.raises(ValueError, match="train.router_lr_scale"):  # a real change is still refused
        train(tiny_config("train.steps=3", "train.router_lr_scale=2"), tmp_path, progress=False)
