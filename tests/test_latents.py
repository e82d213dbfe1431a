"""`dar prepare-latents` and LatentShards: a tiny random SD-VAE-shaped autoencoder, folders of a few
64x64 PNGs made here (4 x 8 x 8 latents), all on the CPU and offline."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

pytest.importorskip("diffusers")

from dar.cli import main  # noqa: E402
from dar.data import ImageFolderDataset, LatentShards, make_dataset  # noqa: E402
from dar.data.latents import MANIFEST_NAME, shard_name  # noqa: E402
from dar.data.vae import load_vae, save_vae, tiny_autoencoder  # noqa: E402
from dar.provenance import file_sha256, weights_sha256  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCALE = 0.18215


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    return save_vae(tiny_autoencoder(0), tmp_path_factory.mktemp("vae") / "vae")


def make_folder(root: Path, per_class: int = 3, classes=("ant", "bee"), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / c / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("images") / "train")


def prepare(source, out, vae, *extra, capsys=None) -> tuple[int, str]:
    rc = main(["prepare-latents", str(source), "--out", str(out), "--vae", str(vae), "--resolution", "64",
               "--device", "cpu", "--no-progress", *map(str, extra)])
    err = capsys.readouterr().err if capsys is not None else ""
    return rc, err


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every shard, keyed by file and name."""
    out = {}
    for path in sorted(directory.glob("shard_*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            out.update({f"{path.name}/{name}": handle.get_tensor(name).clone() for name in handle.keys()})
    return out


def assert_same_tensors(first: Path, second: Path) -> None:
    a, b = tensors(first), tensors(second)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different}"


def images_of(folder: Path) -> torch.Tensor:
    dataset = ImageFolderDataset(folder, 64)
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


@pytest.fixture(scope="module")
def moments_dir(tmp_path_factory, folder, vae_dir) -> Path:
    out = tmp_path_factory.mktemp("moments") / "latents"
    assert prepare(folder, out, vae_dir, "--shard-size", 4)[0] == 0
    return out


# ---------------------------------------------------------------------------------------------
# What is written
# ---------------------------------------------------------------------------------------------


def test_manifest_records_the_data_and_how_they_were_made(moments_dir, vae_dir, folder):
    m = json.loads((moments_dir / MANIFEST_NAME).read_text())
    assert (m["format"], m["format_version"], m["store"], m["dtype"], m["stored_scaled"]) == \
        ("dar-latents", 1, "moments", "float16", False)
    assert (m["scale_factor"], m["resolution"], m["flip"], m["latent_shape"]) == (SCALE, 64, False, [4, 8, 8])
    assert m["vae"]["weights_sha256"] == weights_sha256(vae_dir / "diffusion_pytorch_model.safetensors")
    assert m["vae"]["config"]["latent_channels"] == 4 and m["vae"]["source"] == str(vae_dir.resolve())
    listing = (moments_dir / "images.txt").read_text()
    assert m["source"]["sha256"] == hashlib.sha256(listing.encode()).hexdigest()
    assert [line.split("\t")[0] for line in listing.splitlines()] == [f"{c}/{i:03d}.png" for c in ("ant", "bee")
                                                                     for i in range(3)]
    assert (m["source"]["kind"], m["source"]["images"], m["source"]["skipped"]) == ("imagefolder", 6, [])
    assert m["class_names"] == ["ant", "bee"] and m["count"] == 6 and m["shard_size"] == 4
    assert [(s["file"], s["images"], s["examples"]) for s in m["shards"]] == \
        [("shard_000000.safetensors", [0, 4], 4), ("shard_000001.safetensors", [4, 6], 2)]
    assert all(s["sha256"] == file_sha256(moments_dir / s["file"]) for s in m["shards"])
    assert {"torch", "safetensors", "diffusers"} <= set(m["versions"])
    stored = tensors(moments_dir)
    assert torch.equal(stored["shard_000001.safetensors/index"], torch.tensor([4, 5]))
    assert torch.equal(stored["shard_000000.safetensors/labels"], torch.tensor([0, 0, 0, 1]))
    assert stored["shard_000000.safetensors/mean"].dtype == torch.float16
    assert not list(moments_dir.glob(".shard_*"))


def test_moments_are_the_vaes_posterior_and_batches_draw_from_it(moments_dir, vae_dir, folder):
    mean, std = load_vae(vae_dir).encode_moments(images_of(folder))
    ds = LatentShards(moments_dir)
    stored = tensors(moments_dir)
    stored_mean = torch.cat([stored[f"{shard_name(k)}/mean"] for k in (0, 1)])
    stored_std = torch.cat([stored[f"{shard_name(k)}/std"] for k in (0, 1)])
    torch.testing.assert_close(stored_mean.float(), mean, rtol=2e-3, atol=1e-4)  # fp16 rounding
    torch.testing.assert_close(stored_std.float(), std, rtol=2e-3, atol=1e-6)
    assert (ds.channels, ds.image_size, ds.num_classes, len(ds)) == (4, 8, 2, 6)
    indices = torch.tensor([5, 0, 3, 3])
    x, y = ds.get_batch(indices, torch.Generator().manual_seed(7))
    eps = torch.randn((4, 4, 8, 8), generator=torch.Generator().manual_seed(7))  # whole batch, index order
    expected = (eps * stored_std[indices].float() + stored_mean[indices].float()) * SCALE
    assert torch.equal(x, expected) and torch.equal(y, torch.tensor([1, 0, 1, 1]))
    x0, y0 = ds[5]
    assert torch.equal(x0, stored_mean[5].float() * SCALE) and y0 == 1


def test_get_batch_is_deterministic_and_draws_fresh_latents(moments_dir):
    ds = LatentShards(moments_dir)
    indices = torch.tensor([1, 4, 2])
    a, _ = ds.get_batch(indices, torch.Generator().manual_seed(3))
    b, _ = ds.get_batch(indices, torch.Generator().manual_seed(3))
    c, _ = ds.get_batch(indices, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(ds.get_batch(indices)[0], ds.get_batch(indices, torch.Generator().manual_seed(0))[0])
    with pytest.raises(IndexError):
        ds.get_batch(torch.tensor([6]))


def test_shards_are_memory_mapped_not_loaded(moments_dir):
    ds = LatentShards(moments_dir)
    assert not ds._mapped  # nothing mapped until a batch needs it
    ds.get_batch(torch.tensor([0, 5]))
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps")
    regions = []
    for line in maps.read_text().splitlines():
        if line.endswith(".safetensors") and str(moments_dir.resolve()) in line:
            lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
            regions.append((lo, hi))
    for shard in ds._mapped.values():
        for tensor in shard.values():
            assert any(lo <= tensor.data_ptr() < hi for lo, hi in regions), "a shard tensor is not on the file's map"
    big = [k for k, v in vars(ds).items() if isinstance(v, torch.Tensor) and v.numel() > len(ds)]
    assert not big  # the dataset itself holds only labels and offsets
    copy = pickle.loads(pickle.dumps(ds))  # what a DataLoader worker receives: no data, it maps the files itself
    assert not copy._mapped and torch.equal(copy.get_batch(torch.tensor([0, 5]))[0], ds.get_batch(torch.tensor([0, 5]))[0])


def test_training_runs_on_prepared_latents(tmp_path, moments_dir):
    from dar.training.config import resolve
    from dar.training.trainer import train

    config = resolve("fmnist", ["model.arch=SiT-Pico/8", "model.in_channels=4", "model.input_size=8",
                                "model.num_classes=2", "data.name=latents", f"data.path={moments_dir}",
                                "data.hflip=false", "train.global_batch=4", "train.steps=2", "train.ckpt_every=2",
                                "train.sample_every=0", "train.log_every=1"])
    summary = train(config, tmp_path / "run", progress=False)
    assert summary["step"] == 2 and summary["final_loss"] > 0
    state = json.loads(next((tmp_path / "run").rglob("state.json")).read_text())
    assert state["data"]["sha256"] == LatentShards(moments_dir).fingerprint()


def test_samples_are_seeded_per_image(tmp_path, folder, vae_dir, moments_dir):
    assert prepare(folder, tmp_path / "a", vae_dir, "--store", "samples", "--shard-size", 4)[0] == 0
    assert prepare(folder, tmp_path / "b", vae_dir, "--store", "samples", "--shard-size", 2, "--batch-size", 1)[0] == 0
    assert prepare(folder, tmp_path / "c", vae_dir, "--store", "samples", "--shard-size", 4, "--seed", 1)[0] == 0
    assert prepare(folder, tmp_path / "d", vae_dir, "--store", "samples", "--shard-size", 4)[0] == 0
    a, b, c, d = (LatentShards(tmp_path / name) for name in "abcd")
    assert_same_tensors(tmp_path / "a", tmp_path / "d")  # a rerun: identical
    # another sharding and VAE batch: the same draws (per image), the VAE's float noise aside
    torch.testing.assert_close(a.get_batch(torch.arange(6))[0], b.get_batch(torch.arange(6))[0], rtol=0, atol=1e-3)
    assert not torch.allclose(a.get_batch(torch.arange(6))[0], c.get_batch(torch.arange(6))[0], atol=1e-2)
    x, _ = a.get_batch(torch.arange(6), torch.Generator().manual_seed(9))
    assert torch.equal(x, a.get_batch(torch.arange(6))[0])  # nothing is drawn when reading
    stored = tensors(tmp_path / "a")
    assert set(stored) == {f"{shard_name(k)}/{n}" for k in (0, 1) for n in ("latents", "labels", "index", "flipped")}
    assert torch.equal(x, torch.cat([stored[f"{shard_name(k)}/latents"] for k in (0, 1)]).float() * SCALE)
    m = LatentShards(moments_dir)
    mean, std = m._gather(torch.arange(6)).values()
    assert ((x / SCALE - mean.float()).abs() <= 6 * std.float() + 1e-2).all()  # a draw from the posterior
    assert a.manifest["seed"] == 0 and "SeedSequence" in a.manifest["sample_rng"]


def test_flipped_copies_are_the_latents_of_mirrored_images(tmp_path, folder, vae_dir):
    assert prepare(folder, tmp_path / "out", vae_dir, "--flip", "--shard-size", 4)[0] == 0
    ds = LatentShards(tmp_path / "out")
    assert len(ds) == 12 and torch.equal(ds.labels, torch.tensor([0] * 6 + [1] * 6)) and ds.flipped_copies
    stored = tensors(tmp_path / "out")
    assert torch.equal(stored["shard_000000.safetensors/index"], torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    assert torch.equal(stored["shard_000000.safetensors/flipped"], torch.tensor([False, True] * 4))
    pixels = images_of(folder)
    mean, _ = load_vae(vae_dir).encode_moments(pixels.flip(-1))
    stored_mean = torch.cat([stored[f"{shard_name(k)}/mean"] for k in (0, 1)]).float()
    torch.testing.assert_close(stored_mean[1::2], mean, rtol=2e-3, atol=1e-4)
    assert not torch.allclose(stored_mean[0::2], mean, atol=1e-2)


def test_npz_source_equals_the_same_images_in_a_folder(tmp_path, folder, vae_dir, moments_dir):
    dataset = ImageFolderDataset(folder, 64)
    pixels = np.stack([np.asarray(Image.open(path).convert("RGB")) for path, _ in dataset.samples])
    np.savez(tmp_path / "images.npz", arr_0=pixels, labels=dataset.labels.numpy())
    np.savez_compressed(tmp_path / "packed.npz", arr_0=pixels, labels=dataset.labels.numpy())
    for name in ("images", "packed"):  # memory-mapped (stored) and read (compressed) arrays
        assert prepare(tmp_path / f"{name}.npz", tmp_path / name, vae_dir, "--shard-size", 4)[0] == 0
        assert_same_tensors(tmp_path / name, moments_dir)
    m = json.loads((tmp_path / "images" / MANIFEST_NAME).read_text())
    assert m["source"]["kind"] == "npz" and m["source"]["sha256"] == file_sha256(tmp_path / "images.npz")
    assert m["class_names"] == ["0", "1"] and m["source"]["list_file"] is None
    # other sizes are center-cropped the ADM way
    from dar.data.datasets import center_crop_arr

    wide = np.random.default_rng(1).integers(0, 256, (2, 64, 96, 3), dtype=np.uint8)
    np.savez(tmp_path / "wide.npz", arr_0=wide)
    assert prepare(tmp_path / "wide.npz", tmp_path / "wide", vae_dir)[0] == 0
    cropped = np.stack([center_crop_arr(Image.fromarray(w), 64) for w in wide]).transpose(0, 3, 1, 2)
    mean, _ = load_vae(vae_dir).encode_moments(torch.from_numpy(cropped).float() / 127.5 - 1)
    torch.testing.assert_close(tensors(tmp_path / "wide")["shard_000000.safetensors/mean"].float(), mean,
                               rtol=2e-3, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Interruptions and reruns
# ---------------------------------------------------------------------------------------------


def test_kill_9_then_rerun_equals_an_uninterrupted_run(tmp_path, vae_dir):
    source = make_folder(tmp_path / "many", per_class=12, seed=3)
    args = [str(source), "--out", str(tmp_path / "killed"), "--vae", str(vae_dir), "--resolution", "64",
            "--device", "cpu", "--no-progress", "--shard-size", "1", "--batch-size", "1", "--workers", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "dar.cli", "prepare-latents", *args], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = tmp_path / "killed" / shard_name(0)
    deadline = time.monotonic() + 120
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert first.exists(), process.stderr.read().decode()
    written = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "killed").glob("shard_*.safetensors")}
    assert not (tmp_path / "killed" / MANIFEST_NAME).exists() and len(written) < 24
    leftover = tmp_path / "killed" / f".{shard_name(7)}.tmp-999999"  # what a kill during a write leaves
    leftover.write_bytes(b"half a shard")

    assert main(["prepare-latents", *args]) == 0
    assert main(["prepare-latents", str(source), "--out", str(tmp_path / "whole"), *args[3:]]) == 0
    assert not leftover.exists() and not list((tmp_path / "killed").glob(".shard_*"))
    for name, mtime in written.items():  # finished shards were kept, not written again
        assert (tmp_path / "killed" / name).stat().st_mtime_ns == mtime
    assert_same_tensors(tmp_path / "killed", tmp_path / "whole")
    assert len(list((tmp_path / "killed").glob("shard_*.safetensors"))) == 24
    assert LatentShards(tmp_path / "killed").fingerprint() == LatentShards(tmp_path / "whole").fingerprint()


def test_torn_shard_is_found_and_recomputed(tmp_path, folder, vae_dir, capsys):
    out = tmp_path / "out"
    assert prepare(folder, out, vae_dir, "--shard-size", 2)[0] == 0
    before = tensors(out)
    shard = out / shard_name(1)
    shard.write_bytes(shard.read_bytes()[:-40])  # e.g. a copy cut short
    with pytest.raises(ValueError, match=r"shard_000001.safetensors: unreadable"):
        LatentShards(out)
    rc, err = prepare(folder, out, vae_dir, "--shard-size", 2, capsys=capsys)
    assert rc == 0 and "shard_000001.safetensors: unreadable" in err and "recomputing it" in err
    after = tensors(out)
    assert all(torch.equal(before[k], after[k]) for k in before)
    LatentShards(out)  # the manifest describes the shards again


def test_rerun_with_other_settings_or_inputs_is_refused(tmp_path, folder, vae_dir, capsys):
    out = tmp_path / "out"
    assert prepare(folder, out, vae_dir)[0] == 0
    rc, err = prepare(folder, out, vae_dir, "--store", "samples", capsys=capsys)
    assert rc == 2 and "different settings or inputs (seed, store)" in err
    rc, err = prepare(folder, out, vae_dir, "--flip", "--shard-size", 3, capsys=capsys)
    assert rc == 2 and "(flip, shard_size)" in err
    other_vae = save_vae(tiny_autoencoder(1), tmp_path / "other_vae")
    rc, err = prepare(folder, out, other_vae, capsys=capsys)
    assert rc == 2 and "(vae)" in err
    changed = shutil.copytree(folder, tmp_path / "changed")
    Image.new("RGB", (64, 64)).save(changed / "ant" / "new.png")
    rc, err = prepare(changed, out, vae_dir, capsys=capsys)
    assert rc == 2 and "(source)" in err
    assert prepare(folder, out, vae_dir)[0] == 0  # the same request continues (here: nothing left to do)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "latents.safetensors").write_bytes(b"")
    rc, err = prepare(folder, foreign, vae_dir, capsys=capsys)
    assert rc == 2 and "not a directory this command made" in err


def test_unreadable_images_are_listed_or_left_out(tmp_path, vae_dir, capsys):
    source = make_folder(tmp_path / "src", per_class=2)
    (source / "bee" / "broken.png").write_bytes(b"not a png")
    rc, err = prepare(source, tmp_path / "strict", vae_dir, capsys=capsys)
    assert rc == 2 and "1 unreadable image file(s)" in err and "broken.png" in err
    assert not list((tmp_path / "strict").glob("shard_*"))  # found before anything was encoded
    rc, _ = prepare(source, tmp_path / "lenient", vae_dir, "--bad-images", "skip", capsys=capsys)
    assert rc == 0
    m = json.loads((tmp_path / "lenient" / MANIFEST_NAME).read_text())
    assert m["count"] == 4 and [s["path"] for s in m["source"]["skipped"]] == ["bee/broken.png"]


def test_images_that_fail_to_decode_stop_or_are_left_out_by_index(tmp_path, vae_dir, capsys):
    source = make_folder(tmp_path / "src", per_class=2)
    Image.open(source / "ant" / "001.png").convert("RGB").save(source / "ant" / "001.jpg", "JPEG")
    (source / "ant" / "001.png").unlink()
    jpeg = (source / "ant" / "001.jpg").read_bytes()
    (source / "ant" / "001.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # passes PIL's verify, fails to decode
    rc, err = prepare(source, tmp_path / "strict", vae_dir, capsys=capsys)
    assert rc == 2 and "001.jpg: cannot decode image" in err and "--bad-images skip" in err
    rc, err = prepare(source, tmp_path / "lenient", vae_dir, "--bad-images", "skip", "--shard-size", 2,
                      capsys=capsys)
    assert rc == 0 and "leaving out ant/001.jpg" in err
    ds = LatentShards(tmp_path / "lenient")
    assert len(ds) == 3 and torch.equal(ds.labels, torch.tensor([0, 1, 1]))
    skipped = ds.manifest["source"]["skipped"]
    assert [(s["index"], s["path"]) for s in skipped] == [(1, "ant/001.jpg")]
    assert [s["examples"] for s in ds.manifest["shards"]] == [1, 2]
    # a rerun accepts the shard with a left-out image as finished
    assert prepare(source, tmp_path / "lenient", vae_dir, "--bad-images", "skip", "--shard-size", 2)[0] == 0


def _two_process_worker(rank, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    assert main(args) == 0


def test_two_processes_split_the_shards_and_match_one(tmp_path, folder, vae_dir, moments_dir):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["prepare-latents", str(folder), "--out", str(tmp_path / "two"), "--vae", str(vae_dir), "--resolution",
            "64", "--device", "cpu", "--no-progress", "--shard-size", "4"]
    mp.spawn(_two_process_worker, args=(port, args), nprocs=2, join=True)
    assert_same_tensors(tmp_path / "two", moments_dir)
    assert json.loads((tmp_path / "two" / MANIFEST_NAME).read_text())["encoding"]["world_size"] == 2


# ---------------------------------------------------------------------------------------------
# Identity, the dataset entry point, errors
# ---------------------------------------------------------------------------------------------


def test_fingerprint_is_stable_and_follows_the_data(tmp_path, moments_dir, folder, vae_dir):
    first = LatentShards(moments_dir).fingerprint()
    assert LatentShards(moments_dir).fingerprint() == first
    moved = shutil.copytree(moments_dir, tmp_path / "moved")
    assert LatentShards(moved).fingerprint() == first  # paths and dates are not part of it
    assert prepare(folder, tmp_path / "flip", vae_dir, "--flip", "--shard-size", 4)[0] == 0
    assert LatentShards(tmp_path / "flip").fingerprint() != first
    manifest = json.loads((moved / MANIFEST_NAME).read_text())
    manifest["shards"][0]["sha256"] = "0" * 64  # different bytes in a shard
    (moved / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert LatentShards(moved).fingerprint() != first


def test_make_dataset_reads_prepared_directories(tmp_path, moments_dir, folder, vae_dir):
    ds = make_dataset("latents", str(moments_dir), image_size=8)
    assert isinstance(ds, LatentShards)
    with pytest.raises(ValueError, match="image_size=32 does not match the 8x8 latents"):
        make_dataset("latents", str(moments_dir), image_size=32)
    unfinished = shutil.copytree(moments_dir, tmp_path / "unfinished")
    (unfinished / MANIFEST_NAME).unlink()
    with pytest.raises(ValueError, match="unfinished `dar prepare-latents` output"):
        make_dataset("latents", str(unfinished))
    gone = shutil.copytree(moments_dir, tmp_path / "gone")
    (gone / shard_name(1)).unlink()
    with pytest.raises(ValueError, match="shard_000001.safetensors is missing"):
        make_dataset("latents", str(gone))


def test_user_errors_are_one_line(tmp_path, folder, vae_dir, capsys):
    cases = {
        "missing VAE": (folder, ["--vae", str(tmp_path / "no_vae")], "neither a folder nor a hub id"),
        "empty VAE folder": (folder, ["--vae", str(tmp_path)], "lacks config.json"),
        "no source": (tmp_path / "nothing", [], "does not exist"),
        "text source": (tmp_path / "notes.txt", [], "neither an image folder"),
        "bad npz": (tmp_path / "gray.npz", [], r"expected arr_0 uint8 \[N, H, W, 3\]"),
        "resolution": (folder, ["--resolution", "60"], "not a multiple of the VAE's downsampling factor 8"),
        "out is a file": (folder, ["--out", str(tmp_path / "notes.txt")], "is a file, not a directory"),
    }
    (tmp_path / "notes.txt").write_text("hello")
    np.savez(tmp_path / "gray.npz", arr_0=np.zeros((2, 64, 64), dtype=np.uint8))
    for name, (source, extra, message) in cases.items():
        args = ["prepare-latents", str(source), "--out", str(tmp_path / "out"), "--vae", str(vae_dir),
                "--resolution", "64", "--device", "cpu", *extra]  # a later --out wins
        assert main(args) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("dar prepare-latents: error:") and err.count("\n") == 1, (name, err)
        assert re.search(message, err), (name, err)


def test_loader_benchmark_writes_the_format_it_measures(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_latent_loader", ROOT / "benchmarks" / "bench_latent_loader.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ds = LatentShards(bench.make_synthetic(tmp_path, examples=50, shard_size=20, num_classes=10))
    assert (len(ds), ds.channels, ds.image_size, ds.num_classes) == (50, 4, 32, 10)
    assert bench.measure(ds, batch=16, batches=2, seed=0) > 0
    assert round(bench.demand()["images_per_s_per_node"]) == 8895
