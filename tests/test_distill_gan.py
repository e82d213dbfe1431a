"""DMD2's GAN term in `dar distill` (distill.gan_*): the losses, where D's head reads, where each loss's
gradient goes, exact resume, and that a run without it is unchanged."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dar.diffusion.transport import Transport
from dar.distillation import distill
from dar.distillation.dmd import generator_output
from dar.distillation.gan import DiscriminatorHead, discriminator_logits, discriminator_loss, generator_loss
from dar.distillation.trainer import Distiller
from dar.errors import CheckpointError
from dar.models.sit import ModelConfig, ProjectorConfig, build_model
from dar.routing import RoutingConfig
from dar.training.checkpoint import latest_checkpoint
from dar.training.runtime import Distributed

TINY = ["distill.global_batch=4", "distill.log_every=1", "distill.sample_every=0", "distill.ckpt_every=0",
        "distill.keep_checkpoints=0", "distill.student_lr=1e-3", "distill.fake_lr=1e-3"]
GAN = ["distill.gan_generator_weight=0.1", "distill.gan_fake_weight=0.1"]
GAN_METRICS = {"gan_generator_loss", "gan_fake_loss", "gan_fake_logit", "gan_real_logit"}

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only waits


def weights(run_dir, which):
    return load_file(str(latest_checkpoint(run_dir) / f"{which}.safetensors"))


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def distiller(teacher, run_dir, overrides):
    return Distiller(teacher, run_dir, overrides, Distributed("cpu"), progress=False, overwrite=False)


# -- the losses and where D reads -----------------------------------------------------------------


def test_the_losses_are_the_non_saturating_gan_losses_of_the_logits():
    fake, real = torch.tensor([-2.0, 0.0, 0.5, 3.0]), torch.tensor([1.0, -1.0, 0.0, 4.0])
    expected = sum(torch.log1p(torch.exp(f)) + torch.log1p(torch.exp(-r)) for f, r in zip(fake, real)) / 4
    torch.testing.assert_close(discriminator_loss(fake, real), expected)
    torch.testing.assert_close(generator_loss(fake), torch.log1p(torch.exp(-fake)).mean())
    # the generator's loss is the discriminator's fake half with the label flipped
    torch.testing.assert_close(generator_loss(fake), F.binary_cross_entropy_with_logits(fake, torch.ones(4)))


class Recorder:
    """A stream wrapper (SiT's ``inspect``) that keeps every sublayer input: block k's is the (2k)-th."""

    def __init__(self, stream):
        self.stream, self.inputs = stream, []

    def next_input(self):
        h = self.stream.next_input()
        self.inputs.append(h)
        return h

    def __getattr__(self, name):
        return getattr(self.stream, name)


@pytest.mark.parametrize("routing", [RoutingConfig(), RoutingConfig(mode="dar", query="static_t", chunk_size=2)])
def test_the_head_reads_the_routed_input_of_block_k(routing):
    config = ModelConfig(arch="SiT-Pico/8", in_channels=1, num_classes=10, routing=routing, depth=4)
    model = build_model(config, ProjectorConfig(depth=2, hidden=16, dim=8))
    with torch.no_grad():  # a routed DAR stream and non-zero blocks, so that every block's input differs
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x, t, y = torch.randn(3, 1, 32, 32), torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0, 4, 10])
    recorders = []
    with torch.no_grad():
        plain = model(x, t, y)
        recorded = model(x, t, y, inspect=lambda s: recorders.append(Recorder(s)) or recorders[-1])
        out, aligned = model(x, t, y, align=True)
        for k in range(4):
            out_k, features = model(x, t, y, features_at=k)
            assert torch.equal(out_k, plain) and torch.equal(features, recorders[0].inputs[2 * k]), k
        # the state REPA's projector reads at its depth
        assert torch.equal(model.projector(model(x, t, y, features_at=2)[1]), aligned)
    assert torch.equal(recorded, plain) and torch.equal(out, plain)
    if routing.mode == "residual":  # and for the residual stream, the hidden state after k blocks
        with torch.no_grad():
            c = model.t_embedder(t) + model.y_embedder(y)
            h = model.x_embedder(x) + model.pos_embed
            for block in model.blocks[:3]:
                shift1, scale1, gate1, shift2, scale2, gate2 = block.adaLN_modulation(c).chunk(6, dim=1)
                h = h + block.attn_update(h, shift1, scale1, gate1)
                h = h + block.mlp_update(h, shift2, scale2, gate2)
            torch.testing.assert_close(model(x, t, y, features_at=3)[1], h)
    head = DiscriminatorHead(64)
    noise = torch.randn_like(x)
    x_t, _ = Transport().interpolate(x, noise, t)
    with torch.no_grad():
        expected = head.mlp(model(x_t, t, y, features_at=1)[1]).squeeze(-1).mean(dim=1)
        torch.testing.assert_close(discriminator_logits(model, head, 1, x, y, Transport(), t, noise), expected)
    with pytest.raises(ValueError, match="features_at must lie in"):
        model(x, t, y, features_at=4)


# -- where the gradients go -----------------------------------------------------------------------


def test_each_gan_loss_trains_only_its_side(teacher, tmp_path):
    run = distiller(teacher, tmp_path, [*TINY, *GAN, "distill.gan_depth=5"])
    assert run.gan_block == 5
    inputs = run.step_inputs(0)
    x = generator_output(run.student, inputs["z"], inputs["y"], run.transport, 1, 0, [], grad=True)
    flags = {name: p.requires_grad for name, p in run.fake.named_parameters()}

    def grads(module):
        return {n: p.grad for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}

    # the generator's GAN loss: into G only, through the frozen fake score and head
    run._generator_gan_loss(x, inputs).backward()
    assert grads(run.student)
    assert all(p.grad is None for p in [*run.fake.parameters(), *run.head.parameters()])
    assert {name: p.requires_grad for name, p in run.fake.named_parameters()} == flags  # restored
    assert all(p.requires_grad for p in run.head.parameters())

    # the discriminator's loss: into the head and the fake score's blocks before k, never into G
    run.student.zero_grad(set_to_none=True)
    record = {}
    run._discriminator_loss(x, inputs, record).backward()
    assert not grads(run.student)
    assert set(grads(run.head)) == {n for n, _ in run.head.named_parameters()}
    reached = grads(run.fake)
    blocks = {int(n.split(".")[1]) for n in reached if n.startswith("blocks.")}
    assert blocks == set(range(5)), blocks  # blocks 0..k-1; block k and later do not make its input
    assert any(n.startswith("x_embedder.") for n in reached) and not any(n.startswith("final_layer.") for n in reached)
    assert set(record) == {"gan_fake_loss", "gan_fake_logit", "gan_real_logit"}
    # real images: the teacher's data, drawn again identically for the same step and differently for another
    again = run.step_inputs(0)
    assert torch.equal(again["real_x"], inputs["real_x"]) and torch.equal(again["real_y"], inputs["real_y"])
    assert not torch.equal(run.step_inputs(1)["real_x"], inputs["real_x"])
    assert inputs["real_x"].shape == x.shape and inputs["real_y"].max() < 10


# -- the loop -------------------------------------------------------------------------------------


def test_zero_weights_are_a_run_without_the_gan_term(teacher, tmp_path):
    plain, zero = tmp_path / "plain", tmp_path / "zero"
    overrides = [*TINY, "distill.steps=2", "distill.update_ratio=2"]
    distill(teacher, plain, overrides, progress=False)
    distill(teacher, zero, [*overrides, "distill.gan_generator_weight=0", "distill.gan_fake_weight=0"], progress=False)
    for which in ("model", "ema", "fake"):
        a, b = weights(plain, which), weights(zero, which)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), which
    assert not (latest_checkpoint(zero) / "disc.safetensors").exists()
    assert not GAN_METRICS & {k for r in records(zero) for k in r}


def test_a_gan_run_stopped_and_resumed_equals_an_uninterrupted_one_bit_for_bit(teacher, tmp_path):
    overrides = [*TINY, *GAN, "distill.steps=4", "distill.update_ratio=2", "distill.generator_steps=2"]
    distill(teacher, tmp_path / "straight", overrides, progress=False)
    distill(teacher, tmp_path / "interrupted", overrides, progress=False, stop_after=1)
    assert (latest_checkpoint(tmp_path / "interrupted") / "disc.safetensors").is_file()
    distill(teacher, tmp_path / "interrupted", overrides, progress=False)
    for which in ("model", "ema", "fake", "disc"):
        a, b = weights(tmp_path / "straight", which), weights(tmp_path / "interrupted", which)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), which
    strip = [{k: v for k, v in r.items() if k not in ("time", "steps_per_s")} for r in records(tmp_path / "straight")]
    again = [{k: v for k, v in r.items() if k not in ("time", "steps_per_s")} for r in records(tmp_path / "interrupted")]
    assert strip == again
    assert all({"gan_fake_loss", "gan_fake_logit", "gan_real_logit"} <= set(r) for r in strip)
    assert [r["step"] for r in strip if "gan_generator_loss" in r] == [2, 4]
    assert set(weights(tmp_path / "straight", "disc")) == set(DiscriminatorHead(64).state_dict())
    # a checkpoint without D's head cannot be continued with the GAN term
    (latest_checkpoint(tmp_path / "interrupted") / "disc.safetensors").unlink()
    with pytest.raises(CheckpointError, match="disc.safetensors"):
        distill(None, tmp_path / "interrupted", [*overrides, "distill.steps=6"], progress=False)
    with pytest.raises(ValueError, match="distill.gan_fake_weight"):  # a trajectory field: it cannot change
        distill(None, tmp_path / "straight", ["distill.steps=6", "distill.gan_fake_weight=0.2"], progress=False)


# -- bad input ------------------------------------------------------------------------------------


def test_bad_gan_settings_are_clear_errors(teacher, tmp_path, monkeypatch):
    for overrides, message in [(["distill.gan_fake_weight=-1"], "must be >= 0"),
                               (["distill.gan_generator_weight=nan"], "gan_generator_weight must be a finite"),
                               (["distill.gan_depth=3"], "gan_depth=3 has no effect without the GAN term"),
                               ([*GAN, "distill.gan_depth=12"], r"gan_depth=12 must lie in \[0, 11\]"),
                               ([*GAN, "distill.gan_depth=-1"], "gan_depth must be >= 0")]:
        with pytest.raises(ValueError, match=message):
            distill(teacher, tmp_path / "a", [*TINY, "distill.steps=1", *overrides], progress=False)
    import dar.data

    def unavailable(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(dar.data, "make_dataset", unavailable)
    with pytest.raises(ValueError, match="distill.gan_generator_weight / distill.gan_fake_weight need.*no network"):
        distill(teacher, tmp_path / "b", [*TINY, "distill.steps=1", *GAN], progress=False)
    assert not (tmp_path / "a" / "checkpoints").exists() and not (tmp_path / "b" / "checkpoints").exists()
