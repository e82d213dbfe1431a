"""Distribution Matching Distillation (DMD2, Yin et al. 2024) in this project's time convention.

Time: t = 0 is noise, t = 1 is data, x_t = t x1 + (1 - t) x0 on the linear path; models predict the
velocity v, and x1_hat(x_t, t) = x_t + (1 - t) v (:func:`dar.diffusion.samplers.data_from_velocity`,
for any path of :mod:`dar.diffusion.transport`).

* The generator G is a velocity model applied at fixed times t_k = k / N (k = 0..N-1): from x_{t_k}
  it predicts data, x1_hat = x1_hat_G(x_{t_k}, t_k); a one-step generator maps noise z = x_0 to
  x1_hat_G(z, 0). :func:`generator_output` produces its training samples (backward simulation for N > 1).
* The distribution-matching gradient (:func:`dm_gradient`) of a generated x: noise it to a random t,
  then p_real = x - x1_hat_real(x_t), p_fake = x - x1_hat_fake(x_t) and
  grad = (p_real - p_fake) / mean|p_real| (per sample). The generator loss
  0.5 * mse(x, (x - grad).detach()) has d loss / dx = grad / x.numel(), so gradient descent moves x
  along -grad = x1_hat_real - x1_hat_fake: towards what the teacher calls data and away from what the
  fake score (a model of G's own distribution) calls data. The direction is a difference of data
  predictions, which are the same whatever the time convention: no sign changes with t -> 1 - t.
* The fake score learns G's distribution with the teacher's own objective, the velocity loss of
  :meth:`dar.diffusion.transport.Transport.loss`, on detached generator samples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dar.diffusion.samplers import (
    SamplerConfig,
    data_from_velocity,
    generator_times,
    guided_velocity,
)
from dar.diffusion.transport import Transport


def _per_sample(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(1, x.dim()))


def model_data(model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, transport: Transport,
               cfg_scale: float = 1.0) -> torch.Tensor:
    """x1_hat of a velocity model at (x, t), with classifier-free guidance of ``cfg_scale`` (the
    guided velocity's data prediction, i.e. guidance of x1_hat with the same scale)."""
    velocity = guided_velocity(model, y, SamplerConfig(cfg_scale=cfg_scale), model.num_classes)
    return data_from_velocity(transport, velocity(x, t), x, t)


def dm_gradient(x: torch.Tensor, x1_real: torch.Tensor, x1_fake: torch.Tensor) -> torch.Tensor:
    """DMD's normalised distribution-matching gradient at generated samples ``x`` (w.r.t. x, to be
    descended): (p_real - p_fake) / mean|p_real| with p = x - x1_hat, the mean per sample over all
    non-batch dims. Computed in fp32."""
    x, x1_real, x1_fake = x.detach().float(), x1_real.detach().float(), x1_fake.detach().float()
    p_real, p_fake = x - x1_real, x - x1_fake
    return (p_real - p_fake) / p_real.abs().mean(dim=_per_sample(x), keepdim=True)


def dm_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5 * mse(x, (x - grad).detach()): a scalar whose gradient w.r.t. x is grad / x.numel()."""
    return 0.5 * F.mse_loss(x.float(), (x.detach().float() - grad).detach())


def distribution_matching(x: torch.Tensor, y: torch.Tensor, teacher, fake, transport: Transport,
                          t: torch.Tensor, noise: torch.Tensor, cfg_scale: float
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(generator loss, DM gradient) of generated samples ``x`` (with grad) for labels ``y``: x noised
    to x_t = alpha_t x + sigma_t noise (no grad), the real score is the frozen teacher with guidance
    ``cfg_scale``, the fake score the trained model of G's distribution, unguided."""
    with torch.no_grad():
        x_t, _ = transport.interpolate(x.detach(), noise, t)
        x1_real = model_data(teacher, x_t, t, y, transport, cfg_scale)
        x1_fake = model_data(fake, x_t, t, y, transport)
        grad = dm_gradient(x, x1_real, x1_fake)
    return dm_loss(x, grad), grad


def fake_score_loss(fake, x: torch.Tensor, y: torch.Tensor, transport: Transport, noise: torch.Tensor,
                    t: torch.Tensor) -> torch.Tensor:
    """The fake score's loss: the teacher's velocity objective on generator samples ``x``, detached, so
    that no gradient reaches the generator."""
    return transport.loss(fake, x.detach(), y, noise, t).mean()


def generator_step(student, x: torch.Tensor, t: float, y: torch.Tensor, transport: Transport) -> torch.Tensor:
    """One application of the generator: x1_hat_G(x, t)."""
    tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
    return data_from_velocity(transport, student(x, tt, y), x, tt)


def generator_output(student, z: torch.Tensor, y: torch.Tensor, transport: Transport, steps: int, k: int,
                     rollout_noise: list[torch.Tensor], grad: bool) -> torch.Tensor:
    """The generator's sample of step ``k`` (0-based) of its ``steps``: its input x_{t_k} comes from a
    no-grad rollout of the generator's own steps 0..k-1 from pure noise ``z`` (DMD2's backward
    simulation; ``rollout_noise[j]`` re-noises step j's prediction to t_{j+1}), then step k is applied
    with gradients when ``grad``. One step (k = 0): x1_hat_G(z, 0)."""
    times = generator_times(steps)
    if not 0 <= k < steps or len(rollout_noise) < k:
        raise ValueError(f"step k={k} of a {steps}-step generator needs {k} rollout noises, got {len(rollout_noise)}")
    x = z
    with torch.no_grad():
        for j in range(k):
            x1_hat = generator_step(student, x, times[j], y, transport)
            tt = torch.full((x.shape[0],), times[j + 1], device=x.device, dtype=torch.float32)
            x, _ = transport.interpolate(x1_hat, rollout_noise[j].to(x.device), tt)
    with torch.set_grad_enabled(grad):
        return generator_step(student, x, times[k], y, transport)
