"""The shipped Fashion-MNIST classifier, reference statistics, evaluate_samples, InDomainEvaluator and `dar eval`."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dar.data import load_builtin_arrays, make_dataset, to_uint8
from dar.evaluate import InDomainEvaluator, evaluate_samples, load_reference, make_reference, save_reference
from dar.evaluate.classifier import (
    CLASSIFIER_PATH,
    FashionMNISTClassifier,
    load_fmnist_classifier,
    read_classifier_metadata,
    uint8_to_model,
)
from dar.cli import main as eval_main
from dar.evaluate.features import FeatureExtractor, make_feature_extractor


@pytest.fixture(scope="module")
def test_split():
    """500 images of the built-in test split, 50 per class (metrics on 2,000 would only cost time)."""
    dataset = make_dataset("builtin", split="test")
    keep = torch.cat([torch.nonzero(dataset.labels == c)[:50, 0] for c in range(10)])
    return to_uint8(dataset.images[keep]).numpy(), dataset.labels[keep].numpy()


@pytest.fixture(scope="module")
def extractor():
    return make_feature_extractor("fmnist-classifier")


@pytest.fixture(scope="module")
def train_reference(extractor):
    return load_reference("builtin-train", extractor)


# ---------------------------------------------------------------------------------------------
# The shipped classifier
# ---------------------------------------------------------------------------------------------


def test_shipped_classifier_is_accurate_on_the_builtin_test_split():
    dataset = make_dataset("builtin", split="test")
    model = load_fmnist_classifier()
    with torch.no_grad():
        predictions = torch.cat([model(x).argmax(1) for x in dataset.images.split(500)])
    accuracy = (predictions == dataset.labels).float().mean().item()
    assert accuracy >= 0.90, f"shipped classifier: {accuracy:.4f} on the built-in test split"


def test_shipped_file_documents_its_provenance():
    assert CLASSIFIER_PATH.stat().st_size < 2 * 1024 * 1024
    meta = read_classifier_metadata()
    assert meta["training_command"].startswith("python scripts/train_fmnist_classifier.py")
    assert "60,000" in meta["data"] and meta["seed"].isdigit()
    assert float(meta["test_accuracy"]) >= 0.90
    assert set(json.loads(meta["data_sha256"])) >= {"train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"}


def test_uint8_input_is_padded_exactly_like_the_dataset():
    raw, _, _ = load_builtin_arrays("test")  # uint8 [N, 28, 28]
    dataset = make_dataset("builtin", split="test")
    torch.testing.assert_close(uint8_to_model(raw[:50]), dataset.images[:50], rtol=0, atol=0)
    torch.testing.assert_close(uint8_to_model(raw[:50, :, :, None]), dataset.images[:50], rtol=0, atol=0)
    with pytest.raises(ValueError, match="H = W = 32"):
        uint8_to_model(np.zeros((2, 64, 64, 1), dtype=np.uint8))
    with pytest.raises(ValueError, match="H = W = 32"):
        uint8_to_model(np.zeros((2, 32, 32, 3), dtype=np.uint8))


def test_loader_rejects_a_foreign_state_dict(tmp_path):
    state = FashionMNISTClassifier().state_dict()
    state["head.weight"] = torch.zeros(5, 128)
    path = tmp_path / "wrong.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match="head.weight"):
        load_fmnist_classifier(path)
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="cannot read"):
        load_fmnist_classifier(tmp_path / "corrupt.safetensors")


def test_extractor_outputs(extractor, test_split):
    images, _ = test_split
    features = extractor.extract(images[:30], batch_size=8)
    assert {k: v.shape for k, v in features.items()} == {"pool": (30, 128), "logits": (30, 10)}
    assert extractor.metric_names["fd"] == "fd_fmnist" and not extractor.has_spatial
    with pytest.raises(ValueError, match="does not use Inception"):
        make_feature_extractor("fmnist-classifier", inception_weights="x.pth")


# ---------------------------------------------------------------------------------------------
# evaluate_samples and the in-domain evaluator
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_result(extractor, train_reference, test_split):
    images, labels = test_split
    return evaluate_samples(images, labels, train_reference, extractor)


# Noise drives some of the classifier's ReLU features to exactly zero, so the noise covariance is
# singular and scipy's sqrtm warns; the Fréchet distance is still finite and large, which is the point.
@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_real_data_scores_well_and_noise_scores_badly(extractor, train_reference, test_split, real_result):
    json.dumps(real_result)  # JSON-able as it is
    m = real_result["metrics"]
    assert set(m) == {
        "fd_fmnist",
        "is_fmnist",
        "is_fmnist_std",
        "precision",
        "recall",
        "kid_fmnist",
        "kid_fmnist_std",
        "class_acc",
    }
    assert m["class_acc"] >= 0.9 and m["precision"] > 0.6 and m["recall"] > 0.6
    assert m["is_fmnist"] > 5.0 and abs(m["kid_fmnist"]) < 0.05

    images, labels = test_split
    noise = np.random.default_rng(0).integers(0, 256, size=(200, *images.shape[1:]), dtype=np.uint8)
    bad = evaluate_samples(noise, labels[:200], train_reference, extractor)["metrics"]
    assert bad["fd_fmnist"] > 10 * m["fd_fmnist"] and bad["precision"] < 0.1 and bad["class_acc"] < 0.5
    assert bad["kid_fmnist"] > 10 * abs(m["kid_fmnist"])

    settings = real_result["settings"]
    assert settings["extractor"]["weights_sha256"] == extractor.weights_sha256
    assert settings["reference"]["num_images"] == 12000 and settings["num_samples"] == 500
    assert {"torch", "numpy", "scipy", "dar"} <= set(settings["versions"])


def test_in_domain_evaluator_matches_evaluate_samples(test_split, real_result):
    images, labels = test_split
    evaluator = InDomainEvaluator()
    result = evaluator(images, labels)
    assert set(result) == {"fd_fmnist", "precision", "recall", "class_acc"}
    for key in result:
        assert result[key] == pytest.approx(real_result["metrics"][key], rel=1e-6, abs=1e-9)
    assert set(evaluator(images[:100])) == {"fd_fmnist", "precision", "recall"}


# ---------------------------------------------------------------------------------------------
# Reference files (ADM formats, --make-ref files) with a small stand-in "inception" extractor
# ---------------------------------------------------------------------------------------------


class TinyInception(FeatureExtractor):
    """Named like the Inception extractor but cheap: features are pixel statistics."""

    name = "inception"
    metric_names = {"fd": "fid", "sfd": "sfid", "is": "inception_score", "kd": "kid"}
    class_names = None
    has_spatial = True
    default_batch_size = 64

    def __init__(self, weights_path):
        super().__init__(weights_path, "cpu")

    def _forward(self, images):
        x = torch.from_numpy(images).float().flatten(1) / 255
        quarters = x.reshape(len(x), 4, -1)
        return {"pool": quarters.mean(-1), "spatial": quarters.std(-1), "logits": quarters[:, :, :5].mean(1)}


@pytest.fixture
def tiny(tmp_path):
    weights = tmp_path / "tiny.pth"
    weights.write_bytes(b"tiny")
    return TinyInception(weights)


def random_images(seed, n=64):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)


def test_image_npz_reference_is_computed_with_the_extractor(tmp_path, tiny):
    np.savez(tmp_path / "ref.npz", arr_0=random_images(0))
    reference = load_reference(tmp_path / "ref.npz", tiny)
    assert reference.features.shape == (64, 4) and reference.mu_spatial.shape == (4,)
    assert reference.weights_sha256 == tiny.weights_sha256 and reference.file_sha256 is not None
    result = evaluate_samples(random_images(1), None, reference, tiny)
    assert {"fid", "sfid", "inception_score", "precision", "recall", "kid"} <= set(result["metrics"])
    assert result["skipped"] == {"class_acc": "no labels given with the samples"}
    labels = np.zeros(64, dtype=np.int64)
    assert "does not classify" in evaluate_samples(random_images(1), labels, reference, tiny)["skipped"]["class_acc"]


def test_adm_reference_batch_uses_its_stored_statistics(tmp_path, tiny):
    images = random_images(0)
    stored = {"mu": np.full(4, 0.25), "sigma": np.eye(4), "mu_s": np.zeros(4), "sigma_s": np.eye(4) * 2}
    np.savez(tmp_path / "adm.npz", arr_0=images, **stored)
    reference = load_reference(tmp_path / "adm.npz", tiny)
    np.testing.assert_array_equal(reference.mu, stored["mu"])
    np.testing.assert_array_equal(reference.sigma_spatial, stored["sigma_s"])
    assert reference.features.shape == (64, 4)  # precision/recall/KID points still come from arr_0
    assert reference.weights_sha256 is None and "TensorFlow" in reference.statistics_source

    np.savez(tmp_path / "adm_stats.npz", **stored)
    result = evaluate_samples(random_images(1), None, tmp_path / "adm_stats.npz", tiny)
    assert {"fid", "sfid"} <= set(result["metrics"]) and {"precision", "recall", "kid"} <= set(result["skipped"])
    # Inception statistics cannot serve another extractor
    with pytest.raises(ValueError, match="only Inception statistics"):
        load_reference(tmp_path / "adm_stats.npz", make_feature_extractor("fmnist-classifier"))


def test_make_ref_files_round_trip_and_guard_their_extractor(tmp_path, tiny):
    images = random_images(0)
    made = make_reference(images, tiny, "random images")
    path = save_reference(made, tmp_path / "made.npz", tiny)
    loaded = load_reference(path, tiny)
    for field in ("mu", "sigma", "mu_spatial", "sigma_spatial"):
        np.testing.assert_allclose(getattr(loaded, field), getattr(made, field))
    np.testing.assert_array_equal(loaded.features, made.features)
    with np.load(path, allow_pickle=False) as archive:  # ADM's key names, readable without pickles
        assert {"mu", "sigma", "mu_s", "sigma_s", "features", "meta"} == set(archive.files)
    with pytest.raises(ValueError, match="use --extractor inception"):
        load_reference(path, make_feature_extractor("fmnist-classifier"))
    other_weights = tmp_path / "other.pth"
    other_weights.write_bytes(b"other")
    with pytest.raises(ValueError, match="recompute the reference"):
        load_reference(path, TinyInception(other_weights))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cannot read as .npz"):
        load_reference(tmp_path / "bad.npz", tiny)


# ---------------------------------------------------------------------------------------------
# `dar eval` end to end
# ---------------------------------------------------------------------------------------------


def test_eval_cli_end_to_end(tmp_path, test_split, capsys):
    images, labels = test_split
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=images, labels=labels)
    sampling = {"sampler": {"method": "ode", "steps": 50, "cfg_scale": 1.0}, "nfe": 50, "seed": 0}
    (tmp_path / "samples.json").write_text(json.dumps(sampling))

    # --make-ref from an image file; evaluating against it reads the extractor from the file and gives
    # the numbers of the same images named by the built-in shortcut
    np.savez(tmp_path / "test_split.npz", arr_0=to_uint8(make_dataset("builtin", split="test").images).numpy())
    assert eval_main(["eval", str(tmp_path / "test_split.npz"), "--make-ref", str(tmp_path / "ref.npz"),
                      "--extractor", "fmnist-classifier"]) == 0  # fmt: skip
    made = json.loads(np.load(tmp_path / "ref.npz")["meta"][()])
    assert made["num_images"] == 2000 and made["extractor"]["name"] == "fmnist-classifier"

    assert eval_main(["eval", str(samples), "--ref", "builtin-test", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "fd_fmnist" in printed and "class_acc" in printed
    result = json.loads((tmp_path / "samples.eval.json").read_text())  # default output next to the samples
    assert result["sampling"] == sampling  # the sidecar, verbatim
    assert result["settings"]["extractor"]["name"] == "fmnist-classifier"
    assert result["metrics"]["class_acc"] >= 0.9
    assert result["arguments"]["ref"] == "builtin-test" and result["samples"]["labels"] is True

    via_file = tmp_path / "via_file.json"
    assert eval_main(["eval", str(samples), "--ref", str(tmp_path / "ref.npz"), "--out", str(via_file)]) == 0
    again = json.loads(via_file.read_text())
    assert again["settings"]["extractor"]["name"] == "fmnist-classifier"
    assert again["metrics"].keys() == result["metrics"].keys()
    for key, value in again["metrics"].items():
        assert value == pytest.approx(result["metrics"][key], rel=1e-5, abs=1e-7), key


def test_eval_cli_rejects_bad_usage(tmp_path, capsys):
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=np.zeros((4, 32, 32, 1), dtype=np.uint8))
    with pytest.raises(SystemExit):
        eval_main(["eval", str(samples), "--ref", "builtin-train", "--fid-weights", "x"])  # unknown option
    with pytest.raises(SystemExit):
        eval_main(["eval", str(samples)])  # neither --ref nor --make-ref
    with pytest.raises(SystemExit):
        eval_main(["eval", str(samples), "--ref", "builtin-train", "--make-ref", "r.npz"])
    assert eval_main(["eval", str(samples), "--make-ref", str(tmp_path / "r.npz"), "--out", "x.json"]) == 2
    assert "--out applies to evaluations" in capsys.readouterr().err
    np.savez(tmp_path / "floats.npz", arr_0=np.zeros((4, 32, 32, 1), dtype=np.float32))
    assert eval_main(["eval", str(tmp_path / "floats.npz"), "--ref", "builtin-train"]) == 2
    assert "uint8" in capsys.readouterr().err
