"""Checkpoints: a directory per step, written atomically, self-describing.

    RUN/checkpoints/step_000500/
        model.safetensors   raw weights, metadata {"dar_run_config": <json>, "step": "500"}
        ema.safetensors     EMA weights, same metadata (what `dar sample` loads by default)
        optimizer.pt        AdamW state (tensors and numbers only; loaded with weights_only=True)
        rng.safetensors     process RNG states
        state.json          step, data position, world size, package versions, resolved config

A checkpoint directory is assembled under a temporary name and renamed into place, so a crash
never leaves a half-written ``step_*`` directory and the latest complete step is simply the
largest one present.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from dar.config import RunConfig
from dar.models.sit import SiT, build_model
from dar.provenance import package_versions

STEP_DIR = re.compile(r"^step_(\d+)$")
FORMAT = "dar-v1"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, truncated or does not fit the model."""




def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: Path,
    step: int,
    config: RunConfig,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    extra_state: dict,
    keep: int = 0,
) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    metadata = {"format": FORMAT, "step": str(step), "dar_run_config": config.to_json()}
    save_file(_contiguous(model.state_dict()), tmp / "model.safetensors", metadata=metadata)
    save_file(_contiguous(ema.state_dict()), tmp / "ema.safetensors", metadata=metadata)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, tmp / "rng.safetensors")
    state = {"format": FORMAT, "step": step, "config": config.to_dict(), "versions": package_versions(), **extra_state}
    (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    for f in tmp.iterdir():
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():  # re-saving a step (e.g. after a resumed run reached it again): swap atomically
        old = root / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    if keep > 0:
        for stale in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(stale)
    return final


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A run dir (-> its latest checkpoint), a checkpoint dir, or a .safetensors weights file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_file():
        return path
    if (path / "state.json").exists() or (path / "ema.safetensors").exists():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{path} holds no checkpoint (expected {path}/checkpoints/step_*/)")
    return latest


def read_weights(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, with clear errors for missing/corrupt files."""
    if not file.is_file():
        raise CheckpointError(f"checkpoint file {file} is missing")
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return load_file(str(file)), metadata
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"checkpoint file {file} is corrupt or truncated: {error}") from None


def load_state_into(module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match the model: missing keys {missing[:4]}{'...' if len(missing) > 4 else ''}, "
            f"unexpected keys {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}"
        )
    for key, value in tensors.items():
        if value.shape != own[key].shape:
            raise CheckpointError(
                f"{source}: {key} has shape {tuple(value.shape)} in the checkpoint but {tuple(own[key].shape)} in the model"
            )
    module.load_state_dict(tensors)


def load_model(path: str | Path, which: str = "ema", device: str | torch.device = "cpu") -> tuple[SiT, RunConfig, int]:
    """Rebuild a model from a checkpoint alone: (model in eval mode, its run config, step)."""
    if which not in ("ema", "model"):
        raise ValueError(f"which={which!r} must be 'ema' or 'model'")
    path = resolve_checkpoint(path)
    file = path if path.is_file() else path / f"{which}.safetensors"
    tensors, metadata = read_weights(file)
    if "dar_run_config" not in metadata:
        raise CheckpointError(f"{file} has no dar_run_config metadata; is it a dar checkpoint?")
    config = RunConfig.from_dict(json.loads(metadata["dar_run_config"]))
    model = build_model(config.model)
    load_state_into(model, tensors, file)
    return model.to(device).eval(), config, int(metadata.get("step", -1))


def load_training_state(path: Path, model, ema, optimizer) -> dict:
    """Restore model, EMA, optimizer and RNG from a checkpoint directory; returns state.json."""
    state_file = path / "state.json"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{state_file} is missing or corrupt: {error}") from None
    for name, module in (("model", model), ("ema", ema)):
        tensors, _ = read_weights(path / f"{name}.safetensors")
        load_state_into(module, tensors, path / f"{name}.safetensors")
    try:
        optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(optimizer_state)
    except (OSError, RuntimeError, ValueError, KeyError) as error:
        raise CheckpointError(f"{path / 'optimizer.pt'} is missing, corrupt or does not fit: {error}") from None
    rng, _ = read_weights(path / "rng.safetensors")
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state
