"""Tests for dar.data: every input is either shipped in the package or generated here (fully offline)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from dar.data import (
    BUILTIN_PATH,
    DATASETS,
    FASHION_MNIST_CLASSES,
    ArrayDataset,
    ImageFolderDataset,
    load_builtin_arrays,
    make_dataset,
    read_idx,
    to_uint8,
)

# ---------------------------------------------------------------------------------------------
# Built-in Fashion-MNIST subset
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def builtin_train() -> ArrayDataset:
    return make_dataset("builtin")


def test_builtin_file_is_small_and_licensed():
    assert BUILTIN_PATH.stat().st_size <= 8 * 2**20
    licence = (BUILTIN_PATH.parent / "FASHION_MNIST_LICENSE.txt").read_text()
    assert "Zalando SE" in licence and "MIT" in licence
    with np.load(BUILTIN_PATH, allow_pickle=False) as archive:
        meta = json.loads(str(archive["meta"]))
        assert meta["seed"] == 0 and "dataset-fashion-mnist" in meta["source"]
        # The stored source indices are distinct indices into the official splits.
        for split, total in (("train", 60000), ("test", 10000)):
            indices = archive[f"{split}_source_indices"]
            assert len(np.unique(indices)) == len(indices) and indices.max() < total


def test_builtin_shapes_and_attributes(builtin_train):
    test = make_dataset("builtin", split="test")
    assert builtin_train.images.shape == (12000, 1, 32, 32)
    assert test.images.shape == (2000, 1, 32, 32)
    for ds in (builtin_train, test):
        assert ds.images.dtype == torch.float32 and ds.labels.dtype == torch.int64
        assert (ds.channels, ds.image_size, ds.num_classes) == (1, 32, 10)
        assert ds.class_names == list(FASHION_MNIST_CLASSES)
    x, y = builtin_train[3]
    assert x.shape == (1, 32, 32) and isinstance(y, int)
    xb, yb = builtin_train.get_batch(torch.tensor([0, 5, 7]))
    assert xb.shape == (3, 1, 32, 32) and torch.equal(yb, builtin_train.labels[[0, 5, 7]])


def test_builtin_is_class_balanced(builtin_train):
    assert torch.bincount(builtin_train.labels).tolist() == [1200] * 10
    assert torch.bincount(make_dataset("builtin", split="test").labels).tolist() == [200] * 10


def test_builtin_train_and_test_share_no_image():
    train, _, _ = load_builtin_arrays("train")
    test, _, _ = load_builtin_arrays("test")
    assert not {im.tobytes() for im in train} & {im.tobytes() for im in test}


def test_builtin_values_are_uint8_levels_in_range(builtin_train):
    x = builtin_train.images
    assert x.min() == -1.0 and x.max() == 1.0
    levels = (x + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4)


def test_builtin_padding(builtin_train):
    native = make_dataset("builtin", image_size=28)
    assert native.images.shape == (12000, 1, 28, 28)
    padded = builtin_train.images
    border = torch.ones_like(padded[0, 0], dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (padded[:, :, border] == -1.0).all()  # background (uint8 0) maps to -1
    assert torch.equal(padded[:, :, 2:30, 2:30], native.images)


def test_builtin_rejects_other_sizes():
    with pytest.raises(ValueError, match=r"image_size=30.*\[28, 32\]"):
        make_dataset("builtin", image_size=30)


# ---------------------------------------------------------------------------------------------
# IDX files
# ---------------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int16): 0x0B, np.dtype(np.float32): 0x0D}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path, array: np.ndarray, compress: bool) -> None:
    data = idx_bytes(array)
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def make_idx_dir(root, compress: bool, n_train=6, n_test=4, size=28):
    rng = np.random.default_rng(0)
    splits = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
        labels = (np.arange(n) % 3).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte", images, compress)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, compress)
        splits[prefix] = (images, labels)
    return splits


@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path, compress):
    written = make_idx_dir(tmp_path, compress)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = written[prefix]
        ds = make_dataset("idx", str(tmp_path), split=split, image_size=28)
        assert ds.images.shape == (len(images), 1, 28, 28)
        assert torch.equal(to_uint8(ds.images)[..., 0], torch.from_numpy(images))
        assert ds.labels.tolist() == labels.tolist()
        assert ds.class_names == ["0", "1", "2"]
    padded = make_dataset("idx", str(tmp_path))
    assert padded.image_size == 32 and (padded.images[:, :, :2] == -1).all()


def test_read_idx_other_dtypes(tmp_path):
    for array in (np.arange(-6, 6, dtype=np.int16).reshape(3, 4), np.linspace(0, 1, 5, dtype=np.float32)):
        (tmp_path / "a.idx").write_bytes(idx_bytes(array))
        out = read_idx(tmp_path / "a.idx")
        assert out.dtype == array.dtype and np.array_equal(out, array)


def test_idx_truncated(tmp_path):
    make_idx_dir(tmp_path, compress=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: truncated"):
        make_dataset("idx", str(tmp_path))


def test_idx_trailing_bytes(tmp_path):
    make_idx_dir(tmp_path, compress=False)
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte: has trailing bytes"):
        make_dataset("idx", str(tmp_path))


def test_idx_truncated_gzip(tmp_path):
    make_idx_dir(tmp_path, compress=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz: corrupt or truncated gzip"):
        make_dataset("idx", str(tmp_path))


def test_idx_bad_magic(tmp_path):
    make_idx_dir(tmp_path, compress=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(b"\x01\x02" + path.read_bytes()[2:])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: not an IDX file \(bad magic number 0102"):
        make_dataset("idx", str(tmp_path))


def test_idx_count_mismatch(tmp_path):
    make_idx_dir(tmp_path, compress=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(3, dtype=np.uint8), compress=False)
    with pytest.raises(ValueError, match=r"count mismatch: .*t10k-images-idx3-ubyte holds 4 images but .*holds 3"):
        make_dataset("idx", str(tmp_path), split="test")


def test_idx_missing_file(tmp_path):
    make_idx_dir(tmp_path, compress=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(ValueError, match=r"missing IDX file t10k-labels-idx1-ubyte"):
        make_dataset("idx", str(tmp_path), split="test")


# ---------------------------------------------------------------------------------------------
# Image folder
# ---------------------------------------------------------------------------------------------


def test_imagefolder(tmp_path):
    rng = np.random.default_rng(0)
    layout = {"zebra": [(37, 23, "RGB"), (100, 64, "L")], "ant": [(64, 64, "RGBA")], ".hidden": [(20, 20, "RGB")]}
    for class_name, specs in layout.items():
        (tmp_path / class_name).mkdir()
        for k, (w, h, mode) in enumerate(specs):
            channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
            pixels = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8).squeeze(-1 if channels == 1 else ())
            Image.fromarray(pixels, mode).save(tmp_path / class_name / f"img{k}.png")
    (tmp_path / "ant" / "notes.txt").write_text("not an image")

    ds = make_dataset("imagefolder", str(tmp_path), image_size=16)
    assert isinstance(ds, ImageFolderDataset)
    assert ds.class_names == ["ant", "zebra"] and ds.num_classes == 2
    assert (ds.channels, ds.image_size, len(ds)) == (3, 16, 3)
    assert ds.labels.tolist() == [0, 1, 1]
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32
        assert -1.0 <= x.min() and x.max() <= 1.0
        assert y == ds.labels[i]


def test_imagefolder_center_crop_keeps_exact_size_images(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    (tmp_path / "only").mkdir()
    Image.fromarray(pixels).save(tmp_path / "only" / "a.png")
    x, _ = make_dataset("imagefolder", str(tmp_path), image_size=16)[0]
    assert torch.equal(to_uint8(x[None])[0], torch.from_numpy(pixels))


def test_imagefolder_crops_the_center(tmp_path):
    # Wide image: left and right quarters black, center white -> the crop sees only white.
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    pixels[:, 16:48] = 255
    (tmp_path / "c").mkdir()
    Image.fromarray(pixels).save(tmp_path / "c" / "wide.png")
    x, _ = make_dataset("imagefolder", str(tmp_path), image_size=8)[0]
    assert x.shape == (3, 8, 8) and (x == 1.0).all()


def test_imagefolder_errors(tmp_path):
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match="needs image_size"):
        make_dataset("imagefolder", str(tmp_path))
    with pytest.raises(ValueError, match="empty_class: class directory holds no images"):
        make_dataset("imagefolder", str(tmp_path), image_size=8)
    with pytest.raises(ValueError, match="split 'test' is not available for dataset 'imagefolder'"):
        make_dataset("imagefolder", str(tmp_path), split="test", image_size=8)


# ---------------------------------------------------------------------------------------------
# Latents
# ---------------------------------------------------------------------------------------------


def latent_file(path, n=5, channels=4, size=8, dtype=torch.float16, seed=0, **overrides):
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "latents": torch.randn(n, channels, size, size, generator=g).to(dtype),
        "labels": torch.arange(n, dtype=torch.int64) % 3,
    }
    tensors.update(overrides)
    save_file(tensors, str(path))
    return tensors


def test_latents_single_file(tmp_path):
    stored = latent_file(tmp_path / "a.safetensors", channels=6)
    ds = make_dataset("latents", str(tmp_path / "a.safetensors"), image_size=8)
    assert ds.images.dtype == torch.float32 and ds.images.shape == (5, 6, 8, 8)
    assert torch.equal(ds.images, stored["latents"].float())  # no rescaling
    assert (ds.channels, ds.image_size, ds.num_classes) == (6, 8, 3)
    xb, yb = ds.get_batch(torch.tensor([4, 1]))
    assert xb.shape == (2, 6, 8, 8) and yb.tolist() == [1, 1]


def test_latents_directory_of_shards(tmp_path):
    first = latent_file(tmp_path / "shard0.safetensors", n=3, dtype=torch.float32, seed=1)
    second = latent_file(tmp_path / "shard1.safetensors", n=2, seed=2)
    ds = make_dataset("latents", str(tmp_path))
    assert torch.equal(ds.images, torch.cat([first["latents"], second["latents"].float()]))
    assert ds.labels.tolist() == [0, 1, 2, 0, 1]


def test_latents_errors(tmp_path):
    latent_file(tmp_path / "ok.safetensors")
    with pytest.raises(ValueError, match=r"image_size=32 does not match the 8x8 latents"):
        make_dataset("latents", str(tmp_path / "ok.safetensors"), image_size=32)
    with pytest.raises(ValueError, match="split 'test' is not available for dataset 'latents'"):
        make_dataset("latents", str(tmp_path / "ok.safetensors"), split="test")

    latent_file(tmp_path / "z_other_shape.safetensors", channels=3)
    with pytest.raises(ValueError, match=r"z_other_shape.safetensors: latent shape \(3, 8, 8\) differs"):
        make_dataset("latents", str(tmp_path))

    cases = {
        "no_labels.safetensors": {"latents": torch.zeros(2, 4, 8, 8)},
        "three_d.safetensors": {"latents": torch.zeros(2, 8, 8), "labels": torch.zeros(2, dtype=torch.int64)},
        "count.safetensors": {"latents": torch.zeros(2, 4, 8, 8), "labels": torch.zeros(3, dtype=torch.int64)},
        "not_square.safetensors": {"latents": torch.zeros(2, 4, 8, 6), "labels": torch.zeros(2, dtype=torch.int64)},
    }
    messages = {
        "no_labels.safetensors": r"missing tensor\(s\) \['labels'\]",
        "three_d.safetensors": r"'latents' must be floating point \[N, C, h, w\]",
        "count.safetensors": "2 latents but 3 labels",
        "not_square.safetensors": "latents must be square",
    }
    for name, tensors in cases.items():
        save_file(tensors, str(tmp_path / name))
        with pytest.raises(ValueError, match=f"{name}: {messages[name]}"):
            make_dataset("latents", str(tmp_path / name))

    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="garbage.safetensors: cannot read safetensors file"):
        make_dataset("latents", str(tmp_path / "garbage.safetensors"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="directory holds no"):
        make_dataset("latents", str(tmp_path / "empty"))


# ---------------------------------------------------------------------------------------------
# to_uint8 and argument validation
# ---------------------------------------------------------------------------------------------


def test_to_uint8_inverts_pixel_conversion():
    levels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    x = levels.float() / 127.5 - 1
    assert torch.equal(to_uint8(x), levels.permute(0, 2, 3, 1))


def test_to_uint8_rounds_clamps_and_is_nhwc():
    x = torch.tensor([-3.0, -1.0, -0.999, 0.0, 0.9999, 1.0, 2.5]).reshape(1, 1, 1, 7).repeat(2, 3, 1, 1)
    out = to_uint8(x)
    assert out.dtype == torch.uint8 and out.shape == (2, 1, 7, 3)
    # -0.999 -> 0.1275 -> 0; 0 -> 127.5 -> 128 (half to even); 0.9999 -> 254.99 -> 255
    assert out[0, 0, :, 0].tolist() == [0, 0, 0, 128, 255, 255, 255]
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        to_uint8(torch.zeros(3, 8, 8))


def test_bad_name_split_and_path(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'cifar'; choose one of " + ", ".join(DATASETS)):
        make_dataset("cifar")
    with pytest.raises(ValueError, match="unknown split 'val'; choose one of train, test"):
        make_dataset("builtin", split="val")
    with pytest.raises(ValueError, match="dataset 'idx' needs a path"):
        make_dataset("idx")
    with pytest.raises(ValueError, match="path does not exist: .*nowhere"):
        make_dataset("latents", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="built-in dataset file not found"):
        make_dataset("builtin", str(tmp_path / "missing.npz"))
