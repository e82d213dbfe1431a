"""The diffusion process: the interpolant and its training loss (:mod:`dar.diffusion.transport`) and
the samplers that integrate a velocity model from noise to data (:mod:`dar.diffusion.samplers`)."""

from dar.diffusion.samplers import SAMPLERS, SamplerConfig, sample
from dar.diffusion.transport import Transport

__all__ = ["SAMPLERS", "SamplerConfig", "Transport", "sample"]
