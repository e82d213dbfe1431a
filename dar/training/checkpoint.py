"""Checkpoints: a directory per step, written atomically, self-describing.

    RUN/checkpoints/step_000500/
        model.safetensors   raw weights, metadata {"dar_run_config": <json>, "step": "500"}
        ema.safetensors     EMA weights, same metadata (what `dar sample` loads by default)
        optimizer.pt        AdamW state (tensors and numbers only; loaded with weights_only=True)
        rng.safetensors     process RNG states
        state.json          step, data position and fingerprint, world size and parallelism, package
                            versions, config

The files are the same however the run was trained (one process, DDP or FSDP: full tensors, the
unsharded model's keys and AdamW's own state layout, see :mod:`dar.training.parallel`), so a run can
resume on another number of processes or another ``train.parallel``, and `dar sample` reads any.

A checkpoint directory is assembled under a temporary name and renamed into place, so a crash never
leaves a half-written ``step_*`` directory and the latest complete step is simply the largest one
present; the temporary directories a crash leaves are removed by :func:`remove_partial_checkpoints`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from dar.errors import CheckpointError
from dar.files import check_free_space, fsync_dir
from dar.models.sit import SiT, build_model
from dar.provenance import package_versions, weights_sha256
from dar.routing import upgrade_legacy_keys
from dar.training.config import RunConfig
from dar.training.parallel import load_full_state_dict, shard_optimizer_state_dict

STEP_DIR = re.compile(r"^step_(\d+)$")
PARTIAL_DIR = re.compile(r"^\.step_\d+\.(tmp|old)-\d+$")
FORMAT = "dar-v1"
WEIGHT_FILES = ("model.safetensors", "ema.safetensors")


def weights_metadata(config: RunConfig, step: int) -> dict[str, str]:
    return {"format": FORMAT, "step": str(step), "dar_run_config": config.to_json()}


def _state(source) -> dict:
    """A module's or optimizer's state dict, or ``source`` itself when it already is one (as the
    trainer passes them: gathered from all ranks under FSDP, see :mod:`dar.training.parallel`)."""
    return source if isinstance(source, dict) else source.state_dict()


def save_weights(module: torch.nn.Module | dict, path: Path, config: RunConfig, step: int) -> None:
    """One self-describing safetensors file: the weights (a module or its full state dict) plus the run
    config that rebuilds the model."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in _state(module).items()}
    save_file(tensors, str(path), metadata=weights_metadata(config, step))


def checkpoint_bytes(model: torch.nn.Module | dict, optimizer: torch.optim.Optimizer | dict) -> int:
    """About what one checkpoint takes on disk: model + EMA + the optimizer's state (modules or their
    full state dicts)."""
    weights = sum(t.numel() * t.element_size() for t in _state(model).values())
    moments = sum(t.numel() * t.element_size() for s in _state(optimizer)["state"].values() for t in s.values()
                  if torch.is_tensor(t))
    return 2 * weights + max(moments, 2 * weights)


def remove_partial_checkpoints(run_dir: Path) -> list[Path]:
    """Delete the temporary directories of checkpoint writes that a kill or a full disk interrupted
    (at SiT-XL/2 size each holds gigabytes). Call only while holding the run directory's lock."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    removed = [p for p in root.iterdir() if p.is_dir() and PARTIAL_DIR.match(p.name)]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def save_checkpoint(
    run_dir: Path,
    step: int,
    config: RunConfig,
    model: torch.nn.Module | dict,
    ema: torch.nn.Module | dict,
    optimizer: torch.optim.Optimizer | dict,
    extra_state: dict,
    keep: int = 0,
) -> Path:
    """Write checkpoint ``step`` of the run. ``model``, ``ema`` and ``optimizer`` are unsharded modules
    and optimizer, or their full state dicts (what the trainer passes; only one process writes)."""
    model, ema, optimizer = _state(model), _state(ema), _state(optimizer)

    def write(tmp: Path) -> dict:
        save_weights(model, tmp / "model.safetensors", config, step)
        save_weights(ema, tmp / "ema.safetensors", config, step)
        torch.save(optimizer, tmp / "optimizer.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(tmp / "rng.safetensors"))
        return {"config": config.to_dict(), **extra_state}

    return write_checkpoint_dir(run_dir, step, write, checkpoint_bytes(model, optimizer), keep)


def write_checkpoint_dir(run_dir: Path, step: int, write, size: int, keep: int = 0) -> Path:
    """``RUN/checkpoints/step_N/``, all or nothing: ``write(tmp)`` fills a temporary directory with the
    checkpoint's files and returns its state.json fields (format, step and versions are added); the files
    are synced and the directory renamed into place (a checkpoint of the same step is swapped atomically).
    A full disk (``size`` bytes are checked first) or any error leaves the previous checkpoints as they
    were. ``keep`` > 0 then prunes all but the newest ``keep``."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    check_free_space(root, size, f"the step {step} checkpoint")
    final = root / f"step_{step:07d}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        state = {"format": FORMAT, "step": step, "versions": package_versions(), **write(tmp)}
        (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
        for f in tmp.iterdir():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if error.errno == errno.ENOSPC:
            raise CheckpointError(f"the disk holding {root} filled up while writing the step {step} checkpoint "
                                  f"(about {size / 2**20:.0f} MB); nothing was "
                                  "replaced: free space and rerun to continue from the last checkpoint") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # re-saving a step (e.g. after a resumed run reached it again): swap atomically
        old = root / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(root)
    if keep > 0:
        for stale in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


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


def weights_file(path: str | Path, which: str = "ema") -> Path:
    """The safetensors file that :func:`load_model` reads for ``path`` (see :func:`resolve_checkpoint`)."""
    if which not in ("ema", "model"):
        raise ValueError(f"which={which!r} must be 'ema' or 'model'")
    path = resolve_checkpoint(path)
    return path if path.is_file() else path / f"{which}.safetensors"


def read_weights(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (with current key names) and metadata of a safetensors file; clear errors for missing,
    corrupt or foreign files."""
    if not file.is_file():
        raise CheckpointError(f"checkpoint file {file} is missing")
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return upgrade_legacy_keys(load_file(str(file))), metadata
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"checkpoint file {file} is corrupt or truncated: {error}") from None


def run_config_from_metadata(metadata: dict[str, str], file: Path) -> tuple[RunConfig, int]:
    """The run config and step stored in a weights file's metadata, each field checked by name."""
    if "dar_run_config" not in metadata:
        raise CheckpointError(f"{file} has no dar_run_config metadata; is it a dar checkpoint?")
    try:
        stored = json.loads(metadata["dar_run_config"])
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{file}: metadata field dar_run_config is not valid JSON ({error})") from None
    try:
        config = RunConfig.from_dict(stored)
    except ValueError as error:
        raise CheckpointError(f"{file}: metadata field dar_run_config is not a valid run config: {error}") from None
    step = metadata.get("step", "-1")
    try:
        return config, int(step)
    except ValueError:
        raise CheckpointError(f"{file}: metadata field step must be an integer, got {step!r}") from None


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
    load_full_state_dict(module, tensors)  # a sharded (FSDP) module keeps its own rank's chunks


def load_model(path: str | Path, which: str = "ema", device: str | torch.device = "cpu") -> tuple[SiT, RunConfig, int]:
    """Rebuild a model from a checkpoint alone: (model in eval mode, its run config, step)."""
    file = weights_file(path, which)
    tensors, metadata = read_weights(file)
    config, step = run_config_from_metadata(metadata, file)
    model = build_model(config.model, config.projector)
    load_state_into(model, tensors, file)
    return model.to(device).eval(), config, step


def read_state(path: Path) -> dict:
    """A checkpoint directory's state.json, with its step checked."""
    state_file = path / "state.json"
    if not state_file.is_file():
        raise CheckpointError(f"{state_file} is missing: {path} is not a complete checkpoint (delete it to resume "
                              "from the one before)")
    try:
        state = json.loads(state_file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{state_file} is corrupt: {error}") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or isinstance(state.get("step"), bool):
        raise CheckpointError(f"{state_file}: field step must be an integer, got {state.get('step') if isinstance(state, dict) else state!r}")
    if not isinstance(state.get("config"), dict):
        raise CheckpointError(f"{state_file}: field config is missing or not a table")
    return state


def load_pretrained(path: str | Path, model, ema, config: RunConfig) -> dict:
    """Start a new run from another model's weights (``train.init_from``): every weight of the network must
    be in the file with the model's shape; router (and REPA projector) weights the file has with the same
    shapes are loaded, the others keep their initialisation (a residual model converted to DAR: uniform
    routing), and such weights of the file that the model lacks are left out. EMA and model start equal.
    Returns what was loaded, for the run's record."""
    file = weights_file(path, "ema")
    tensors, _ = read_weights(file)
    target = build_model(config.model, config.projector).state_dict()  # the router's own init (deterministic)
    missing = sorted(k for k in target if k not in tensors and not k.startswith(OPTIONAL_PARTS))
    foreign = sorted(k for k in tensors if k not in target and not k.startswith(OPTIONAL_PARTS))
    if missing or foreign:
        raise CheckpointError(f"{file} does not fit {config.model.arch}: missing {missing[:4]}, unexpected {foreign[:4]}")
    for key in target:
        if key in tensors and tensors[key].shape != target[key].shape and not key.startswith(OPTIONAL_PARTS):
            raise CheckpointError(f"{file}: {key} has shape {tuple(tensors[key].shape)} there but "
                                  f"{tuple(target[key].shape)} in the model")
    optional = {k for k in target if k.startswith(OPTIONAL_PARTS) and k in tensors and tensors[k].shape == target[k].shape}
    merged = {k: tensors[k] if (k in tensors and not k.startswith(OPTIONAL_PARTS)) or k in optional else v
              for k, v in target.items()}
    load_state_into(model, merged, file)
    load_state_into(ema, merged, file)
    record = {"file": str(file), "weights_sha256": weights_sha256(file)}
    for part in OPTIONAL_PARTS:
        name, keys = part.rstrip("."), [k for k in target if k.startswith(part)]
        if keys or part == "router.":
            record[f"{name}_weights_loaded"] = sum(k in optional for k in keys)
            record[f"{name}_weights_initialised"] = sum(k not in optional for k in keys)
    return record


@contextlib.contextmanager
def optimizer_state_errors(file: Path):
    """Reading and applying an ``optimizer.pt`` (always ``weights_only``): any failure becomes one
    CheckpointError naming the file."""
    try:
        yield
    except pickle.UnpicklingError:
        # torch's message suggests weights_only=False, i.e. running code from the file: never
        raise CheckpointError(f"{file} holds objects other than tensors and numbers; refusing to "
                              "unpickle it (it was not written by dar, or was tampered with)") from None
    except (OSError, RuntimeError, ValueError, KeyError, EOFError, TypeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{file} is missing, corrupt or does not fit: {reason}") from None


def clear_earlier_records(run_dir: Path, records: tuple[str, ...], overwrite: bool, remove: bool = True) -> None:
    """A new run in ``run_dir`` (no checkpoint): records of an earlier run there (logs, configs, grids) are
    refused unless ``overwrite``, then removed (by the one process that writes, ``remove``)."""
    leftovers = [name for name in records if (run_dir / name).exists()]
    if leftovers and not overwrite:
        raise ValueError(f"{run_dir} holds {', '.join(leftovers)} of an earlier run but no checkpoint to "
                         "continue from; use another --run-dir, or --overwrite to replace them")
    if remove:
        for name in leftovers:
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()


# Parts a model may have or lack beside the network itself: its router and REPA's projector.
OPTIONAL_PARTS = ("router.", "projector.")


def load_training_state(path: Path, model, ema, optimizer) -> dict:
    """Restore model, EMA, optimizer and RNG from a checkpoint directory; returns state.json. The
    modules and optimizer may be sharded (FSDP): every process reads the full files and keeps its part."""
    state = read_state(path)
    for name, module in (("model", model), ("ema", ema)):
        tensors, _ = read_weights(path / f"{name}.safetensors")
        load_state_into(module, tensors, path / f"{name}.safetensors")
    optimizer_file = path / "optimizer.pt"
    with optimizer_state_errors(optimizer_file):
        optimizer_state = torch.load(optimizer_file, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(shard_optimizer_state_dict(optimizer, optimizer_state))
    rng, _ = read_weights(path / "rng.safetensors")
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state
