"""Bad training data is found when the dataset is built, with a message that names the files, not
hours into a run with a PIL traceback or an empty dataset that fails somewhere else."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from dar.data import make_dataset
from dar.training.config import resolve


def png(path, seed=0, size=12):
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def folder_with_bad_images(root):
    """Class ``a``: two good images, one that is not an image, one truncated; class ``b``: one good."""
    png(root / "a" / "good0.png", 0)
    png(root / "a" / "good1.png", 1)
    (root / "a" / "garbage.png").write_bytes(b"not an image at all")
    data = png(root / "a" / "truncated.png", 2).read_bytes()
    (root / "a" / "truncated.png").write_bytes(data[: len(data) // 2])
    png(root / "b" / "good.png", 3)
    return [root / "a" / "garbage.png", root / "a" / "truncated.png"]


def test_unreadable_images_fail_construction_naming_them(tmp_path):
    bad = folder_with_bad_images(tmp_path)
    with pytest.raises(ValueError, match=r"2 unreadable image file\(s\)") as error:
        make_dataset("imagefolder", str(tmp_path), image_size=8)
    message = str(error.value)
    assert all(str(path) in message for path in bad) and "data.bad_images=skip" in message
    assert str(tmp_path / "a" / "good0.png") not in message


def test_long_lists_of_unreadable_images_are_shortened(tmp_path):
    png(tmp_path / "a" / "good.png")
    for i in range(8):
        (tmp_path / "a" / f"bad{i}.jpg").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"8 unreadable image file\(s\): .*bad4\.jpg \(.*\); and 3 more;") as error:
        make_dataset("imagefolder", str(tmp_path), image_size=8)
    assert "bad5.jpg" not in str(error.value)


def test_skip_leaves_unreadable_images_out_and_reports_them(tmp_path, capsys):
    bad = folder_with_bad_images(tmp_path / "data")
    ds = make_dataset("imagefolder", str(tmp_path / "data"), image_size=8, bad_images="skip")
    assert len(ds) == 3 and ds.labels.tolist() == [0, 0, 1] and ds.skipped == bad
    err = capsys.readouterr().err
    assert "leaving out 2 unreadable image file(s)" in err and all(str(path) in err for path in bad)
    for i in range(len(ds)):
        assert ds[i][0].shape == (3, 8, 8)
    # the fingerprint is that of the images trained on: the same as a folder holding only the good ones
    clean = tmp_path / "clean"
    shutil.copytree(tmp_path / "data", clean)
    for path in bad:
        (clean / path.relative_to(tmp_path / "data")).unlink()
    assert ds.fingerprint() == make_dataset("imagefolder", str(clean), image_size=8).fingerprint()


def test_class_of_only_unreadable_images_is_an_error_under_skip(tmp_path):
    png(tmp_path / "a" / "good.png")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "bad.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"b: class directory holds no readable images"):
        make_dataset("imagefolder", str(tmp_path), image_size=8, bad_images="skip")


def test_bad_images_option_is_validated(tmp_path):
    png(tmp_path / "a" / "good.png")
    with pytest.raises(ValueError, match="bad_images='ignore' is not one of error, skip"):
        make_dataset("imagefolder", str(tmp_path), image_size=8, bad_images="ignore")
    assert resolve("fmnist", ["data.bad_images=skip"]).data.bad_images == "skip"
    assert resolve("fmnist").data.bad_images == "error"
    with pytest.raises(ValueError, match="data.bad_images='ignore' is not one of error, skip"):
        resolve("fmnist", ["data.bad_images=ignore"])


def test_image_that_fails_to_decode_names_the_file(tmp_path):
    # A JPEG cut short passes the construction-time check (it does not decode) but fails when read.
    path = tmp_path / "a" / "cut.jpg"
    path.parent.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=95)
    path.write_bytes(path.read_bytes()[:-200])
    ds = make_dataset("imagefolder", str(tmp_path), image_size=8)
    with pytest.raises(ValueError, match=rf"{path}: cannot decode image \(image file is truncated"):
        ds[0]


def test_empty_latent_files_name_the_file(tmp_path):
    save_file({"latents": torch.zeros(0, 4, 8, 8), "labels": torch.zeros(0, dtype=torch.int64)},
              str(tmp_path / "empty.safetensors"))
    with pytest.raises(ValueError, match=r"empty.safetensors: holds no latents \('latents' has shape \(0, 4, 8, 8\)\)"):
        make_dataset("latents", str(tmp_path / "empty.safetensors"))
    save_file({}, str(tmp_path / "nothing.safetensors"))
    with pytest.raises(ValueError, match=r"nothing.safetensors: holds no tensors \(expected 'latents'"):
        make_dataset("latents", str(tmp_path / "nothing.safetensors"))


def test_directory_of_empty_latent_shards_names_the_first(tmp_path):
    for name in ("shard0.safetensors", "shard1.safetensors"):
        save_file({"latents": torch.zeros(0, 4, 8, 8), "labels": torch.zeros(0, dtype=torch.int64)},
                  str(tmp_path / name))
    with pytest.raises(ValueError, match=r"shard0.safetensors: holds no latents"):
        make_dataset("latents", str(tmp_path))
