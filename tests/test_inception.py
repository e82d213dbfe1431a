"""The FID Inception-V3: architecture vs the pytorch-fid weight layout, loading, errors, outputs.

No real weights exist offline, so every test builds random weights (scaled so activations neither
vanish nor explode through 94 conv layers), saves them in the pytorch-fid file format and loads
them back through the public loader.
"""

import hashlib
import urllib.error

import numpy as np
import pytest
import torch

from dar.evaluate import inception
from dar.evaluate.features import InceptionFeatureExtractor, make_feature_extractor
from dar.evaluate.inception import (
    FID_WEIGHTS_FILENAME,
    FID_WEIGHTS_URL,
    FIDInceptionV3,
    InceptionWeightsError,
    load_fid_inception,
    load_state_dict,
    preprocess,
    resolve_weights_path,
)
from tolerances import assert_close_scaled


def conv(out_channels, in_channels, kh, kw=None):
    return (out_channels, in_channels, kh, kh if kw is None else kw)


def pytorch_fid_layout() -> dict[str, tuple[int, ...]]:
    """Every tensor of pt_inception-2015-12-05-6726825d.pth, written out from the architecture:
    torchvision's Inception3 with 1008 classes and no AuxLogits (what pytorch-fid's strict
    ``load_state_dict`` accepts). Conv layers are ``<name>.conv.weight`` + ``<name>.bn.*``."""
    convs = {
        "Conv2d_1a_3x3": conv(32, 3, 3),
        "Conv2d_2a_3x3": conv(32, 32, 3),
        "Conv2d_2b_3x3": conv(64, 32, 3),
        "Conv2d_3b_1x1": conv(80, 64, 1),
        "Conv2d_4a_3x3": conv(192, 80, 3),
    }
    for name, cin, pool in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
        convs |= {
            f"{name}.branch1x1": conv(64, cin, 1),
            f"{name}.branch5x5_1": conv(48, cin, 1),
            f"{name}.branch5x5_2": conv(64, 48, 5),
            f"{name}.branch3x3dbl_1": conv(64, cin, 1),
            f"{name}.branch3x3dbl_2": conv(96, 64, 3),
            f"{name}.branch3x3dbl_3": conv(96, 96, 3),
            f"{name}.branch_pool": conv(pool, cin, 1),
        }
    convs |= {
        "Mixed_6a.branch3x3": conv(384, 288, 3),
        "Mixed_6a.branch3x3dbl_1": conv(64, 288, 1),
        "Mixed_6a.branch3x3dbl_2": conv(96, 64, 3),
        "Mixed_6a.branch3x3dbl_3": conv(96, 96, 3),
    }
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        convs |= {
            f"{name}.branch1x1": conv(192, 768, 1),
            f"{name}.branch7x7_1": conv(c7, 768, 1),
            f"{name}.branch7x7_2": conv(c7, c7, 1, 7),
            f"{name}.branch7x7_3": conv(192, c7, 7, 1),
            f"{name}.branch7x7dbl_1": conv(c7, 768, 1),
            f"{name}.branch7x7dbl_2": conv(c7, c7, 7, 1),
            f"{name}.branch7x7dbl_3": conv(c7, c7, 1, 7),
            f"{name}.branch7x7dbl_4": conv(c7, c7, 7, 1),
            f"{name}.branch7x7dbl_5": conv(192, c7, 1, 7),
            f"{name}.branch_pool": conv(192, 768, 1),
        }
    convs |= {
        "Mixed_7a.branch3x3_1": conv(192, 768, 1),
        "Mixed_7a.branch3x3_2": conv(320, 192, 3),
        "Mixed_7a.branch7x7x3_1": conv(192, 768, 1),
        "Mixed_7a.branch7x7x3_2": conv(192, 192, 1, 7),
        "Mixed_7a.branch7x7x3_3": conv(192, 192, 7, 1),
        "Mixed_7a.branch7x7x3_4": conv(192, 192, 3),
    }
    for name, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
        convs |= {
            f"{name}.branch1x1": conv(320, cin, 1),
            f"{name}.branch3x3_1": conv(384, cin, 1),
            f"{name}.branch3x3_2a": conv(384, 384, 1, 3),
            f"{name}.branch3x3_2b": conv(384, 384, 3, 1),
            f"{name}.branch3x3dbl_1": conv(448, cin, 1),
            f"{name}.branch3x3dbl_2": conv(384, 448, 3),
            f"{name}.branch3x3dbl_3a": conv(384, 384, 1, 3),
            f"{name}.branch3x3dbl_3b": conv(384, 384, 3, 1),
            f"{name}.branch_pool": conv(192, cin, 1),
        }
    layout = {}
    for name, shape in convs.items():
        layout[f"{name}.conv.weight"] = shape
        for stat in ("weight", "bias", "running_mean", "running_var"):
            layout[f"{name}.bn.{stat}"] = (shape[0],)
    layout["fc.weight"] = (1008, 2048)
    layout["fc.bias"] = (1008,)
    return layout


def random_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random FID-Inception weights with He-scaled convs and mild BatchNorm statistics."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    with torch.device("meta"):
        template = FIDInceptionV3().state_dict()
    for key, value in template.items():
        shape = value.shape
        if key.endswith("conv.weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            state[key] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif key.endswith("bn.weight") or key.endswith("running_var"):
            state[key] = 0.75 + 0.5 * torch.rand(shape, generator=g)
        elif key.endswith("bn.bias") or key.endswith("running_mean"):
            state[key] = 0.1 * torch.randn(shape, generator=g)
        elif key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(0)
        else:  # fc
            state[key] = torch.randn(shape, generator=g) * 0.05
    return state


@pytest.fixture(scope="module")
def state():
    return random_state_dict()


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory, state):
    path = tmp_path_factory.mktemp("inception") / FID_WEIGHTS_FILENAME
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(2, 64, 48, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def model(weights_file):
    return load_fid_inception(weights_file)


def test_architecture_matches_the_pytorch_fid_weight_layout():
    ours = {
        k: tuple(v.shape) for k, v in FIDInceptionV3().state_dict().items() if not k.endswith("num_batches_tracked")
    }
    assert ours == pytorch_fid_layout()
    assert inception.expected_state_dict_shapes() == pytorch_fid_layout()
    assert (
        sum(p.numel() for p in FIDInceptionV3().parameters()) == 23_850_960
    )  # torchvision Inception3, 1008 classes, no aux


@pytest.mark.parametrize("legacy_format", [False, True])
def test_saved_weights_reload_through_the_public_loader(tmp_path, legacy_format, state):
    path = tmp_path / FID_WEIGHTS_FILENAME
    # pytorch-fid's file predates the zip format; both serialisations must load with weights_only=True
    torch.save(state, path, _use_new_zipfile_serialization=not legacy_format)
    loaded = load_state_dict(path)
    assert set(loaded) == set(pytorch_fid_layout())
    model = load_fid_inception(path)
    assert not model.training
    for key, value in model.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def test_files_without_batchnorm_counters_load(tmp_path, state):
    path = tmp_path / "no_counters.pth"
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)
    assert set(load_state_dict(path)) == set(pytorch_fid_layout())


def test_output_shapes_and_definitions(model, images):
    captured = {}
    hook = model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.setdefault("mixed_6_conv", o))
    with torch.no_grad():
        out = model(preprocess(images))
    hook.remove()
    assert out["pool"].shape == (2, 2048)
    assert out["logits"].shape == (2, 1008)
    assert out["spatial"].shape == (2, 2023)
    # sFID features: TF mixed_6/conv (after ReLU), first 7 channels, flattened in NHWC order like ADM
    expected_spatial = captured["mixed_6_conv"][:, :7].permute(0, 2, 3, 1).reshape(2, -1)
    torch.testing.assert_close(out["spatial"], expected_spatial)
    # IS logits: pool_3 times the softmax weights, without the bias
    torch.testing.assert_close(out["logits"], out["pool"] @ model.fc.weight.T)
    assert (out["pool"] >= 0).all() and out["pool"].std() > 1e-3  # post-ReLU averages, not vanished


def test_preprocess_matches_pytorch_fid_arithmetic(images):
    x = preprocess(images)
    assert x.shape == (2, 3, 299, 299) and x.dtype == torch.float32
    reference = torch.nn.functional.interpolate(
        torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0,
        size=(299, 299),
        mode="bilinear",
        align_corners=False,
    )
    torch.testing.assert_close(x, 2 * reference - 1)
    full = np.random.default_rng(1).integers(0, 256, size=(1, 299, 299, 3), dtype=np.uint8)
    torch.testing.assert_close(preprocess(full)[0], torch.from_numpy(full[0]).permute(2, 0, 1).float() / 255 * 2 - 1)


def test_grayscale_is_repeated_to_rgb(images):
    gray = images[..., :1]
    torch.testing.assert_close(preprocess(gray), preprocess(np.repeat(gray, 3, axis=-1)))
    torch.testing.assert_close(preprocess(gray[..., 0]), preprocess(gray))
    with pytest.raises(ValueError, match="uint8"):
        preprocess(images.astype(np.float32))
    with pytest.raises(ValueError, match="C = 1 or 3"):
        preprocess(np.zeros((1, 8, 8, 4), dtype=np.uint8))


def test_truncated_and_corrupt_files_give_clear_errors(tmp_path, weights_file):
    data = weights_file.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(InceptionWeightsError, match="truncated, corrupt") as error:
        load_state_dict(truncated)
    assert FID_WEIGHTS_FILENAME in str(error.value)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(InceptionWeightsError, match="truncated, corrupt"):
        load_state_dict(garbage)
    not_a_state_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_state_dict)
    with pytest.raises(InceptionWeightsError, match="expected a state dict"):
        load_state_dict(not_a_state_dict)


def test_wrong_state_dicts_are_rejected_with_the_offending_keys(tmp_path, state):
    wrong_shape = {
        **state,
        "fc.weight": torch.zeros(1000, 2048),
    }  # torchvision's ImageNet head, not the FID graph's 1008
    path = tmp_path / "wrong_shape.pth"
    torch.save(wrong_shape, path)
    with pytest.raises(InceptionWeightsError, match=r"fc\.weight: \(1000, 2048\) != \(1008, 2048\)"):
        load_state_dict(path)

    wrong_keys = {k: v for k, v in state.items() if k != "Mixed_7c.branch_pool.conv.weight"}
    wrong_keys["AuxLogits.fc.weight"] = torch.zeros(1008, 768)  # torchvision checkpoint with the aux head
    path = tmp_path / "wrong_keys.pth"
    torch.save(wrong_keys, path)
    with pytest.raises(
        InceptionWeightsError, match="1 missing.*Mixed_7c.branch_pool.conv.weight.*1 unexpected.*AuxLogits"
    ):
        load_state_dict(path)


def test_weight_resolution_order(tmp_path, monkeypatch, weights_file):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(inception.WEIGHTS_ENV_VAR, raising=False)

    def no_download(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    assert resolve_weights_path(weights_file) == weights_file
    monkeypatch.setenv(inception.WEIGHTS_ENV_VAR, str(weights_file))
    assert resolve_weights_path() == weights_file
    monkeypatch.delenv(inception.WEIGHTS_ENV_VAR)

    # offline and nothing cached: the error says exactly which file to get and where to pass it
    with pytest.raises(InceptionWeightsError) as error:
        resolve_weights_path()
    message = str(error.value)
    for needle in (
        FID_WEIGHTS_FILENAME,
        FID_WEIGHTS_URL,
        "--inception-weights",
        inception.WEIGHTS_ENV_VAR,
        "network is unreachable",
    ):
        assert needle in message

    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / FID_WEIGHTS_FILENAME
    assert inception.hub_cache_path() == cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(weights_file.read_bytes())
    assert resolve_weights_path() == cached  # a pre-seeded pytorch-fid / torch hub cache works offline

    with pytest.raises(InceptionWeightsError, match="is not a file"):
        resolve_weights_path(tmp_path / "missing.pth")  # an explicit path is never silently replaced


def test_extractor_records_weights_and_returns_all_features(weights_file, images):
    # random weights are not pytorch-fid's file: accepted only when asked for (tests/test_eval_reliability.py)
    extractor = make_feature_extractor("inception", inception_weights=weights_file, allow_unknown_weights=True)
    assert isinstance(extractor, InceptionFeatureExtractor)
    assert extractor.weights_sha256 == hashlib.sha256(weights_file.read_bytes()).hexdigest()
    features = extractor.extract(images, batch_size=1)
    assert {k: v.shape for k, v in features.items()} == {"pool": (2, 2048), "logits": (2, 1008), "spatial": (2, 2023)}
    assert all(v.dtype == np.float32 for v in features.values())


def test_matches_pytorch_fid_on_the_same_weights(model, state, images, monkeypatch):
    """Our features vs pytorch-fid's (needs pytorch-fid and a working torchvision; skipped otherwise)."""
    pytorch_fid_inception = pytest.importorskip("pytorch_fid.inception")
    monkeypatch.setattr(pytorch_fid_inception, "load_state_dict_from_url", lambda *a, **k: state)
    theirs = pytorch_fid_inception.InceptionV3([3]).eval()
    captured = {}
    theirs.blocks[2][6].branch1x1.register_forward_hook(lambda m, i, o: captured.setdefault("spatial", o))
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0  # pytorch-fid's ToTensor
        pool = theirs(x)[0].flatten(1)
    with torch.no_grad():
        out = model(preprocess(images))
    assert_close_scaled(out["pool"], pool, rtol=1e-4)
    spatial = captured["spatial"][:, :7].permute(0, 2, 3, 1).reshape(len(images), -1)
    assert_close_scaled(out["spatial"], spatial, rtol=1e-4)
    assert_close_scaled(out["logits"], pool @ state["fc.weight"].T, rtol=1e-4)
