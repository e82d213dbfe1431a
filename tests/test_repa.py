"""REPA in training: the alignment loss, where the projector reads, what it trains, exact resume, and
that REPA off (or at weight 0) leaves training as it was."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from dar.models.sit import ModelConfig, ProjectorConfig, build_model
from dar.routing import RoutingConfig
from dar.training.checkpoint import latest_checkpoint, load_model
from dar.training.config import resolve
from dar.training.repa import alignment_loss
from dar.training.trainer import parameter_groups, train
from tolerances import assert_close_scaled

# SiT-Pico/8 on 32x32 RGB: 4x4 tokens, matched by EfficientNet-Lite0's stride-16 features of 64 px input.
TINY = ["model.arch=SiT-Pico/8", "model.in_channels=3", "model.num_classes=2", "train.global_batch=4",
        "train.ckpt_every=0", "train.sample_every=0", "train.log_every=1", "train.keep_checkpoints=0",
        "repa.encoder=efficientnet-lite0", "repa.depth=3", "repa.projector_dim=32"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir()
        for k in range(6):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / label / f"{k}.png")
    return root


def repa_config(image_folder, tmp_path, *extra):
    return resolve("fmnist", [*TINY, "data.name=imagefolder", f"data.path={image_folder}", "data.image_size=32",
                              f"repa.cache_dir={tmp_path / 'cache'}", *extra])


def test_alignment_loss_is_minus_the_mean_token_cosine():
    g = torch.Generator().manual_seed(0)
    projected, features = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 7, generator=g)
    direct = torch.stack([-torch.stack([F.cosine_similarity(projected[b, n], features[b, n], dim=0)
                                         for n in range(5)]).mean() for b in range(3)])
    assert_close_scaled(alignment_loss(projected, features), direct, 1e-6)
    assert torch.allclose(alignment_loss(features * 3.0, features), torch.full((3,), -1.0))
    with pytest.raises(ValueError, match="does not match the encoder features"):
        alignment_loss(projected, features[:, :4])


@pytest.mark.parametrize("mode", ["residual", "dar"])
def test_the_projector_reads_the_input_of_block_depth_and_only_trains_what_comes_before(mode):
    config = ModelConfig(arch="SiT-Pico/8", input_size=16, in_channels=1, num_classes=3,
                         routing=RoutingConfig(mode=mode, query="dynamic", chunk_size=2))
    model = build_model(config, ProjectorConfig(depth=2, hidden=16, dim=8))
    for p in model.parameters():  # adaLN-Zero starts every sublayer at zero: perturb so that blocks matter
        p.data.add_(0.05 * torch.randn_like(p))
    x, t, y = torch.randn(2, 1, 16, 16), torch.rand(2), torch.tensor([0, 2])
    seen = {}
    model.blocks[2].norm1.register_forward_hook(lambda module, args, out: seen.setdefault("h", args[0]))
    out, projected = model(x, t, y, align=True)
    assert torch.equal(projected, model.projector(seen["h"]))
    assert torch.equal(out, model(x, t, y))  # asking for the projection does not change the prediction
    alignment_loss(projected, torch.randn(2, 4, 8)).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in grads if n.startswith("projector."))
    assert grads["blocks.0.attn.qkv.weight"].abs().sum() > 0 and grads["blocks.1.mlp.fc2.weight"].abs().sum() > 0
    assert all(grads[n] is None for n in grads if n.startswith(("blocks.2.", "blocks.3.", "final_layer.")))


def test_a_projector_changes_no_other_weight_or_output():
    config = ModelConfig(arch="SiT-Pico/8", input_size=16, in_channels=1, num_classes=3)
    torch.manual_seed(1)
    plain = build_model(config)
    torch.manual_seed(1)
    aligned = build_model(config, ProjectorConfig(depth=3, hidden=16, dim=8))
    own = aligned.state_dict()
    assert all(torch.equal(value, own[key]) for key, value in plain.state_dict().items())
    assert sorted(set(own) - set(plain.state_dict()))[0].startswith("projector.")
    assert list(own)[: len(plain.state_dict())] == list(plain.state_dict())  # optimizer states keep their places
    with pytest.raises(ValueError, match="alignment depth"):
        build_model(config, ProjectorConfig(depth=12, hidden=16, dim=8))
    with pytest.raises(ValueError, match="needs a model built with a projector"):
        plain(torch.randn(1, 1, 16, 16), torch.rand(1), torch.tensor([0]), align=True)


def test_repa_defaults_follow_the_model_and_the_data():
    builtin = resolve("fmnist", ["repa.enabled=true"])  # SiT-Nano/4: 6 blocks, width 128
    assert (builtin.repa.encoder, builtin.repa.depth, builtin.repa.projector_dim) == ("efficientnet-lite0", 2, 256)
    deep = resolve("fmnist-deep", ["repa.enabled=on", "repa.projector_dim=512"])
    assert (deep.repa.depth, deep.repa.projector_dim) == (4, 512)
    xl = resolve("imagenet256-xl", ["repa.enabled=true", "repa.encoder_path=/weights/dinov2-base"])
    assert (xl.repa.encoder, xl.repa.depth, xl.repa.projector_dim, xl.model.routing.final) == ("dinov2-b", 8, 2048, "reuse_last")
    assert resolve("imagenet256-b-residual", ["repa.enabled=true"]).repa.depth == 4
    off = resolve("fmnist", ["repa.enabled=false"])
    assert off.repa == resolve("fmnist", []).repa and off.model.routing.final == "dedicated"


def test_repa_config_is_validated_and_dar_drops_the_final_aggregator():
    assert resolve("fmnist", ["repa.enabled=true", "repa.encoder=efficientnet-lite0", "repa.depth=2"]).model.routing.final == "reuse_last"
    kept = resolve("fmnist", ["repa.enabled=true", "repa.encoder=efficientnet-lite0", "repa.depth=2",
                              "model.routing.final=dedicated"])
    assert kept.model.routing.final == "dedicated"
    assert resolve("fmnist", []).model.routing.final == "dedicated"
    assert resolve("fmnist", ["repa.enabled=true", "repa.encoder=efficientnet-lite0", "repa.depth=2"]).projector.dim == 112
    with pytest.raises(ValueError, match="repa.depth=6 must lie in"):
        resolve("fmnist", ["repa.enabled=true", "repa.depth=6"])  # SiT-Nano has 6 blocks
    with pytest.raises(ValueError, match="repa.enabled must be true or false"):
        resolve("fmnist", ["repa.enabled=maybe"])
    with pytest.raises(ValueError, match="repa.encoder='clip' is not one of"):
        resolve("fmnist", ["repa.encoder=clip"])
    with pytest.raises(ValueError, match="repa.weight"):
        resolve("fmnist", ["repa.weight=nan"])


def test_repa_training_logs_both_losses_resumes_exactly_and_samples(tmp_path, image_folder):
    config = repa_config(image_folder, tmp_path, "repa.enabled=true", "train.steps=4")
    train(config, tmp_path / "straight", progress=False)
    train(config, tmp_path / "interrupted", progress=False, stop_after=2)
    train(config, tmp_path / "interrupted", resume=True, progress=False)
    for which in ("model", "ema"):
        a, b = (load_file(str(latest_checkpoint(tmp_path / run) / f"{which}.safetensors"))
                for run in ("straight", "interrupted"))
        assert a.keys() == b.keys() and any(k.startswith("projector.") for k in a)
        assert all(torch.equal(a[k], b[k]) for k in a), which
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        assert r["loss"] == pytest.approx(r["velocity_loss"] + 0.5 * r["align_loss"], rel=1e-5)
        assert -1.0 <= r["align_loss"] <= 1.0
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 1  # features computed once, shared by both runs
    state = json.loads((latest_checkpoint(tmp_path / "straight") / "state.json").read_text())
    assert state["repa_features"]["encoder"] == "efficientnet-lite0" and len(state["repa_features"]["weights_sha256"]) == 64
    model, loaded, _ = load_model(tmp_path / "straight")  # what `dar sample` does
    assert loaded.repa.enabled and model.align_depth == 3


def test_repa_at_weight_zero_trains_the_network_exactly_as_without_repa(tmp_path, image_folder):
    # The alignment term's gradient is exactly zero, so the network's trajectory must be bit for bit the
    # one of a run without REPA: the step inputs, losses, clipping and EMA are untouched by REPA's code.
    common = ["train.steps=3", "model.routing.final=dedicated"]
    train(repa_config(image_folder, tmp_path, *common), tmp_path / "off", progress=False)
    train(repa_config(image_folder, tmp_path, *common, "repa.enabled=true", "repa.weight=0"), tmp_path / "zero",
          progress=False)
    off, zero = (load_file(str(latest_checkpoint(tmp_path / run) / "model.safetensors")) for run in ("off", "zero"))
    assert set(zero) - set(off) == {k for k in zero if k.startswith("projector.")}
    assert all(torch.equal(off[k], zero[k]) for k in off)


def test_a_repa_checkpoint_initialises_a_run_without_repa_and_vice_versa(tmp_path, image_folder):
    train(repa_config(image_folder, tmp_path, "repa.enabled=true", "train.steps=1"), tmp_path / "repa", progress=False)
    train(repa_config(image_folder, tmp_path, "train.steps=1", f"train.init_from={tmp_path / 'repa'}"),
          tmp_path / "plain", progress=False)
    train(repa_config(image_folder, tmp_path, "repa.enabled=true", "train.steps=1",
                      f"train.init_from={tmp_path / 'plain'}"), tmp_path / "again", progress=False)
    state = json.loads((latest_checkpoint(tmp_path / "again") / "state.json").read_text())
    assert state["init_from"]["projector_weights_initialised"] == 6


def test_router_learning_rate_scale_makes_a_second_parameter_group():
    model = build_model(ModelConfig(arch="SiT-Pico/8", input_size=16, in_channels=1, num_classes=3,
                                    routing=RoutingConfig(query="static_t")))
    one = parameter_groups(model, resolve("fmnist", []).train)
    assert len(one) == 1 and len(one[0]["params"]) == len(list(model.parameters()))
    tc = resolve("fmnist", ["train.router_lr_scale=10"]).train
    rest, router = parameter_groups(model, tc)
    assert router["lr"] == pytest.approx(10 * tc.lr) and "lr" not in rest
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].startswith("router.") for p in router["params"])
    assert len(rest["params"]) + len(router["params"]) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="router_lr_scale"):
        resolve("fmnist", ["train.router_lr_scale=0"])


def test_model_depth_overrides_the_architecture_depth():
    config = ModelConfig(arch="SiT-Pico/8", input_size=16, in_channels=1, num_classes=3, depth=5)
    assert len(build_model(config).blocks) == 5 and config.dims == (5, 64, 2)
    with pytest.raises(ValueError, match="model.depth"):
        ModelConfig(arch="SiT-Pico/8", depth=0)
