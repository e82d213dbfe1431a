"""DMD2's GAN term (Yin et al., 2024, §4.3) in this project's terms: a discriminator on the fake score.

D is the fake score's network up to block k plus a small head: the fake score reads a noised image
x_t (class-conditional, as always), the head reads the routed input of block k (the state REPA's
projector reads; for the residual stream, the hidden state after k blocks) and returns one logit per
sample. DMD2 puts its head on the UNet's bottleneck, the middle of the network: k defaults to half the
depth. Images are noised on the fake score's own transport path at t ~ U[t_min, t_max] (t = 0 noise,
t = 1 data), as the DM gradient's, so D judges the noise levels the fake score is trained on.

* The fake score's side (every step, trained by its optimizer, head included):
  softplus(D(fake)) + softplus(-D(real)), the non-saturating GAN loss of a logit, on detached
  generator samples and on real images of the teacher's training data (:class:`RealData`).
* The generator's side (on generator steps): softplus(-D(G(z))), whose gradient reaches G only: the
  fake score and the head are frozen while it is computed (:func:`frozen`), so nothing of it reaches
  the fake score's optimizer step.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from dar.diffusion.transport import Transport
from dar.training.config import RunConfig
from dar.training.runtime import load_batch

GAN_KEYS = "distill.gan_generator_weight / distill.gan_fake_weight"


class DiscriminatorHead(nn.Module):
    """Tokens [B, T, D] -> one logit per sample: an MLP per token, then the mean over tokens. Judging each
    token before pooling keeps D local (a patch discriminator, as DMD2's convolutional head on a feature
    map); pooling first would average the tokens' features into one vector dominated by what all tokens
    share (the time and label conditioning), before D has looked at any of them."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(tokens).squeeze(-1).mean(dim=1)  # [B]


def discriminator_logits(fake_score, head: DiscriminatorHead, block: int, x: torch.Tensor, y: torch.Tensor,
                         transport: Transport, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """D's logits [B] of images ``x`` with labels ``y``: x noised to x_t at ``t`` with ``noise``, the fake
    score's routed input of block ``block`` at (x_t, t, y), the head. Gradients reach x (when it has
    them), the head and the fake score's parameters before block ``block``."""
    x_t, _ = transport.interpolate(x, noise, t)
    _, features = fake_score(x_t, t, y, features_at=block)
    return head(features)


def discriminator_loss(fake_logits: torch.Tensor, real_logits: torch.Tensor) -> torch.Tensor:
    """The fake score's GAN loss: mean softplus(D(fake)) + mean softplus(-D(real)), i.e. the binary
    cross-entropy of D calling generated images fake and real images real."""
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The generator's (non-saturating) GAN loss: mean softplus(-D(G(z)))."""
    return F.softplus(-fake_logits).mean()


@contextlib.contextmanager
def frozen(*modules: nn.Module):
    """No parameter of ``modules`` requires grad inside (gradients still flow through them to their
    inputs); each parameter's own flag is restored after (a LoRA model's frozen base stays frozen)."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


class RealData:
    """Real images for D: the teacher's training data (its RunConfig.data, built as `dar train` builds
    it), drawn by index with replacement from the caller's generator, so a resumed run draws the same
    batch at the same step without any data-position state."""

    def __init__(self, config: RunConfig):
        from dar.data import make_dataset

        data = config.data
        try:
            self.dataset = make_dataset(data.name, data.path, "train", data.image_size, bad_images=data.bad_images)
        except Exception as error:  # whatever stops it (missing files, a download without network): one clear error
            raise ValueError(f"{GAN_KEYS} need the teacher's training data as real images, but data.name={data.name} "
                             f"data.path={data.path} could not be loaded: {error}") from error
        if len(self.dataset) == 0:
            raise ValueError(f"{GAN_KEYS} need real images, but the teacher's training data ({data.name}, "
                             f"{data.path}) is empty")
        self.hflip = data.hflip

    def draw(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [B, C, H, W], y [B]): ``batch`` examples with replacement, flipped as the teacher saw them
        (data.hflip); a latent dataset draws its posterior samples last, from the same generator."""
        indices = torch.randint(len(self.dataset), (batch,), generator=generator)
        flip = torch.rand(batch, generator=generator) < 0.5 if self.hflip else None
        x, y = load_batch(self.dataset, indices, generator)
        if flip is not None:
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x, y
