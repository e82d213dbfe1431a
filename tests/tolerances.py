"""Comparisons whose tolerance scales with the values compared: float reduction order differs between
CPUs (Intel, AMD) and thread counts, so an absolute bound on values of size ~20 fails on one machine and
passes on another. Every bound here is relative to the larger of the element and the tensor's scale."""

import numpy as np
import torch


def assert_close_scaled(actual, expected, rtol: float) -> None:
    """``|actual - expected| <= rtol * (|expected| + max|expected|)`` elementwise (torch or numpy)."""
    if isinstance(expected, np.ndarray):
        scale = float(np.nanmax(np.abs(expected))) if np.isfinite(expected).any() else 0.0
        np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)
        return
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)
