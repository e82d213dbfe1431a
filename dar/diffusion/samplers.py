"""Samplers for velocity models: fixed-step Euler/Heun, adaptive dopri5, SiT's Euler-Maruyama SDE, and
the few-step sampler of a distilled generator (``generator``, see docs/DISTILLATION.md).

Every sampler integrates t: 0 (noise) -> 1 (data) and reports the true number of velocity
evaluations (NFE). Classifier-free guidance lives in one place, :func:`guided_velocity`; the
velocity <-> data-prediction conversion in one place, :func:`data_from_velocity` /
:func:`velocity_from_data`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch

from dar.diffusion.transport import Transport

SAMPLERS = ("euler", "heun", "dopri5", "sde", "generator")
DIFFUSION_FORMS = ("sigma", "SBDM")
CFG_CHANNELS = ("all", "legacy3")


@dataclass(frozen=True)
class SamplerConfig:
    """method: euler | heun | dopri5 | sde | generator. steps: integration steps (fixed-step ODE and SDE;
    for dopri5 only the tolerances matter and the real NFE is reported; for ``generator``, the steps of
    a few-step generator made by ``dar distill``, NFE = steps, see :func:`generator_times`; it has the
    teacher's guidance built in, so leave cfg_scale at 1). cfg_scale: 1 = no guidance.
    guidance_interval: guide only for t in [lo, hi] (SiT time, t=1 is data). cfg_channels: ``all``
    (correct) or ``legacy3``, DiT/SiT's guidance of the first 3 channels only, to reproduce their
    published numbers. diffusion_form: the SDE's diffusion coefficient w(t): ``sigma`` (w = sigma_t, 1 - t on
    the linear path; the default of SiT's sampling scripts, behind its published FIDs) or ``SBDM``
    (w = (1 - t) / t on the linear path, singular at t = 0). sde_start: first time of the SBDM form (the
    sigma form starts at t = 0, as SiT's). last_step_size: SiT's final noise-free "Mean" SDE step."""

    method: str = "euler"
    steps: int = 50
    cfg_scale: float = 1.0
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    cfg_channels: str = "all"
    atol: float = 1e-6
    rtol: float = 1e-3
    diffusion_form: str = "sigma"
    sde_start: float = 0.04
    last_step_size: float = 0.04

    def __post_init__(self):
        if self.method not in SAMPLERS:
            raise ValueError(f"sampler.method={self.method!r} is not one of {', '.join(SAMPLERS)}")
        if self.cfg_channels not in CFG_CHANNELS:
            raise ValueError(f"sampler.cfg_channels={self.cfg_channels!r} is not one of {', '.join(CFG_CHANNELS)}")
        if self.steps < 1 or (self.method == "sde" and self.steps < 2):
            raise ValueError(f"sampler.steps={self.steps} is too small for {self.method}")
        lo, hi = self.guidance_interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"sampler.guidance_interval={self.guidance_interval} must satisfy 0 <= lo <= hi <= 1")
        if self.cfg_scale < 0:
            raise ValueError(f"sampler.cfg_scale={self.cfg_scale} must be >= 0")
        if self.diffusion_form not in DIFFUSION_FORMS:
            raise ValueError(f"sampler.diffusion_form={self.diffusion_form!r} is not one of {', '.join(DIFFUSION_FORMS)}")
        if not 0 < self.sde_start < 1 - self.last_step_size <= 1:
            raise ValueError("sampler.sde_start and sampler.last_step_size must satisfy 0 < start < 1 - last_step "
                             "(the SBDM form is singular at t = 0)")

    def to_dict(self) -> dict:
        return asdict(self)


def data_from_velocity(transport: Transport, v: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The data prediction x1_hat = E[x1 | x_t = x] of a velocity model's output ``v`` at (x, t): solve
    x = alpha x1 + sigma x0, v = d_alpha x1 + d_sigma x0 for x1. On the linear path x1_hat = x + (1 - t) v.
    Exact at every t < 1 (the path is invertible there); at t = 1, x itself is data."""
    t = t.reshape(t.shape[0], *([1] * (x.dim() - 1)))
    (a, da), (s, ds) = transport.path.alpha(t), transport.path.sigma(t)
    return (ds * x - s * v) / (a * ds - da * s)


def velocity_from_data(transport: Transport, x1_hat: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`data_from_velocity`: the velocity whose data prediction at (x, t) is
    ``x1_hat`` (t < 1). On the linear path v = (x1_hat - x) / (1 - t)."""
    t = t.reshape(t.shape[0], *([1] * (x.dim() - 1)))
    (a, da), (s, ds) = transport.path.alpha(t), transport.path.sigma(t)
    return (ds * x - (a * ds - da * s) * x1_hat) / s


def generator_times(steps: int) -> list[float]:
    """The times t_k = k / steps (k = 0 .. steps-1) at which a distilled ``steps``-step generator is
    applied: t_0 = 0 is pure noise; each step predicts data and re-noises it to the next time."""
    if steps < 1:
        raise ValueError(f"a generator needs at least 1 step, got {steps}")
    return [k / steps for k in range(steps)]


def generator_noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Fresh N(0, I) noise shaped like ``x``, drawn from ``generator`` (on its own device, then moved to
    ``x``'s, so a seeded CPU generator gives the same numbers on any device) or the global RNG."""
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)


def guided_velocity(model, labels: torch.Tensor, config: SamplerConfig, null_label: int) -> Callable:
    """v(x, t) with classifier-free guidance: v_u + s (v_c - v_u), conditional and unconditional halves
    computed in one doubled batch, and only inside the guidance interval."""
    scale = config.cfg_scale
    lo, hi = config.guidance_interval
    null = torch.full_like(labels, null_label)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.expand(x.shape[0]) if t.dim() == 0 or t.numel() == 1 else t
        t_now = float(t[0])
        if scale == 1.0 or not lo <= t_now <= hi:
            return model(x, t, labels)
        v_cond, v_uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null])).chunk(2)
        guided = v_uncond + scale * (v_cond - v_uncond)
        if config.cfg_channels == "legacy3":
            guided = torch.cat([guided[:, :3], v_cond[:, 3:]], dim=1)
        return guided

    return velocity


class _Counted:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.fn(x, t)


@torch.no_grad()
def sample(
    model,
    noise: torch.Tensor,
    labels: torch.Tensor,
    config: SamplerConfig,
    transport: Transport | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict]:
    """Integrate from ``noise`` (x at t=0) to data. Returns (x1, info) with info["nfe"] the number of
    velocity evaluations actually made (each is one model call, two batch halves under CFG)."""
    transport = transport or Transport()
    velocity = _Counted(guided_velocity(model, labels, config, model.num_classes))
    x = noise
    B = x.shape[0]

    def at(t: float) -> torch.Tensor:
        return torch.full((B,), t, device=x.device, dtype=torch.float32)

    if config.method in ("euler", "heun"):
        grid = torch.linspace(0.0, 1.0, config.steps + 1).tolist()
        for t0, t1 in zip(grid[:-1], grid[1:]):
            dt = t1 - t0
            v0 = velocity(x, at(t0))
            if config.method == "euler":
                x = x + dt * v0
            else:
                x_pred = x + dt * v0
                x = x + dt * 0.5 * (v0 + velocity(x_pred, at(t1)))
    elif config.method == "dopri5":
        from torchdiffeq import odeint

        trajectory = odeint(
            lambda t, x_: velocity(x_, t.reshape(1).expand(B).float()),
            x,
            torch.tensor([0.0, 1.0], device=x.device),
            method="dopri5",
            atol=config.atol,
            rtol=config.rtol,
        )
        x = trajectory[-1]
    elif config.method == "generator":
        x = _generator_steps(x, velocity, transport, config.steps, generator, at)
    else:
        x = _sde_euler_maruyama(x, velocity, transport, config, generator, at)
    return x, {"nfe": velocity.calls, **config.to_dict()}


def _generator_steps(x, velocity, transport, steps, generator, at):
    """A distilled few-step generator (DMD2's multi-step sampling): at t_k (:func:`generator_times`)
    predict data x1_hat from x_{t_k}, then re-noise it with fresh noise to
    x_{t_{k+1}} = alpha x1_hat + sigma eps; the last prediction is the sample. One step: x1_hat(noise, 0)."""
    times = generator_times(steps)
    for k, t in enumerate(times):
        x1_hat = data_from_velocity(transport, velocity(x, at(t)), x, at(t))
        if k + 1 < steps:
            x, _ = transport.interpolate(x1_hat, generator_noise(x1_hat, generator), at(times[k + 1]))
    return x1_hat


def _sde_euler_maruyama(x, velocity, transport, config, generator, at):
    """SiT's SDE sampler: Euler-Maruyama on dx = [v + w s] dt + sqrt(2w) dW over steps-1 intervals
    of [start, 1 - last_step_size] (start: 0 for the sigma form, sde_start for SBDM, as SiT's
    check_interval), then one noise-free "Mean" step of size last_step_size."""
    t_end = 1.0 - config.last_step_size
    start = 0.0 if config.diffusion_form == "sigma" else config.sde_start
    grid = torch.linspace(start, t_end, config.steps).tolist()

    def drift(x_, t_):
        v = velocity(x_, t_)
        return v + transport.sde_diffusion(x_, t_, config.diffusion_form) * transport.score_from_velocity(v, x_, t_)

    for t0, t1 in zip(grid[:-1], grid[1:]):
        dt = t1 - t0
        t = at(t0)
        noise = generator_noise(x, generator)  # a CPU generator also serves a model on the GPU
        x = x + drift(x, t) * dt + torch.sqrt(2 * transport.sde_diffusion(x, t, config.diffusion_form) * dt) * noise
    return x + drift(x, at(t_end)) * config.last_step_size
