"""What a run shows while it trains: sample grids of the EMA model on fixed noise, and periodic
in-domain evaluation for metric-vs-iteration curves."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from dar.training.config import RunConfig
from dar.seeds import fixed_noise_generator
from dar.training.runtime import Distributed


class SampleGrid:
    """EMA samples on fixed noise and labels (8 per class, at most 10 classes), saved as labelled PNGs
    under RUN/samples/. A latent model's samples are decoded by the VAE of ``data.vae``, loaded once
    on the run's device; without ``data.vae`` a latent run gets no grids, and says so once."""

    def __init__(self, config: RunConfig, dataset, env: Distributed, run_dir: Path):
        m = config.model
        self.config, self.env, self.run_dir = config, env, run_dir
        classes = min(m.num_classes, 10)
        self.labels = torch.arange(classes).repeat_interleave(8)
        g = fixed_noise_generator(config.train.seed, "sample_grid")
        self.noise = torch.randn(len(self.labels), m.in_channels, m.input_size, m.input_size, generator=g)
        self.class_names = list(dataset.class_names)[:classes]
        self.vae = None
        self.enabled = True
        if m.is_latent:
            if config.data.vae is None:
                self.enabled = False
                print(f"[dar] no sample grids: the model makes {m.in_channels}-channel latents and data.vae (the VAE "
                      "that decodes them: a diffusers folder or hub id) is not set", flush=True)
            else:
                self.vae = load_grid_vae(config, env, dataset)

    def save(self, ema, step: int) -> Path | None:
        from dar.data import save_labelled_grid, to_uint8
        from dar.diffusion.samplers import sample

        if not self.enabled:
            return None
        x, _ = sample(ema, self.noise.to(self.env.device), self.labels.to(self.env.device), self.config.sampler)
        images = to_uint8(x).cpu() if self.vae is None else self.vae.decode(x, chunk=16)
        scale = 2 if images.shape[1] < 128 else 1  # decoded 256 px images at their own size
        return save_labelled_grid(images.numpy(), self.labels.tolist(), self.class_names,
                                  self.run_dir / "samples" / f"step_{step:07d}.png", scale=scale)


def load_grid_vae(config: RunConfig, env: Distributed, dataset):
    """The VAE of ``data.vae`` on the run's device, with the latents' scale factor (as the dataset's
    manifest records it). Problems are clear errors at the start of the run, not at its first grid
    hours later; a VAE other than the one that encoded the latents is allowed (DiT and SiT decode
    sd-vae-ft-ema latents with either SD-VAE) but named once."""
    from dar.data.vae import DEFAULT_SCALE_FACTOR, load_vae

    scale = float(getattr(dataset, "scale_factor", DEFAULT_SCALE_FACTOR))
    try:
        vae = load_vae(config.data.vae, env.device, scale_factor=scale)
    except ValueError as error:
        raise ValueError(f"data.vae={config.data.vae}: {error}; fix data.vae, or train without sample grids "
                         "(train.sample_every=0)") from None
    vae.check_decodes(config.model.in_channels, f"the model (model.in_channels={config.model.in_channels})")
    encoder = (getattr(dataset, "manifest", None) or {}).get("vae") or {}
    if vae.weights_sha256 and encoder.get("weights_sha256") not in (None, vae.weights_sha256):
        print(f"[dar] note: sample grids are decoded by data.vae={config.data.vae} (weights sha256 "
              f"{vae.weights_sha256[:12]}...), not by the VAE that encoded the training latents "
              f"({encoder.get('source')}, sha256 {str(encoder['weights_sha256'])[:12]}...)", flush=True)
    return vae


class PeriodicEval:
    """FD-FMNIST / precision / recall / class accuracy of EMA samples, for FID-vs-iteration curves.
    Uses the in-domain classifier shipped for the built-in dataset; fixed noise and balanced labels."""

    def __init__(self, config: RunConfig, env: Distributed):
        from dar.evaluate import InDomainEvaluator

        m = config.model
        self.config, self.env = config, env
        self.evaluator = InDomainEvaluator()
        n = config.train.eval_samples
        self.labels = torch.arange(n) % m.num_classes
        g = fixed_noise_generator(config.train.seed, "periodic_eval")
        self.noise = torch.randn(n, m.in_channels, m.input_size, m.input_size, generator=g)

    def __call__(self, ema) -> dict:
        from dar.data import to_uint8
        from dar.diffusion.samplers import sample

        started = time.perf_counter()
        images, nfe = [], 0
        for noise, labels in zip(self.noise.split(256), self.labels.split(256)):
            x, info = sample(ema, noise.to(self.env.device), labels.to(self.env.device), self.config.sampler)
            images.append(to_uint8(x.cpu()))
            nfe = info["nfe"]
        metrics = self.evaluator(np.concatenate([np.asarray(i) for i in images]), self.labels.numpy())
        return {**{f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))},
                "eval/num_samples": len(self.labels), "eval/nfe": nfe, "eval/sampler": self.config.sampler.method,
                "eval/seconds": time.perf_counter() - started}
