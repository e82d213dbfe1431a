"""What every recorded number carries with it: package versions and file hashes."""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path


def package_versions() -> dict[str, str]:
    """Versions of everything that can change a number."""
    import numpy
    import safetensors
    import scipy
    import torch

    import dar

    return {
        "python": platform.python_version(),
        "dar": dar.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "safetensors": safetensors.__version__,
    }


def file_sha256(path: str | Path) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB blocks (weight and sample files can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tensors_digest(named_arrays) -> str:
    digest = hashlib.sha256()
    for name, array in named_arrays:
        digest.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def weights_sha256(path: str | Path) -> str:
    """SHA-256 of a safetensors file's tensors (names, dtypes, shapes, bytes, in name order), not of the
    file: its header's metadata order may differ between two writes of the same weights."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        return _tensors_digest((name, handle.get_tensor(name)) for name in sorted(handle.keys()))


def state_dict_sha256(state: dict) -> str:
    """:func:`weights_sha256`'s recipe for tensors in memory (bf16, which numpy lacks, as fp32)."""
    import torch

    def array(tensor):
        tensor = tensor.detach().cpu()
        return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()

    return _tensors_digest((name, array(state[name])) for name in sorted(state))
