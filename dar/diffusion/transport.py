"""Interpolant paths and the training objective (SiT's transport, reduced to what velocity models need).

Convention (SiT): t = 0 is noise, t = 1 is data, x_t = alpha_t x1 + sigma_t x0 with x1 = data and
x0 ~ N(0, I). The model predicts the velocity u_t = d_alpha_t x1 + d_sigma_t x0. REPA uses the reverse
convention: convert with t -> 1 - t and v -> -v.

A path only supplies alpha_t, sigma_t and their derivatives; everything else (targets, the score
and the SDE coefficients the samplers need) is derived here once, so adding a path touches nothing
in the samplers.
"""

from __future__ import annotations

import math

import torch


def _expand(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1)))


class Path:
    name = "path"

    def alpha(self, t):  # -> (alpha_t, d alpha_t / dt)
        raise NotImplementedError

    def sigma(self, t):  # -> (sigma_t, d sigma_t / dt)
        raise NotImplementedError


class LinearPath(Path):
    """x_t = t x1 + (1 - t) x0 (SiT's default "Linear" interpolant, rectified flow)."""

    name = "linear"

    def alpha(self, t):
        return t, torch.ones_like(t)

    def sigma(self, t):
        return 1 - t, -torch.ones_like(t)


class GVPPath(Path):
    """x_t = sin(pi t / 2) x1 + cos(pi t / 2) x0 (SiT's "GVP", variance preserving)."""

    name = "gvp"

    def alpha(self, t):
        return torch.sin(t * math.pi / 2), math.pi / 2 * torch.cos(t * math.pi / 2)

    def sigma(self, t):
        return torch.cos(t * math.pi / 2), -math.pi / 2 * torch.sin(t * math.pi / 2)


PATHS = {"linear": LinearPath, "gvp": GVPPath}


class Transport:
    """Velocity-prediction transport over a path: training pairs, loss, and score/SDE terms."""

    def __init__(self, path: str = "linear"):
        if path not in PATHS:
            raise ValueError(f"transport.path={path!r} is not one of {', '.join(PATHS)}")
        self.path = PATHS[path]()

    def interpolate(self, x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor):
        """-> (x_t, u_t): the noisy input and the velocity target."""
        (a, da), (s, ds) = self.path.alpha(_expand(t, x1)), self.path.sigma(_expand(t, x1))
        return a * x1 + s * x0, da * x1 + ds * x0

    def loss(self, model, x1: torch.Tensor, y: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-sample velocity MSE, mean over all non-batch dims. Noise and t come from the caller so
        the trainer controls every random number."""
        xt, ut = self.interpolate(x1, x0, t)
        return self.velocity_loss(model(xt, t, y), ut)

    @staticmethod
    def velocity_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample MSE (fp32) between a predicted and the true velocity, mean over non-batch dims."""
        return (prediction.float() - target.float()).pow(2).mean(dim=tuple(range(1, target.dim())))

    def score_from_velocity(self, v: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """grad log p_t(x) from the velocity: with E[x0|x_t] = (alpha v - da x)/(alpha ds - da sigma)."""
        (a, da), (s, ds) = self.path.alpha(_expand(t, x)), self.path.sigma(_expand(t, x))
        x0_hat = (a * v - da * x) / (a * ds - da * s)
        return -x0_hat / s

    def sde_diffusion(self, x: torch.Tensor, t: torch.Tensor, form: str = "sigma") -> torch.Tensor:
        """w(t) of the reverse SDE dx = [v + w(t) score] dt + sqrt(2 w(t)) dW, in SiT's forms: ``sigma``
        (w = sigma_t; 1 - t on the linear path) or ``SBDM`` (w = sigma_t^2 da/alpha - sigma_t dsigma;
        (1 - t) / t on the linear path)."""
        (a, da), (s, ds) = self.path.alpha(_expand(t, x)), self.path.sigma(_expand(t, x))
        if form == "sigma":
            return s
        if form == "SBDM":
            return da / a * s**2 - s * ds
        raise ValueError(f"unknown SDE diffusion form {form!r}; expected sigma or SBDM")
