"""What a run shows while it trains: sample grids of the EMA model on fixed noise, and periodic
in-domain evaluation for metric-vs-iteration curves."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from dar.training.config import RunConfig
from dar.training.runtime import Distributed, fixed_noise_generator


class SampleGrid:
    """EMA samples on fixed noise and labels (8 per class, at most 10 classes), saved as labelled PNGs
    under RUN/samples/. Latent models need a VAE decoder to show pixels, so they get no grid."""

    def __init__(self, config: RunConfig, dataset, env: Distributed, run_dir: Path):
        m = config.model
        self.config, self.env, self.run_dir = config, env, run_dir
        classes = min(m.num_classes, 10)
        self.labels = torch.arange(classes).repeat_interleave(8)
        g = fixed_noise_generator(config.train.seed, "sample_grid")
        self.noise = torch.randn(len(self.labels), m.in_channels, m.input_size, m.input_size, generator=g)
        self.class_names = list(dataset.class_names)[:classes]
        self.enabled = m.in_channels in (1, 3)

    def save(self, ema, step: int) -> Path | None:
        from dar.data import save_labelled_grid, to_uint8
        from dar.diffusion.samplers import sample

        if not self.enabled:
            return None
        x, _ = sample(ema, self.noise.to(self.env.device), self.labels.to(self.env.device), self.config.sampler)
        return save_labelled_grid(to_uint8(x.cpu()), self.labels.tolist(), self.class_names,
                                  self.run_dir / "samples" / f"step_{step:07d}.png")


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
