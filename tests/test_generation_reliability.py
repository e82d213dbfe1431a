"""`dar sample` survives what users and machines do to it: bad counts, kills mid-write, shards
damaged on disk, a second process on the same output, a full disk. Every case ends in a clear error
or in the same samples an undisturbed run makes; the checkpoint is read once."""

import errno
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import dar.training.checkpoint as checkpoint_module
from dar.cli import main
from dar.generation.grid import save_checkpoint_grid
from dar.provenance import weights_sha256
from dar.training.checkpoint import latest_checkpoint, load_model
from dar.training.config import resolve
from dar.training.trainer import train

SAMPLER = ["sampler.method=euler", "sampler.steps=2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    config = resolve("fmnist", ["model.arch=SiT-Pico/8", "train.steps=2", "train.global_batch=4",
                                "train.sample_every=0", "train.ckpt_every=2"])
    train(config, path, progress=False)
    return path


def sample_args(run_dir, out, num=12, batch_size=3):
    return ["sample", str(run_dir), "--num", str(num), "--batch-size", str(batch_size), "--out", str(out),
            "--no-progress", *SAMPLER]


@pytest.mark.parametrize("option,value", [("--num", "0"), ("--num", "-3"), ("--batch-size", "0")])
def test_counts_must_be_positive_integers(run_dir, tmp_path, capsys, option, value):
    args = sample_args(run_dir, tmp_path / "s")
    args[args.index(option) + 1] = value
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert f"argument {option}: must be a positive integer, got '{value}'" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_grid_of_no_samples_is_a_clear_error(run_dir, tmp_path):
    model, config, _ = load_model(run_dir)
    with pytest.raises(ValueError, match="--num must be positive, got 0"):
        save_checkpoint_grid(model, config, tmp_path / "g.png", 0, config.sampler, 0)


def test_checkpoint_is_read_once_for_samples_record_and_grid(run_dir, tmp_path, monkeypatch):
    reads = []
    real = checkpoint_module.read_weights

    def counting(file):
        reads.append(file)
        return real(file)

    monkeypatch.setattr(checkpoint_module, "read_weights", counting)
    out = tmp_path / "s"
    assert main([*sample_args(run_dir, out, num=4, batch_size=4), "--grid", str(tmp_path / "g.png")]) == 0
    ckpt = latest_checkpoint(run_dir)
    assert reads == [ckpt / "ema.safetensors"]
    assert (tmp_path / "g.png").stat().st_size > 0
    record = json.loads((out / "samples.json").read_text())
    assert record["checkpoint"] == str(ckpt) and record["weights_file"] == str(ckpt / "ema.safetensors")
    assert record["weights"] == "ema" and record["step"] == 2 and record["num_samples"] == 4
    assert record["weights_sha256"] == weights_sha256(ckpt / "ema.safetensors")


def test_damaged_shards_are_recomputed_and_kill_leftovers_removed(run_dir, tmp_path, capsys):
    out = tmp_path / "s"
    args = sample_args(run_dir, out)  # 4 shards of 3 samples
    assert main(args) == 0
    expected = np.load(out / "samples.npz")["arr_0"].copy()
    shards = out / "shards"
    kept_inode = (shards / "shard_000000.npz").stat().st_ino
    data = (shards / "shard_000001.npz").read_bytes()
    (shards / "shard_000001.npz").write_bytes(data[: len(data) // 2])  # killed mid-copy / truncated on disk
    good = dict(np.load(shards / "shard_000002.npz"))
    np.savez(shards / "shard_000002.npz", **{**good, "labels": good["labels"] + 1})  # another request's shard
    np.savez(shards / "shard_000003.npz", **{**good, "arr_0": good["arr_0"][:2], "labels": good["labels"][:2]})
    leftovers = [shards / ".shard_000001.npz.tmp-999999", shards / ".shard_000002.tmp-999999.npz",
                 out / ".samples.npz.tmp-999999", out / ".samples.json.tmp-999999"]
    for path in leftovers:
        path.write_bytes(b"half-written")
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "shard_000001.npz: unreadable" in err and "shard_000002.npz: its labels are not the requested" in err
    assert "shard_000003.npz: holds uint8 (2, 32, 32, 1), expected uint8 (3, 32, 32, 1)" in err
    assert "shard_000000.npz" not in err and (shards / "shard_000000.npz").stat().st_ino == kept_inode
    assert np.array_equal(np.load(out / "samples.npz")["arr_0"], expected)
    assert not any(path.exists() for path in leftovers)


def test_second_sample_process_on_the_same_out_dir_is_refused(run_dir, tmp_path, capsys):
    out = tmp_path / "s"
    code = textwrap.dedent(f"""
        import sys
        from dar.files import directory_lock
        with directory_lock({str(out)!r}, "dar sample"):
            print("held", flush=True)
            sys.stdin.read()
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(sample_args(run_dir, out)) == 2
        err = capsys.readouterr().err
        assert err.startswith("dar sample: error: ") and len(err.strip().splitlines()) == 1
        assert f"{out} is in use by process {holder.pid} " in err and "(dar sample, since" in err
        assert not (out / "shards").exists() and not (out / "samples.npz").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert main(sample_args(run_dir, out)) == 0  # released: the directory is usable again


def test_full_disk_while_writing_the_record_leaves_the_previous_one(run_dir, tmp_path, monkeypatch):
    out = tmp_path / "s"
    assert main(sample_args(run_dir, out)) == 0
    before = (out / "samples.json").read_text()

    def disk_fills_up(self, text, *args, **kwargs):
        with open(self, "w") as handle:
            handle.write(text[: len(text) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(pathlib.Path, "write_text", disk_fills_up)
    with pytest.raises(OSError, match="No space left"):
        main(sample_args(run_dir, out))
    monkeypatch.undo()
    assert (out / "samples.json").read_text() == before
    assert not [p for p in os.listdir(out) if ".tmp-" in p]


def test_grid_never_opens_the_data_path_a_checkpoint_names(run_dir, tmp_path, monkeypatch, capsys):
    """A weights file's metadata comes from whoever wrote it: its data path is never read."""
    from safetensors.torch import save_file

    import dar.data
    import dar.data.datasets as datasets

    tensors, metadata = checkpoint_module.read_weights(latest_checkpoint(run_dir) / "ema.safetensors")
    stored = json.loads(metadata["dar_run_config"])
    stored["data"] = {**stored["data"], "name": "imagefolder", "path": "/etc", "image_size": 32}
    foreign = tmp_path / "foreign.safetensors"
    save_file(tensors, str(foreign), metadata={**metadata, "dar_run_config": json.dumps(stored)})

    def forbidden(*args, **kwargs):
        raise AssertionError("the grid read a dataset")

    for module in (dar.data, datasets):
        monkeypatch.setattr(module, "make_dataset", forbidden)
        monkeypatch.setattr(module, "ImageFolderDataset", forbidden)
    assert main(["sample", str(foreign), "--num", "20", "--grid", str(tmp_path / "g.png"), *SAMPLER]) == 0
    assert (tmp_path / "g.png").stat().st_size > 0


def test_kill_9_mid_sampling_then_rerun_gives_the_uninterrupted_samples(run_dir, tmp_path):
    """A real SIGKILL while shards are being written; the same command then finishes the job with
    every sample exactly as an uninterrupted run makes it, no shard written twice."""
    import signal
    import time

    whole = tmp_path / "whole"
    assert main(sample_args(run_dir, whole, num=40, batch_size=2)) == 0
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "dar.cli", *sample_args(run_dir, killed, num=40, batch_size=2)]
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((killed / "shards").glob("shard_00000[2-9].npz")) and time.monotonic() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait()
    done_before = {p.name: p.stat().st_ino for p in (killed / "shards").glob("shard_*.npz")}
    assert 3 <= len(done_before) < 20 and not (killed / "samples.npz").exists()
    assert main(sample_args(run_dir, killed, num=40, batch_size=2)) == 0
    assert all((killed / "shards" / name).stat().st_ino == inode for name, inode in done_before.items())
    for key in ("arr_0", "labels"):
        assert np.array_equal(np.load(killed / "samples.npz")[key], np.load(whole / "samples.npz")[key])
    assert not list(killed.rglob(".*tmp*"))
