"""Sharded data parallelism (``train.parallel=fsdp``, FSDP2) and the full state dicts a checkpoint holds.

FSDP2 comes from ``torch.distributed.fsdp`` (public there from torch 2.6) or, on torch 2.4 and 2.5,
from ``torch.distributed._composable.fsdp``; :func:`fsdp_api` picks whichever this torch has. Every
parameter is sharded on its first dimension over a 1-D device mesh of all processes (a ``DTensor``
with placement ``Shard(0)``: rank r holds chunk r of ``torch.chunk(p, world)``, possibly empty).

Sharding units (:func:`shard_model`). A SiT block is run as two sublayers, ``attn_update`` and
``mlp_update``, and its adaLN modulation is called from the model's forward, outside both. So each
block's three parameterised parts are their own units, each called through its ``forward``:
``block.adaLN_modulation``, ``block.attn`` and ``block.mlp``. Each unit's parameters are gathered
once in forward and once in backward. One unit per block would be gathered twice each way (once per
sublayer call), and the modulation would be sharded when the model reads it.
``register_fsdp_forward_method`` (``attn_update``, ``mlp_update``) is needed only if a block gets
parameters of its own outside these three; then the block becomes a unit too (:func:`shard_model`
does that). Everything else (embeddings, final layer and every router parameter, read by attribute
and stacked into query tables) is in the root unit, gathered for the whole forward, so residual,
static, static_t and dynamic routing run unchanged.

Mixed precision. With ``train.precision=bf16`` the block units gather bf16 parameters and reduce
gradients in fp32 (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``). This halves their
communication and changes no number: autocast, which the trainer keeps on as in a replicated run,
would cast the same fp32 weights to the same bf16 values for the same matmuls. The root unit stays
fp32. Its parameters feed fp32 state under autocast: the position table, the label embedding, the
router's queries, and through them the residual or routing stream. In bf16 they would be rounded.
The root is about 1% of SiT-XL/2's parameters (11% with dynamic or per-layer static_t queries).
Sharded parameters, gradients and AdamW state are fp32 throughout. ``cast_forward_inputs=False``
leaves inputs to autocast: the timesteps t are not rounded to bf16.

EMA (:func:`shard_like`). The EMA is sharded exactly like the model: a deep copy of the unsharded
model, sharded over the same mesh. Each rank lerps its own shard towards its shard of the model, with
the same ``_foreach_lerp_`` as a replicated run. That needs no communication per step and holds 1/N of
the EMA per GPU; a full EMA replica would need the full model parameters (an fp32 all-gather) after
every step. The full EMA is gathered only when it is needed: for checkpoints and for the sample grids
and periodic evaluation on rank 0.

State dicts. A checkpoint holds full tensors whatever the parallelism, in the formats of a single
process: ``module.state_dict()`` keys, and AdamW's own ``state_dict()`` layout (parameters numbered
by position). Saving: :func:`full_state_dict` / :func:`full_optimizer_state_dict` gather every
DTensor (all ranks call them in the same order; rank 0 keeps CPU copies, the other ranks get ``{}``).
Loading: every rank reads the full files and keeps its own chunk (:func:`load_full_state_dict`,
:func:`shard_optimizer_state_dict`), with no communication. This works without
``torch.distributed.checkpoint.state_dict``: its full optimizer state is keyed by parameter name, not
AdamW's position, and loading it starts the optimizer state with a zero-gradient ``step()``.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn

FSDP_UNITS = ("adaLN_modulation", "attn", "mlp")  # the parameterised parts of a SiTBlock
BLOCK_FORWARD_METHODS = ("attn_update", "mlp_update")  # how SiT calls a block (never .forward)


def fsdp_api():
    """``(fully_shard, MixedPrecisionPolicy, register_fsdp_forward_method)`` of this torch."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    except ImportError:  # torch 2.4, 2.5
        try:
            from torch.distributed._composable.fsdp import (
                MixedPrecisionPolicy,
                fully_shard,
                register_fsdp_forward_method,
            )
        except ImportError as error:
            raise RuntimeError(f"train.parallel=fsdp needs FSDP2 (fully_shard), which torch {torch.__version__} "
                               f"does not provide ({error}); use torch>=2.4 or train.parallel=ddp") from None
    return fully_shard, MixedPrecisionPolicy, register_fsdp_forward_method


def _dtensor_class():
    if not dist.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import DTensor
    return DTensor


def is_sharded(tensor) -> bool:
    """Whether ``tensor`` is a DTensor (an FSDP-sharded parameter, gradient or optimizer state)."""
    cls = _dtensor_class()
    return cls is not None and isinstance(tensor, cls)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor`` (the tensor itself when it is not sharded); shares its storage."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def is_sharded_module(module: nn.Module) -> bool:
    return any(is_sharded(p) for p in module.parameters())


def device_mesh(device: torch.device, world_size: int):
    """The 1-D mesh of all processes, on ``device``'s type (explicit: on a GPU machine, a mesh left to
    default would be a CUDA one even when the process group is gloo)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world_size,))


def mixed_precision_policy(precision: str):
    _, MixedPrecisionPolicy, _ = fsdp_api()
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                    cast_forward_inputs=False)
    return MixedPrecisionPolicy()


def shard_model(model: nn.Module, mesh, precision: str = "fp32") -> nn.Module:
    """Shard a SiT in place with FSDP2: per block ``adaLN_modulation``, ``attn`` and ``mlp`` (and the
    block itself, with its sublayer methods registered, should it own parameters outside them),
    in ``precision``; then the root (embeddings, final layer, router), in fp32. Returns ``model``."""
    fully_shard, _, register_forward_method = fsdp_api()
    policy = mixed_precision_policy(precision)
    # Attention and Mlp return views (a Linear over [B, T, D]); FSDP warns that an in-place op on such
    # an output would skip its backward hook. SiT only ever uses them out of place (gate * output).
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \((FSDP)?(Attention|Mlp)\) returned a view")
    for block in model.blocks:
        for name in FSDP_UNITS:
            fully_shard(getattr(block, name), mesh=mesh, mp_policy=policy)
        unit_params = {id(p) for name in FSDP_UNITS for p in getattr(block, name).parameters()}
        if any(id(p) not in unit_params for p in block.parameters()):
            fully_shard(block, mesh=mesh, mp_policy=policy)
            for method in BLOCK_FORWARD_METHODS:
                register_forward_method(block, method)
    fully_shard(model, mesh=mesh, mp_policy=mixed_precision_policy("fp32"))
    return model


def shard_like(copy: nn.Module, model: nn.Module, mesh) -> nn.Module:
    """Shard ``copy`` (an unsharded deep copy of ``model``, e.g. its EMA) into the same per-parameter
    chunks as ``model``. One unit: it only has to hold shards, never runs a sharded forward."""
    fully_shard, _, _ = fsdp_api()
    fully_shard(copy, mesh=mesh)
    for (name, a), (_, b) in zip(copy.named_parameters(), model.named_parameters()):
        if local_tensor(a).shape != local_tensor(b).shape:
            raise RuntimeError(f"{name}: EMA shard {tuple(local_tensor(a).shape)} != model shard "
                               f"{tuple(local_tensor(b).shape)}")
    return copy


# -- full state dicts ----------------------------------------------------------------------------------

def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@torch.no_grad()
def _gathered(value, keep: bool):
    """The full CPU tensor of ``value`` when ``keep`` (every rank must call this for a DTensor)."""
    if is_sharded(value):
        value = value.full_tensor()
    if keep and torch.is_tensor(value):
        return value.detach().cpu()
    return value if keep else None


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with full CPU tensors. For a sharded module every rank must call it (it
    gathers); rank 0 gets the tensors, the others ``{}``. An unsharded module: the tensors, on any rank."""
    state = module.state_dict()
    keep = _is_main() or not any(is_sharded(v) for v in state.values())
    out = {}
    for key, value in state.items():
        full = _gathered(value, keep)
        if keep:
            out[key] = full
    return out


def full_optimizer_state_dict(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with full CPU tensors: for AdamW over a sharded model the same dict
    AdamW over the unsharded model gives. Collective when the state is sharded (rank 0 gets it)."""
    state = optimizer.state_dict()
    sharded = any(is_sharded(v) for s in state["state"].values() for v in s.values())
    keep = _is_main() or not sharded
    out: dict = {}
    for index in sorted(state["state"]):  # the same order on every rank
        entry = {k: _gathered(v, keep) for k, v in state["state"][index].items()}
        if keep:
            out[index] = entry
    return {"state": out, "param_groups": state["param_groups"]} if keep else {}


def _local_chunk(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's chunk of ``full`` in the layout of the DTensor ``like`` (1-D mesh, ``Shard(d)``)."""
    (placement,) = like.placements
    if not placement.is_shard():
        return full
    mesh = like.device_mesh
    rank, world = dist.get_rank(mesh.get_group()), mesh.size()
    chunks = torch.chunk(full, world, dim=placement.dim)
    if rank < len(chunks):
        chunk = chunks[rank]
    else:
        shape = list(full.shape)
        shape[placement.dim] = 0
        chunk = full.new_empty(shape)
    expected = like.to_local().shape
    if chunk.shape != expected:
        raise RuntimeError(f"cannot shard a {tuple(full.shape)} tensor into this rank's {tuple(expected)} "
                           "part (unexpected FSDP layout)")
    return chunk


@torch.no_grad()
def load_full_state_dict(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load full tensors (keys and shapes already checked) into ``module``, sharded or not; a sharded
    module takes each rank's chunk, with no communication."""
    own = module.state_dict()
    if not any(is_sharded(v) for v in own.values()):
        module.load_state_dict(tensors)
        return
    for key, target in own.items():
        value = tensors[key]
        if is_sharded(target):
            target.to_local().copy_(_local_chunk(value, target))
        else:
            target.copy_(value)


def shard_optimizer_state_dict(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """A full (single-process layout) optimizer state dict made loadable into ``optimizer``: every state
    tensor of a sharded parameter becomes a DTensor holding this rank's chunk. Unchanged when nothing
    is sharded. Raises ValueError when the state does not fit the parameters."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not any(is_sharded(p) for p in params):
        return state
    if not isinstance(state, dict) or not isinstance(state.get("state"), dict) or "param_groups" not in state:
        raise ValueError("not an optimizer state dict")
    sharded_state = {}
    for index, entry in state["state"].items():
        if not isinstance(index, int) or not 0 <= index < len(params):
            raise ValueError(f"state for parameter {index!r}, but the optimizer has {len(params)} parameters")
        param = params[index]
        sharded_state[index] = {}
        for key, value in entry.items():
            if is_sharded(param) and torch.is_tensor(value) and value.dim() > 0:
                if value.shape != param.shape:
                    raise ValueError(f"state {key} of parameter {index} has shape {tuple(value.shape)}, the "
                                     f"parameter {tuple(param.shape)}")
                shard = torch.empty_like(param.detach(), dtype=value.dtype)
                shard.to_local().copy_(_local_chunk(value, shard))
                value = shard
            sharded_state[index][key] = value
    return {"state": sharded_state, "param_groups": state["param_groups"]}


@torch.no_grad()
def gather_into(module: nn.Module, target: nn.Module | None) -> nn.Module | None:
    """Copy the full values of the sharded ``module`` into the unsharded ``target`` on rank 0 and return
    it (every rank must call this; the others get None). An unsharded ``module`` is returned as it is."""
    if not is_sharded_module(module):
        return module
    tensors = full_state_dict(module)
    if not _is_main():
        return None
    target.load_state_dict(tensors)
    return target
