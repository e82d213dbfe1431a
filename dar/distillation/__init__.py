"""Distribution Matching Distillation (DMD2) of a `dar train` teacher into a one- or few-step generator
with a residual or a DAR student: ``dar distill`` (docs/DISTILLATION.md).

:mod:`~dar.distillation.config` (the typed config), :mod:`~dar.distillation.dmd` (the losses, in this
project's time convention), :mod:`~dar.distillation.gan` (DMD2's optional GAN term),
:mod:`~dar.distillation.lora` (optional adapters) and :mod:`~dar.distillation.trainer` (the loop,
checkpoints, resume). The
generator's sampler is ``sampler.method=generator`` of :mod:`dar.diffusion.samplers`."""

from dar.distillation.config import DistillConfig, DistillRunConfig, StudentConfig, resolve_distill
from dar.distillation.trainer import distill

__all__ = ["DistillConfig", "DistillRunConfig", "StudentConfig", "distill", "resolve_distill"]
