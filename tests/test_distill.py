"""`dar distill` (DMD2): the equations in our time convention, the training loop's schedule and resume,
the students (residual, DAR converted from a residual teacher), the few-step sampler and the commands
that read a distilled run."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dar.cli import main
from dar.diffusion.samplers import SamplerConfig, data_from_velocity, sample, velocity_from_data
from dar.diffusion.transport import Transport
from dar.distillation import distill
from dar.distillation.dmd import distribution_matching, dm_gradient, dm_loss, fake_score_loss, generator_output
from dar.errors import CheckpointError, TrainingDiverged
from dar.training.checkpoint import latest_checkpoint, load_model
from tolerances import assert_close_scaled

TINY = ["distill.global_batch=4", "distill.log_every=1", "distill.sample_every=0", "distill.ckpt_every=0",
        "distill.keep_checkpoints=0"]

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only waits


def weights(run_dir, which="model"):
    return load_file(str(latest_checkpoint(run_dir) / f"{which}.safetensors"))


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# -- the equations --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_velocity_and_data_prediction_convert_exactly(path):
    """At the conditional velocity u_t = d_alpha x1 + d_sigma x0 the data prediction is x1 itself, and
    the two conversions invert each other; on the linear path x1_hat = x + (1 - t) v."""
    transport = Transport(path)
    x1, x0 = torch.randn(5, 2, 4, 4, dtype=torch.float64), torch.randn(5, 2, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 0.99], dtype=torch.float64)
    x_t, u_t = transport.interpolate(x1, x0, t)
    torch.testing.assert_close(data_from_velocity(transport, u_t, x_t, t), x1)
    torch.testing.assert_close(velocity_from_data(transport, x1, x_t, t), u_t)
    if path == "linear":
        v = torch.randn_like(x1)
        torch.testing.assert_close(data_from_velocity(transport, v, x_t, t), x_t + (1 - t)[:, None, None, None] * v)


def test_dm_gradient_is_the_normalised_score_difference():
    x, real, fake = (torch.randn(3, 2, 4, 4) for _ in range(3))
    grad = dm_gradient(x, real, fake)
    for i in range(3):  # per sample: (p_real - p_fake) / mean |p_real|
        p_real, p_fake = x[i] - real[i], x[i] - fake[i]
        assert_close_scaled(grad[i], (p_real - p_fake) / p_real.abs().mean(), 1e-6)
    assert_close_scaled(grad, (fake - real) / (x - real).abs().mean(dim=(1, 2, 3), keepdim=True), 1e-6)
    leaf = x.clone().requires_grad_(True)
    dm_loss(leaf, grad).backward()  # d loss / dx = grad / numel: descending it moves x along real - fake
    assert_close_scaled(leaf.grad, grad / x.numel(), 1e-6)


class GaussianVelocity(torch.nn.Module):
    """The exact velocity of the linear path for data ~ N(0, std^2 I), whatever the label."""

    num_classes = 10

    def __init__(self, std):
        super().__init__()
        self.std = std

    def forward(self, x, t, y):
        t = t.reshape(-1, *([1] * (x.dim() - 1)))
        return (t * self.std**2 - (1 - t)) / (t**2 * self.std**2 + (1 - t) ** 2) * x


@pytest.mark.parametrize("start", [1.0, 0.2])
def test_a_generator_step_moves_its_distribution_towards_the_teachers(start):
    """Data N(0, 0.5^2); generator G(z) = a z (its distribution N(0, a^2)) and the fake score exact for
    it. One descent step on the DM loss moves a towards 0.5 from either side: the sign of the gradient
    in our time convention (t = 1 data)."""
    transport = Transport()
    a = torch.tensor(start, requires_grad=True)
    z = torch.randn(256, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    t = 0.02 + 0.96 * torch.rand(256, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(2))
    y = torch.zeros(256, dtype=torch.long)
    loss, _ = distribution_matching(a * z, y, GaussianVelocity(0.5), GaussianVelocity(start), transport, t, noise,
                                    cfg_scale=1.0)
    loss.backward()
    moved = a.item() - 0.05 * a.grad.sign().item()
    assert abs(moved - 0.5) < abs(start - 0.5)
    # a generator that already has the teacher's distribution gets no gradient
    _, grad = distribution_matching(0.5 * z, y, GaussianVelocity(0.5), GaussianVelocity(0.5), transport, t, noise,
                                    cfg_scale=1.0)
    assert grad.abs().max() == 0


class PointMass(torch.nn.Module):
    """The exact velocity for data that are exactly ``points`` (one per sample): x1_hat = points."""

    num_classes = 10

    def __init__(self, points):
        super().__init__()
        self.points = points

    def forward(self, x, t, y):
        return (self.points - x) / (1 - t.reshape(-1, *([1] * (x.dim() - 1))))


def test_a_generator_step_moves_each_sample_towards_the_teachers_data_prediction():
    """When the fake score knows G's samples exactly (G a point mass at them: x1_hat_fake = x), the DM
    step moves every sample straight towards the teacher's data prediction x1_hat_real(x_t)."""
    transport = Transport()
    x = torch.randn(6, 1, 4, 4, requires_grad=True)
    t, noise, y = torch.linspace(0.05, 0.95, 6), torch.randn(6, 1, 4, 4), torch.zeros(6, dtype=torch.long)
    teacher = GaussianVelocity(0.5)
    loss, _ = distribution_matching(x, y, teacher, PointMass(x.detach()), transport, t, noise, cfg_scale=1.0)
    loss.backward()
    with torch.no_grad():
        step = -x.grad  # plain gradient descent
        x_t, _ = transport.interpolate(x, noise, t)
        towards = data_from_velocity(transport, teacher(x_t, t, y), x_t, t) - x
        cosine = torch.nn.functional.cosine_similarity(step.flatten(1), towards.flatten(1))
    assert_close_scaled(cosine, torch.ones(6), 1e-5)


def test_the_fake_score_learns_the_velocity_loss_of_detached_generator_samples(teacher):
    transport = Transport()
    student, _, _ = load_model(teacher, which="model")
    fake, _, _ = load_model(teacher)
    student.train().requires_grad_(True)
    fake.train().requires_grad_(True)
    z, y = torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 2, 3])
    noise, t = torch.randn(4, 1, 32, 32), torch.rand(4)
    x = generator_output(student, z, y, transport, steps=1, k=0, rollout_noise=[], grad=True)
    assert x.requires_grad
    loss = fake_score_loss(fake, x, y, transport, noise, t)
    torch.testing.assert_close(loss, transport.loss(fake, x.detach(), y, noise, t).mean())
    loss.backward()
    assert all(p.grad is None for p in student.parameters())  # nothing reaches the generator
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in fake.parameters())


class LinearVelocity(torch.nn.Module):
    num_classes = 10

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x, t, y):
        return self.conv(x) * (1 + t.reshape(-1, 1, 1, 1)) + y.reshape(-1, 1, 1, 1)


def test_the_generator_sampler_is_the_training_rollout():
    """sampler.method=generator with N steps equals the training-time rollout to step N-1 with the same
    fresh noise (drawn from the caller's generator), and makes N model calls."""
    model, transport = LinearVelocity(), Transport()
    z, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    x, info = sample(model, z, y, SamplerConfig(method="generator", steps=4), generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    rollout = [torch.randn(z.shape, generator=g) for _ in range(3)]
    with torch.no_grad():
        expected = generator_output(model, z, y, transport, steps=4, k=3, rollout_noise=rollout, grad=False)
    torch.testing.assert_close(x, expected)
    assert info["nfe"] == 4
    one, info = sample(model, z, y, SamplerConfig(method="generator", steps=1))
    with torch.no_grad():
        torch.testing.assert_close(one, z + model(z, torch.zeros(3), y))  # x1_hat(z, 0) = z + v(z, 0)
    assert info["nfe"] == 1


# -- the loop -------------------------------------------------------------------------------------


def test_the_generator_is_updated_every_kth_step_the_fake_score_every_step(teacher, tmp_path):
    distill(teacher, tmp_path, [*TINY, "distill.steps=6", "distill.update_ratio=3", "distill.student_lr=1e-3",
                                "distill.fake_lr=1e-3"], progress=False, stop_after=2)
    start = weights(teacher, "ema")
    assert all(torch.equal(weights(tmp_path, "model")[k], v) for k, v in start.items())  # G not yet updated
    assert any(not torch.equal(weights(tmp_path, "fake")[k], v) for k, v in start.items())  # the fake score was
    distill(None, tmp_path, progress=False)
    logged = records(tmp_path)
    assert [r["generator_updates"] for r in logged] == [0, 0, 1, 1, 1, 2]
    assert [r["step"] for r in logged if "generator_loss" in r] == [3, 6]
    assert all("fake_loss" in r and "fake_grad_norm" in r for r in logged)
    assert all(r["dm_grad_norm"] > 0 and "generator_grad_norm" in r for r in logged if "generator_loss" in r)
    assert any(not torch.equal(weights(tmp_path, "model")[k], v) for k, v in start.items())
    for which in ("model", "ema", "fake"):  # SiT's fixed sin-cos positions stay fixed in every trained copy
        assert torch.equal(weights(tmp_path, which)["pos_embed"], start["pos_embed"])


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # 130 near-identical samples of a 6-step teacher
@pytest.mark.parametrize("generator_steps", [1, 4])
def test_distillation_runs_end_to_end_and_dar_sample_uses_the_generators_steps(teacher, tmp_path, generator_steps):
    run_dir = tmp_path / "run"
    summary = distill(teacher, run_dir, [*TINY, "distill.steps=4", "distill.update_ratio=2", "distill.sample_every=4",
                                         f"distill.generator_steps={generator_steps}"], progress=False)
    assert summary["step"] == 4 and summary["generator_updates"] == 2
    assert (run_dir / "samples" / "step_0000004.png").is_file()
    assert json.loads((run_dir / "config.json").read_text())["distill"]["generator_steps"] == generator_steps
    model, config, step = load_model(run_dir)
    assert step == 4 and config.sampler.method == "generator" and config.sampler.steps == generator_steps
    state = json.loads((latest_checkpoint(run_dir) / "state.json").read_text())
    assert state["teacher"]["file"].endswith("ema.safetensors") and len(state["teacher"]["weights_sha256"]) == 64
    out = tmp_path / "samples"
    num = 130 if generator_steps == 4 else 8  # dar eval needs more features than dimensions
    assert main(["sample", str(run_dir), "--num", str(num), "--out", str(out), "--no-progress"]) == 0
    record = json.loads((out / "samples.json").read_text())
    assert record["nfe"] == generator_steps and record["sampler"]["method"] == "generator"
    images = np.load(out / "samples.npz")["arr_0"]
    assert images.shape == (num, 32, 32, 1) and images.dtype == np.uint8 and images.std() > 0
    if generator_steps == 4:
        assert main(["eval", str(out / "samples.npz"), "--ref", "builtin-train", "--extractor", "fmnist-classifier",
                     "--out", str(tmp_path / "eval.json")]) == 0
        result = json.loads((tmp_path / "eval.json").read_text())
        assert result["metrics"]["fd_fmnist"] > 0 and result["sampling"]["nfe"] == 4


def test_a_stopped_and_resumed_run_equals_an_uninterrupted_one_bit_for_bit(teacher, tmp_path):
    overrides = [*TINY, "distill.steps=6", "distill.update_ratio=2", "distill.generator_steps=4",
                 "distill.student_lr=1e-3", "distill.fake_lr=1e-3", "distill.warmup_steps=3", "distill.ema_decay=0.9"]
    distill(teacher, tmp_path / "straight", overrides, progress=False)
    distill(teacher, tmp_path / "interrupted", overrides, progress=False, stop_after=3)
    assert latest_checkpoint(tmp_path / "interrupted").name == "step_0000003"
    with open(tmp_path / "interrupted" / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "fake_lo')  # a torn last line, as a kill during an append leaves
    distill(teacher, tmp_path / "interrupted", overrides, progress=False)
    for which in ("model", "ema", "fake"):
        a, b = weights(tmp_path / "straight", which), weights(tmp_path / "interrupted", which)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), which
    strip = [{k: v for k, v in r.items() if k not in ("time", "steps_per_s")} for r in records(tmp_path / "straight")]
    again = [{k: v for k, v in r.items() if k not in ("time", "steps_per_s")} for r in records(tmp_path / "interrupted")]
    assert strip == again and len(strip) == 6
    with pytest.raises(ValueError, match="distill.cfg_scale"):
        distill(teacher, tmp_path / "straight", [*overrides, "distill.steps=8", "distill.cfg_scale=3"], progress=False)


@pytest.mark.parametrize("routing", [["student.routing.chunk_size=1"],
                                     ["student.routing.chunk_size=4", "student.routing.summary=sum"]])
def test_a_dar_student_converted_from_a_residual_teacher_starts_as_the_teacher(teacher, tmp_path, routing):
    """Zero queries make every aggregator a uniform average: with the dense history (or sum summaries)
    the converted student computes the residual teacher up to LayerNorm's eps (docs/METHOD.md §12)."""
    distill(teacher, tmp_path, [*TINY, "distill.steps=1", "student.routing.mode=dar",
                                "student.routing.query=static_t", *routing], progress=False)
    student, config, _ = load_model(tmp_path, which="model")
    source, _, _ = load_model(teacher)
    assert config.model.routing.mode == "dar" and student.router.source_sets is not None
    x, t, y = torch.randn(4, 1, 32, 32), torch.tensor([0.0, 0.3, 0.6, 0.9]), torch.tensor([0, 3, 5, 10])
    with torch.no_grad():
        out, expected = student(x, t, y), source(x, t, y)
    assert ((out - expected).norm() / expected.norm()).item() < 1e-3
    state = json.loads((latest_checkpoint(tmp_path) / "state.json").read_text())
    assert state["init_from"]["router_weights_initialised"] > 0


# -- bad input ------------------------------------------------------------------------------------


def test_bad_teachers_and_configs_are_clear_errors(teacher, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        distill(tmp_path / "missing", tmp_path / "a", TINY, progress=False)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        distill(corrupt, tmp_path / "b", TINY, progress=False)
    for override, message in [("distill.generator_steps=0", "distill.generator_steps must be >= 1"),
                              ("distill.bogus=1", "unknown config key distill.bogus"),
                              ("student.routing.bogus=1", "unknown config key student.routing.bogus"),
                              ("model.arch=SiT-S/2", "unknown config key model.arch"),
                              ("student.routing.mode=dar student.routing.chunk_size=99",
                               "student.routing does not fit.*chunk_size=99"),
                              ("distill.t_max=1", "t_max"),
                              ("distill.teacher_weights=best", "teacher_weights='best'")]:
        with pytest.raises(ValueError, match=message):
            distill(teacher, tmp_path / "c", [*TINY, "distill.steps=1", *override.split()], progress=False)
    assert not (tmp_path / "c" / "checkpoints").exists()
    with pytest.raises(ValueError, match="give --teacher"):
        distill(None, tmp_path / "d", TINY, progress=False)
    with pytest.raises(CheckpointError, match="not a `dar distill` checkpoint"):
        distill(teacher, teacher, TINY, progress=False)


def test_the_command_line_reports_errors_in_one_line(teacher, tmp_path, capsys):
    assert main(["distill", "--teacher", str(tmp_path / "missing"), "--run-dir", str(tmp_path / "run")]) == 2
    assert "dar distill: error: checkpoint" in capsys.readouterr().err
    assert main(["distill", "--teacher", str(teacher), "--run-dir", str(tmp_path / "run"), "distill.steps=-1"]) == 2
    assert "distill.steps must be >= 1" in capsys.readouterr().err


def test_a_nan_loss_stops_before_the_update_with_the_last_checkpoint_intact(teacher, tmp_path, monkeypatch):
    from dar.distillation import trainer

    real, calls = trainer.distribution_matching, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, grad = real(*args, **kwargs)
        return (loss * float("nan") if calls["n"] == 2 else loss), grad

    monkeypatch.setattr(trainer, "distribution_matching", poisoned)
    with pytest.raises(TrainingDiverged, match="generator loss is nan at step 4.*step 2"):
        distill(teacher, tmp_path, [*TINY, "distill.steps=6", "distill.update_ratio=2", "distill.ckpt_every=2"],
                progress=False)
    assert latest_checkpoint(tmp_path).name == "step_0000002"
