import pytest
import torch

from dar.diffusion.samplers import SamplerConfig, guided_velocity, sample
from dar.diffusion.transport import Transport

S = 0.5  # data ~ N(0, S^2 I): velocity and score are known in closed form


def var_t(t):
    return t**2 * S**2 + (1 - t) ** 2


class GaussianVelocity(torch.nn.Module):
    """The exact velocity field of the linear path for N(0, S^2 I) data."""

    num_classes = 10

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x, t, y):
        self.calls += 1
        t = t.reshape(-1, *([1] * (x.dim() - 1)))
        return (t * S**2 - (1 - t)) / var_t(t) * x


def test_linear_interpolant_and_target():
    x1, x0, t = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0.0, 1.0, 0.25, 0.5])
    xt, ut = Transport("linear").interpolate(x1, x0, t)
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[1], x1[1])
    torch.testing.assert_close(xt[2], 0.25 * x1[2] + 0.75 * x0[2])
    torch.testing.assert_close(ut, x1 - x0)


@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_score_from_velocity_matches_gaussian_score(path):
    transport = Transport(path)
    t = torch.tensor([0.2, 0.5, 0.9])
    x = torch.randn(3, 5)
    (a, da), (s, ds) = transport.path.alpha(t[:, None]), transport.path.sigma(t[:, None])
    var = a**2 * S**2 + s**2
    v = (da * a * S**2 + ds * s) / var * x  # E[da x1 + ds x0 | x_t]
    torch.testing.assert_close(transport.score_from_velocity(v, x, t), -x / var)


def test_sde_diffusion_forms_for_linear_path():
    t = torch.tensor([0.25, 0.5])
    torch.testing.assert_close(Transport().sde_diffusion(torch.zeros(2, 1), t, "SBDM")[:, 0], (1 - t) / t)
    torch.testing.assert_close(Transport().sde_diffusion(torch.zeros(2, 1), t, "sigma")[:, 0], 1 - t)


@pytest.mark.parametrize("method,steps,tol", [("euler", 200, 5e-3), ("heun", 50, 5e-4), ("dopri5", 1, 1e-4)])
def test_ode_solvers_reach_the_exact_flow_map(method, steps, tol):
    """For Gaussian data the ODE maps noise x0 to S * x0 exactly."""
    model = GaussianVelocity()
    noise = torch.randn(16, 2, 4, 4, dtype=torch.float64)
    config = SamplerConfig(method=method, steps=steps, rtol=1e-6)
    x, info = sample(model, noise, torch.zeros(16, dtype=torch.long), config)
    torch.testing.assert_close(x, S * noise, rtol=tol, atol=tol)
    assert info["nfe"] == model.calls
    assert info["nfe"] == {"euler": steps, "heun": 2 * steps}.get(method, info["nfe"])
    assert info["nfe"] > 0


@pytest.mark.parametrize("form", ["sigma", "SBDM"])
def test_sde_sampler_matches_data_distribution_and_reports_nfe(form):
    model = GaussianVelocity()
    noise = torch.randn(4000, 1, 4, 4)
    config = SamplerConfig(method="sde", steps=100, diffusion_form=form)
    x, info = sample(model, noise, torch.zeros(4000, dtype=torch.long), config,
                     generator=torch.Generator().manual_seed(0))
    assert info["nfe"] == 100 == model.calls
    assert abs(x.std().item() - S) < 0.02
    assert abs(x.mean().item()) < 0.02


class LabelShift(torch.nn.Module):
    num_classes = 3

    def forward(self, x, t, y):
        # conditional output = label value, unconditional (null label 3) = -1
        val = torch.where(y == 3, -1.0, y.float()).reshape(-1, 1, 1, 1)
        return torch.zeros_like(x) + val


def test_cfg_guides_all_channels_inside_interval_only():
    model, y = LabelShift(), torch.tensor([2])
    x = torch.zeros(1, 4, 2, 2)
    v = guided_velocity(model, y, SamplerConfig(cfg_scale=1.5, guidance_interval=(0.2, 0.8)), 3)
    torch.testing.assert_close(v(x, torch.tensor([0.5])), torch.full_like(x, -1 + 1.5 * 3))
    torch.testing.assert_close(v(x, torch.tensor([0.9])), torch.full_like(x, 2.0))  # outside: conditional
    legacy = guided_velocity(model, y, SamplerConfig(cfg_scale=1.5, cfg_channels="legacy3"), 3)(x, torch.tensor([0.5]))
    torch.testing.assert_close(legacy[:, :3], torch.full_like(x[:, :3], 3.5))
    torch.testing.assert_close(legacy[:, 3:], torch.full_like(x[:, 3:], 2.0))


def test_bad_sampler_config_names_the_field():
    with pytest.raises(ValueError, match="sampler.method='ddim'"):
        SamplerConfig(method="ddim")
    with pytest.raises(ValueError, match="guidance_interval"):
        SamplerConfig(guidance_interval=(0.9, 0.1))
    with pytest.raises(ValueError, match="transport.path"):
        Transport("cosine")


def test_sde_forms_and_their_start():
    with pytest.raises(ValueError, match="SBDM form is singular at t = 0"):
        SamplerConfig(method="sde", diffusion_form="SBDM", sde_start=0.0)
    with pytest.raises(ValueError, match="diffusion_form='ito' is not one of sigma, SBDM"):
        SamplerConfig(method="sde", diffusion_form="ito")


@pytest.mark.parametrize("form, first_t", [("sigma", 0.0), ("SBDM", 0.04)])
def test_sde_starts_where_sits_sampler_does(form, first_t):
    """SiT's check_interval: the sigma form integrates from t = 0, SBDM (singular there) from its start."""
    seen = []

    class Recorder(GaussianVelocity):
        def forward(self, x, t, y):
            seen.append(float(t[0]))
            return super().forward(x, t, y)

    sample(Recorder(), torch.randn(2, 1, 2, 2), torch.zeros(2, dtype=torch.long),
           SamplerConfig(method="sde", steps=5, diffusion_form=form), generator=torch.Generator().manual_seed(0))
    assert seen[0] == pytest.approx(first_t) and seen[-1] == pytest.approx(0.96) and len(seen) == 5
