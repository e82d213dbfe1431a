"""`dar eval` refuses or flags inputs that would give a wrong or meaningless number, and never destroys one.

Outputs that are inputs, atomic writes, too few images, suspicious pixel values, a resolution or
channel count that differs from the reference's, Inception weights identified by their SHA-256,
safetensors and pickled weight files, and `--device cuda` without CUDA. No real Inception weights
exist offline: weight files here have the right layout and random values.
"""

import argparse
import hashlib
import json
import os
import urllib.error

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dar.cli import main
from dar.data import make_dataset, to_uint8
from dar.evaluate import inception, make_reference, save_reference
from dar.evaluate.checks import check_image_shape, value_warnings
from dar.evaluate.classifier import CLASSIFIER_PATH
from dar.evaluate.features import make_feature_extractor, minimum_images
from dar.evaluate.inception import (
    FID_WEIGHTS_FILENAME,
    FID_WEIGHTS_SHA256,
    InceptionWeightsError,
    expected_state_dict_shapes,
    load_state_dict,
    resolve_weights_path,
)
from dar.evaluate.reference import reference_images


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def real_images():
    """300 images of the built-in test split: real data, so no value warning fires by accident."""
    return to_uint8(make_dataset("builtin", split="test").images[:300]).numpy()


@pytest.fixture
def samples(tmp_path, real_images):
    path = tmp_path / "S.npz"
    np.savez(path, arr_0=real_images[:200])
    (tmp_path / "S.json").write_text(json.dumps({"sampler": "ode", "seed": 0}))
    return path


@pytest.fixture
def no_inception_weights(tmp_path, monkeypatch):
    """No weights anywhere and no network: building the Inception extractor fails."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(inception.WEIGHTS_ENV_VAR, raising=False)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)


def random_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """The pytorch-fid layout with random values: loads, but is not the FID network."""
    g = torch.Generator().manual_seed(seed)
    state = {key: 0.05 * torch.randn(shape, generator=g) for key, shape in expected_state_dict_shapes().items()}
    for key in state:
        if key.endswith("running_var"):
            state[key] = state[key].abs() + 1.0
    return state


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "random_inception.pth"
    torch.save(random_inception_state(), path)
    return path


def run_eval(capsys, *args) -> tuple[int, str]:
    status = main(["eval", *map(str, args)])
    return status, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# 1. Outputs never overwrite inputs; writes are atomic
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "output",
    [
        ["--out", "S.npz"],
        ["--make-ref", "S.npz"],
        ["--out", "S.json"],  # the sampling-settings sidecar
        ["--out", "sub/../S.npz"],  # same file after resolving the path
        ["--out", "link.npz"],  # a symlink to the samples
        ["--out", "hard.npz"],  # a hard link to the samples
        ["--out", "R.npz"],  # the --ref file
    ],
)
def test_an_output_that_is_an_input_is_refused_and_the_input_survives(tmp_path, samples, real_images, capsys, output):
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.npz").symlink_to(samples)
    os.link(samples, tmp_path / "hard.npz")
    np.savez(tmp_path / "R.npz", arr_0=real_images)
    before = {name: (tmp_path / name).read_bytes() for name in ("S.npz", "S.json", "R.npz")}
    option, name = output
    args = [samples, option, tmp_path / name, "--extractor", "fmnist-classifier"]
    args += [] if option == "--make-ref" else ["--ref", tmp_path / "R.npz"]
    status, err = run_eval(capsys, *args)
    assert status == 2
    assert "would destroy an input" in err and option in err
    assert {name: (tmp_path / name).read_bytes() for name in before} == before


def test_a_failed_reference_write_leaves_the_old_file_and_no_debris(tmp_path, real_images, monkeypatch):
    extractor = make_feature_extractor("fmnist-classifier")
    reference = make_reference(real_images, extractor, "test images")
    path = save_reference(reference, tmp_path / "ref.npz", extractor)
    old = path.read_bytes()

    def disk_full(file, **arrays):  # writes a little, then fails, like a full disk
        if isinstance(file, (str, os.PathLike)):
            with open(file, "wb") as handle:
                handle.write(b"PK\x03\x04 partial")
        else:
            file.write(b"PK\x03\x04 partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_reference(reference, path, extractor)
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.npz"]


def test_the_result_file_is_replaced_not_rewritten_in_place(tmp_path, samples, capsys):
    out = tmp_path / "result.json"
    out.write_text("old result\n")
    os.link(out, tmp_path / "reader.json")  # stands for a reader that has the old file open
    status, _ = run_eval(capsys, samples, "--ref", "builtin-test", "--out", out)
    assert status == 0
    assert (tmp_path / "reader.json").read_text() == "old result\n"  # a rename, not a write into the old file
    assert "metrics" in json.loads(out.read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["S.json", "S.npz", "reader.json", "result.json"]


# ---------------------------------------------------------------------------------------------
# 2. Too few images, suspicious values
# ---------------------------------------------------------------------------------------------


def test_the_floor_is_the_feature_dimension_plus_one_and_lets_the_studys_500_through():
    assert minimum_images("inception") == 2049
    assert minimum_images("fmnist-classifier") == 129 <= 500


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # degenerate on purpose
def test_too_few_samples_are_refused_unless_forced(tmp_path, real_images, capsys):
    few = tmp_path / "few.npz"
    np.savez(few, arr_0=real_images[:4])
    status, err = run_eval(capsys, few, "--ref", "builtin-train")
    assert status == 2
    assert "4 images" in err and "129" in err and "--force" in err
    assert not (tmp_path / "few.eval.json").exists()

    status, err = run_eval(capsys, few, "--ref", "builtin-train", "--force")
    assert status == 0 and "warning" in err
    result = json.loads((tmp_path / "few.eval.json").read_text())
    assert len(result["warnings"]) == 1 and "4 images" in result["warnings"][0] and "--force" in result["warnings"][0]
    # the classifier's weight hash is recorded too (the Inception one: test_unknown_weights_via_the_cli)
    assert result["settings"]["extractor"]["weights_sha256"] == sha256(CLASSIFIER_PATH)


def test_one_image_is_refused_even_with_force(tmp_path, real_images, capsys):
    np.savez(tmp_path / "one.npz", arr_0=real_images[:1])
    status, err = run_eval(capsys, tmp_path / "one.npz", "--ref", "builtin-train", "--force")
    assert status == 2 and "holds 1 image(s)" in err


def test_a_reference_of_too_few_images_is_refused(tmp_path, samples, real_images, capsys):
    np.savez(tmp_path / "small_ref.npz", arr_0=real_images[:50])
    status, err = run_eval(capsys, samples, "--ref", tmp_path / "small_ref.npz", "--extractor", "fmnist-classifier")
    assert status == 2 and "small_ref.npz holds 50 images" in err


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # degenerate on purpose
def test_binary_images_are_evaluated_with_a_recorded_warning(tmp_path, capsys):
    masks = np.random.default_rng(0).integers(0, 2, size=(200, 32, 32, 1), dtype=np.uint8)
    np.savez(tmp_path / "masks.npz", arr_0=masks)
    status, err = run_eval(capsys, tmp_path / "masks.npz", "--ref", "builtin-test")
    assert status == 0
    assert "dar eval: warning:" in err and "[0, 1]" in err
    warnings = json.loads((tmp_path / "masks.eval.json").read_text())["warnings"]
    assert len(warnings) == 1 and "multiplying by 255" in warnings[0]

    # --make-ref records its warnings in the reference file
    assert main(["eval", str(tmp_path / "masks.npz"), "--make-ref", str(tmp_path / "masks_ref.npz"),
                 "--extractor", "fmnist-classifier"]) == 0  # fmt: skip
    meta = json.loads(str(np.load(tmp_path / "masks_ref.npz")["meta"][()]))
    assert len(meta["warnings"]) == 1 and "[0, 1]" in meta["warnings"][0]


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # degenerate on purpose
def test_identical_or_blank_images_warn_and_real_images_do_not(tmp_path, real_images, capsys):
    assert value_warnings(real_images, "real") == []
    repeated = np.repeat(real_images[:1], 200, axis=0)
    assert "nearly identical" in value_warnings(repeated, "repeated")[0]
    blank = np.full((200, 32, 32, 1), 128, dtype=np.uint8)
    assert "nearly constant" in value_warnings(blank, "blank")[0]

    np.savez(tmp_path / "repeated.npz", arr_0=repeated)
    status, err = run_eval(capsys, tmp_path / "repeated.npz", "--ref", "builtin-test")
    assert status == 0 and "nearly identical" in err
    assert "nearly identical" in json.loads((tmp_path / "repeated.eval.json").read_text())["warnings"][0]


def test_clean_runs_record_an_empty_warnings_list(tmp_path, samples, capsys):
    status, err = run_eval(capsys, samples, "--ref", "builtin-test")
    assert status == 0 and "warning" not in err
    assert json.loads((tmp_path / "S.eval.json").read_text())["warnings"] == []


# ---------------------------------------------------------------------------------------------
# 3. Resolution and channels must match the reference's
# ---------------------------------------------------------------------------------------------


def test_samples_at_another_resolution_than_the_builtin_reference_are_refused(tmp_path, capsys):
    big = np.random.default_rng(0).integers(0, 256, size=(200, 64, 64, 1), dtype=np.uint8)
    np.savez(tmp_path / "big.npz", arr_0=big)
    status, err = run_eval(capsys, tmp_path / "big.npz", "--ref", "builtin-train")
    assert status == 2
    assert "64x64x1" in err and "32x32x1" in err and "resolution" in err


def test_make_ref_files_record_the_image_shape_and_it_is_checked(tmp_path, real_images, capsys):
    np.savez(tmp_path / "images.npz", arr_0=real_images)
    ref = tmp_path / "ref.npz"
    assert main(["eval", str(tmp_path / "images.npz"), "--make-ref", str(ref), "--extractor", "fmnist-classifier"]) == 0
    assert json.loads(str(np.load(ref)["meta"][()]))["image_shape"] == [32, 32, 1]
    assert reference_images(ref) == (300, (32, 32, 1))

    raw = real_images[:200, 2:30, 2:30]  # 28x28: the classifier would pad it, but it is not the reference's size
    np.savez(tmp_path / "raw.npz", arr_0=raw)
    status, err = run_eval(capsys, tmp_path / "raw.npz", "--ref", ref)
    assert status == 2 and "28x28x1" in err and "32x32x1" in err
    status, err = run_eval(capsys, tmp_path / "raw.npz", "--ref", ref, "--force")
    assert status == 0
    warnings = json.loads((tmp_path / "raw.eval.json").read_text())["warnings"]
    assert len(warnings) == 1 and "28x28x1" in warnings[0] and "--force" in warnings[0]


@pytest.mark.parametrize(
    "sample_shape, differs", [((8, 8, 3), "resolution"), ((16, 16, 1), "channel count")]
)  # fmt: skip
def test_inception_mismatches_are_refused_before_the_weights_are_needed(
    tmp_path, capsys, no_inception_weights, sample_shape, differs
):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, size=(2049, 16, 16, 3), dtype=np.uint8))
    np.savez(tmp_path / "s.npz", arr_0=rng.integers(0, 256, size=(2049, *sample_shape), dtype=np.uint8))
    status, err = run_eval(capsys, tmp_path / "s.npz", "--ref", tmp_path / "ref.npz")
    assert status == 2
    assert "16x16x3" in err and "x".join(map(str, sample_shape)) in err and differs in err


def test_adm_statistics_have_no_shape_and_check_nothing(tmp_path):
    np.savez(tmp_path / "adm_stats.npz", mu=np.zeros(4), sigma=np.eye(4))
    assert reference_images(tmp_path / "adm_stats.npz") == (None, None)
    assert check_image_shape((32, 32, 3), None, "adm_stats.npz") == []


# ---------------------------------------------------------------------------------------------
# 4. Inception weights are identified by their SHA-256
# ---------------------------------------------------------------------------------------------


def test_the_known_hash_agrees_with_the_file_name():
    # torch hub names files <stem>-<first 8 hex digits of the SHA-256>.<ext>
    assert len(FID_WEIGHTS_SHA256) == 64 and int(FID_WEIGHTS_SHA256, 16) >= 0
    assert FID_WEIGHTS_FILENAME.endswith(f"-{FID_WEIGHTS_SHA256[:8]}.pth")


def test_weights_of_the_right_layout_but_unknown_values_are_refused_unless_allowed(random_weights):
    digest = sha256(random_weights)
    with pytest.raises(InceptionWeightsError, match="--allow-unknown-weights") as error:
        make_feature_extractor("inception", inception_weights=random_weights)
    assert digest in str(error.value) and FID_WEIGHTS_SHA256 in str(error.value)

    extractor = make_feature_extractor("inception", inception_weights=random_weights, allow_unknown_weights=True)
    assert extractor.weights_verified is False
    assert extractor.describe()["weights_sha256"] == digest and extractor.describe()["weights_verified"] is False


def test_the_known_file_is_accepted_without_the_flag(random_weights, monkeypatch):
    monkeypatch.setattr(inception, "FID_WEIGHTS_SHA256", sha256(random_weights))  # pretend it is pytorch-fid's
    extractor = make_feature_extractor("inception", inception_weights=random_weights)
    assert extractor.weights_verified is True and extractor.describe()["weights_verified"] is True


def test_unknown_weights_via_the_cli(tmp_path, random_weights, capsys):
    images = np.random.default_rng(0).integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=images)
    args = [tmp_path / "s.npz", "--make-ref", tmp_path / "ref.npz", "--inception-weights", random_weights, "--force"]
    status, err = run_eval(capsys, *args)
    assert status == 2 and "dar eval: error:" in err and "--allow-unknown-weights" in err
    assert not (tmp_path / "ref.npz").exists()

    status, err = run_eval(capsys, *args, "--allow-unknown-weights", "--device", "cpu")
    assert status == 0
    meta = json.loads(str(np.load(tmp_path / "ref.npz")["meta"][()]))
    assert meta["extractor"]["weights_sha256"] == sha256(random_weights)
    assert meta["extractor"]["weights_verified"] is False
    assert any("not pytorch-fid's" in w for w in meta["warnings"]) and any("--force" in w for w in meta["warnings"])


def test_allow_unknown_weights_is_an_error_with_the_classifier(samples, capsys):
    status, err = run_eval(capsys, samples, "--ref", "builtin-train", "--allow-unknown-weights")
    assert status == 2 and "allow_unknown_weights applies to Inception weights" in err


def test_a_download_is_checked_against_the_known_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(inception.WEIGHTS_ENV_VAR, raising=False)
    calls = []

    def substituted_file(url, dst, hash_prefix=None, progress=True):
        calls.append(hash_prefix)
        raise RuntimeError(f'invalid hash value (expected "{hash_prefix}", got "0000")')

    monkeypatch.setattr(torch.hub, "download_url_to_file", substituted_file)
    with pytest.raises(InceptionWeightsError, match="download failed: invalid hash value"):
        resolve_weights_path()
    assert calls == [FID_WEIGHTS_SHA256]


# ---------------------------------------------------------------------------------------------
# 5. safetensors files and pickled objects
# ---------------------------------------------------------------------------------------------


def test_safetensors_weights_load_whatever_their_name_and_broken_ones_fail_clearly(tmp_path, capsys):
    state = random_inception_state()
    save_file(state, str(tmp_path / "w.safetensors"))
    assert set(load_state_dict(tmp_path / "w.safetensors")) == set(state)
    (tmp_path / "w_renamed.pth").write_bytes((tmp_path / "w.safetensors").read_bytes())
    loaded = load_state_dict(tmp_path / "w_renamed.pth")
    torch.testing.assert_close(loaded["fc.weight"], state["fc.weight"], rtol=0, atol=0)

    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(InceptionWeightsError, match="truncated, corrupt") as error:
        load_state_dict(tmp_path / "truncated.safetensors")
    assert "truncated.safetensors" in str(error.value) and FID_WEIGHTS_FILENAME in str(error.value)

    np.savez(tmp_path / "s.npz", arr_0=np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    status, err = run_eval(capsys, tmp_path / "s.npz", "--make-ref", tmp_path / "ref.npz", "--force",
                           "--inception-weights", tmp_path / "truncated.safetensors")  # fmt: skip
    assert status == 2 and "dar eval: error:" in err and "truncated.safetensors" in err


def test_pickled_objects_are_refused_without_passing_on_torchs_advice(tmp_path):
    path = tmp_path / "with_objects.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048), "config": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(InceptionWeightsError) as error:
        load_state_dict(path)
    message = str(error.value)
    assert str(path) in message and "non-tensor" in message and "refused" in message
    assert "argparse.Namespace" in message
    assert "weights_only" not in message


# ---------------------------------------------------------------------------------------------
# 6. Devices (already checked before this audit; kept under test)
# ---------------------------------------------------------------------------------------------


def test_cuda_without_cuda_and_unknown_devices_are_clear_errors(samples, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status, err = run_eval(capsys, samples, "--ref", "builtin-train", "--device", "cuda")
    assert status == 2 and "--device cuda: CUDA is not available" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(samples), "--ref", "builtin-train", "--device", "tpu"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'tpu'" in capsys.readouterr().err
