"""A run directory survives what users and machines do to it: kills, full disks, second processes,
reruns, changed settings and files that are not what they claim. Every case ends in a clear error that
names the problem, or in a run that continues correctly; nothing is lost or left half-written."""

import errno
import json
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from dar.cli import main
from dar.errors import CheckpointError, RunDirBusy, TrainingDiverged
from dar.training.checkpoint import latest_checkpoint, load_model, read_weights
from dar.training.config import resolve
from dar.training.trainer import train

TINY = ["model.arch=SiT-Pico/8", "train.global_batch=8", "train.ckpt_every=2", "train.sample_every=0",
        "train.log_every=1", "train.keep_checkpoints=0"]


def tiny(*extra):
    return resolve("fmnist", [*TINY, *extra])


def hold_lock_in_another_process(directory):
    """A live second process holding ``directory``'s lock; stop it with .kill()."""
    code = textwrap.dedent(f"""
        import sys, time
        from dar.files import directory_lock
        with directory_lock({str(directory)!r}, "dar train"):
            print("held", flush=True)
            time.sleep(120)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_second_process_on_the_same_run_dir_is_refused_naming_the_holder(tmp_path):
    holder = hold_lock_in_another_process(tmp_path)
    try:
        with pytest.raises(RunDirBusy, match=rf"in use by process {holder.pid} .*dar train"):
            train(tiny("train.steps=2"), tmp_path, progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert latest_checkpoint(tmp_path) is None


def test_lock_file_of_a_dead_process_is_taken_over(tmp_path):
    holder = hold_lock_in_another_process(tmp_path)
    holder.kill()
    holder.wait()
    assert (tmp_path / ".lock").exists()  # the dead process's record stays behind
    summary = train(tiny("train.steps=2"), tmp_path, progress=False)
    assert summary["step"] == 2


def test_records_without_a_checkpoint_are_not_overwritten(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    (tmp_path / "config.json").write_text('{"old": true}')
    with pytest.raises(ValueError, match="metrics.jsonl, config.json of an earlier run but no checkpoint"):
        train(tiny("train.steps=2"), tmp_path, progress=False)
    assert (tmp_path / "config.json").read_text() == '{"old": true}'
    train(tiny("train.steps=2"), tmp_path, progress=False, overwrite=True)
    assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 2
    assert [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_interrupted_checkpoint_writes_are_removed_at_start(tmp_path, capsys):
    train(tiny("train.steps=2"), tmp_path, progress=False)
    partial = tmp_path / "checkpoints" / ".step_0000004.tmp-99999"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    train(tiny("train.steps=4"), tmp_path, progress=False)
    assert not partial.exists()
    assert "left by an interrupted checkpoint write" in capsys.readouterr().out


def test_full_disk_is_a_clear_error_and_leaves_nothing_behind(tmp_path, monkeypatch):
    import dar.training.checkpoint as checkpoint

    real_save = checkpoint.save_file

    def disk_full(tensors, path, metadata=None):
        if "rng" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(CheckpointError, match="filled up while writing the step 2 checkpoint"):
        train(tiny("train.steps=2"), tmp_path, progress=False)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_too_little_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(ValueError, match=r"not enough disk space for the step 2 checkpoint .* 1000.0 B free"):
        train(tiny("train.steps=2"), tmp_path, progress=False)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_torn_last_metrics_line_does_not_block_resume(tmp_path):
    train(tiny("train.steps=2"), tmp_path, progress=False)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # a kill during the append
    train(tiny("train.steps=4"), tmp_path, progress=False)
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]


def test_optimizer_file_that_needs_unpickling_is_refused_without_torch_advice(tmp_path):
    train(tiny("train.steps=2"), tmp_path, progress=False)
    with open(latest_checkpoint(tmp_path) / "optimizer.pt", "wb") as f:
        pickle.dump({"state": {}, "param_groups": [], "hook": print}, f)
    with pytest.raises(CheckpointError, match="holds objects other than tensors") as error:
        train(tiny("train.steps=4"), tmp_path, progress=False)
    assert "weights_only" not in str(error.value)


def test_missing_or_broken_state_json_names_the_file(tmp_path):
    train(tiny("train.steps=2"), tmp_path, progress=False)
    state = latest_checkpoint(tmp_path) / "state.json"
    text = state.read_text()
    state.unlink()
    with pytest.raises(CheckpointError, match=r"state.json is missing"):
        train(tiny("train.steps=4"), tmp_path, progress=False)
    state.write_text(text.replace('"step": 2', '"step": "two"'))
    with pytest.raises(CheckpointError, match=r"state.json: field step must be an integer"):
        train(tiny("train.steps=4"), tmp_path, progress=False)


@pytest.mark.parametrize("field, value, message", [
    ("dar_run_config", "{not json", "metadata field dar_run_config is not valid JSON"),
    ("step", "2.5", "metadata field step must be an integer, got '2.5'"),
])
def test_bad_weights_metadata_names_file_and_field(tmp_path, field, value, message):
    train(tiny("train.steps=2"), tmp_path, progress=False)
    file = latest_checkpoint(tmp_path) / "ema.safetensors"
    tensors, metadata = read_weights(file)
    save_file(tensors, str(file), metadata={**metadata, field: value})
    with pytest.raises(CheckpointError, match=rf"ema.safetensors: {message}"):
        load_model(tmp_path)


def test_steps_below_the_checkpoint_are_refused_and_nothing_is_rewritten(tmp_path):
    train(tiny("train.steps=4"), tmp_path, progress=False)
    config_before = (tmp_path / "config.json").read_text()
    with pytest.raises(ValueError, match=r"train.steps=2 is below the step of .*step_0000004 \(4\)"):
        train(tiny("train.steps=2"), tmp_path, progress=False)
    assert (tmp_path / "config.json").read_text() == config_before


def test_rerunning_a_finished_run_reports_its_last_loss(tmp_path, capsys):
    first = train(tiny("train.steps=2"), tmp_path, progress=False)
    again = train(tiny("train.steps=2"), tmp_path, progress=False)
    assert again["already_finished"] and again["step"] == 2
    assert again["final_loss"] == pytest.approx(first["final_loss"])
    assert "already finished at step 2" in capsys.readouterr().out


def test_resume_on_other_data_is_refused_unless_allowed_and_then_recorded(tmp_path):
    import numpy as np

    from dar.data import BUILTIN_PATH

    with np.load(BUILTIN_PATH) as archive:
        arrays = dict(archive)
    arrays["train_images"] = arrays["train_images"][:6000]
    arrays["train_labels"] = arrays["train_labels"][:6000]
    smaller = tmp_path / "smaller.npz"
    np.savez(smaller, **arrays)
    run = tmp_path / "run"
    train(tiny("train.steps=2"), run, progress=False)
    other = tiny("train.steps=4", f"data.path={smaller}")
    with pytest.raises(ValueError, match=r"training data differ .*12,000 examples.*now builtin .*6,000 examples"):
        train(other, run, progress=False)
    train(other, run, progress=False, allow_data_change=True)
    state = json.loads((latest_checkpoint(run) / "state.json").read_text())
    assert state["data"]["size"] == 6000 and state["data_changes"][0]["from"]["size"] == 12000
    events = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if "event" in l]
    assert events[0]["event"] == "data_change" and events[0]["step"] == 2


def test_nan_loss_before_any_checkpoint_does_not_claim_one(tmp_path, monkeypatch):
    from dar.diffusion import transport

    real = transport.Transport.loss
    monkeypatch.setattr(transport.Transport, "loss", lambda self, *a: real(self, *a) * float("nan"))
    with pytest.raises(TrainingDiverged, match="step 1; stopped before the update, no checkpoint had been written"):
        train(tiny("train.steps=4"), tmp_path, progress=False)


def test_without_a_terminal_progress_is_plain_lines_with_events(tmp_path, capsys):
    train(tiny("train.steps=4", "train.log_every=2"), tmp_path, progress=True)
    out = capsys.readouterr()
    lines = [l for l in out.out.splitlines() if l.startswith("[dar] step ")]
    assert [l.split()[2] for l in lines] == ["2/4", "4/4"]
    assert "wrote checkpoint" in out.out and "\r" not in out.err


@pytest.mark.parametrize("override, message", [
    ("train.lr=inf", "train.lr must be a finite number"),
    ("train.grad_clip=-1", "train.grad_clip must be >= 0"),
    ("train.grad_clip=nan", "train.grad_clip must be a finite number"),
    ("model.mlp_ratio=0", "model.mlp_ratio must give an MLP of at least one hidden unit"),
    ("model.routing.chunk_size=25", "routing.chunk_size=25 is larger than the 24 routed sublayers"),
])
def test_bad_config_values_are_named(override, message, capsys):
    assert main(["train", *TINY, override, "--run-dir", "unused", "--no-progress"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("device, message", [("gpu", "--device 'gpu' is not one of cpu, cuda, cuda:N"),
                                             ("cuda", "--device cuda: CUDA is not available")])
def test_bad_or_missing_device_is_a_clear_error(tmp_path, device, message, capsys):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["train", *TINY, "--device", device, "--run-dir", str(tmp_path), "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_same_weights_have_the_same_hash_whatever_the_metadata_order(tmp_path):
    from dar.provenance import file_sha256, weights_sha256

    tensors = {"a": torch.randn(3), "b": torch.arange(4)}
    save_file(tensors, str(tmp_path / "one.safetensors"), metadata={"x": "1", "y": "2"})
    save_file(tensors, str(tmp_path / "two.safetensors"), metadata={"y": "2", "x": "1", "z": "3"})
    assert file_sha256(tmp_path / "one.safetensors") != file_sha256(tmp_path / "two.safetensors")
    assert weights_sha256(tmp_path / "one.safetensors") == weights_sha256(tmp_path / "two.safetensors")
    save_file({**tensors, "b": torch.arange(1, 5)}, str(tmp_path / "three.safetensors"))
    assert weights_sha256(tmp_path / "three.safetensors") != weights_sha256(tmp_path / "one.safetensors")


def test_pruning_tolerates_a_checkpoint_another_process_already_removed(tmp_path, monkeypatch):
    import dar.training.checkpoint as checkpoint

    train(tiny("train.steps=2"), tmp_path, progress=False)
    real = checkpoint.list_checkpoints
    vanished = tmp_path / "checkpoints" / "step_0000001"  # listed, then removed by a concurrent pruner
    monkeypatch.setattr(checkpoint, "list_checkpoints", lambda run_dir: [vanished, *real(run_dir)])
    train(tiny("train.steps=4", "train.keep_checkpoints=1"), tmp_path, progress=False)
    assert [p.name for p in real(tmp_path)] == ["step_0000004"]
