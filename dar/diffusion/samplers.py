"""Samplers for velocity models: fixed-step Euler/Heun, adaptive dopri5, and SiT's Euler-Maruyama SDE.

Every sampler integrates t: 0 (noise) -> 1 (data) and reports the true number of velocity
evaluations (NFE). Classifier-free guidance lives in one place, :func:`guided_velocity`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch

from dar.diffusion.transport import Transport

SAMPLERS = ("euler", "heun", "dopri5", "sde")
DIFFUSION_FORMS = ("sigma", "SBDM")
CFG_CHANNELS = ("all", "legacy3")


@dataclass(frozen=True)
class SamplerConfig:
    """method: euler | heun | dopri5 | sde. steps: integration steps (fixed-step ODE and SDE; for
    dopri5 only the tolerances matter and the real NFE is reported). cfg_scale: 1 = no guidance.
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
    else:
        x = _sde_euler_maruyama(x, velocity, transport, config, generator, at)
    return x, {"nfe": velocity.calls, **config.to_dict()}


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
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x + drift(x, t) * dt + torch.sqrt(2 * transport.sde_diffusion(x, t, config.diffusion_form) * dt) * noise
    return x + drift(x, at(t_end)) * config.last_step_size
