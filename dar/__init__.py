"""dar: Diffusion-Adaptive Routing for diffusion transformers (arXiv 2605.20708)."""

__version__ = "0.1.0"
