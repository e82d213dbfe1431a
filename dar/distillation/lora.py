"""LoRA adapters for the models of ``dar distill`` (``distill.lora_rank``, ``distill.fake_lora_rank``).

What is adapted: every linear layer of SiT's blocks (attention ``qkv`` and ``proj``, MLP ``fc1`` and
``fc2``, and the block's adaLN modulation linear) gets a low-rank update W + (alpha / r) B A, with B = 0
at the start, so an adapted model computes exactly its base model until it is trained. The adaLN
modulation is adapted because it is how time and label enter a block: a generator that is applied at a
few fixed times, with guidance built in, has to change exactly that conditioning (DMD2's SDXL LoRA
likewise adapts the time-embedding projections beside attention and feed-forward); it also holds a
third of a block's weights (6 D^2 of 18 D^2), too much to leave frozen.

What is frozen: the base weight and bias of every adapted linear (the teacher's, reloaded from the
teacher file on resume). Everything else keeps the trainability it had and is trained in full: the
embeddings, the final layer and, above all, a DAR student's router, which a student converted from a
residual teacher has fresh from its initialisation, with no pretrained weights to adapt. Those parts
are about 1 % of an SiT-XL/2, so training them in full costs little and keeps the rule simple; SiT's
fixed sin-cos position table stays fixed.

What is saved: :func:`merged_state_dict` is the plain SiT state dict (the weights with the adapters
folded in), which any tool that builds a SiT loads; :func:`trainable_state_dict` is what training
changed (adapters and fully trained parameters), for resume.

``peft`` is imported only here and only when LoRA is requested: the rest of ``dar`` never needs it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dar.errors import CheckpointError

ADAPTER = "default"  # peft's adapter name; a model here carries one adapter
# the linear layers of SiT's blocks (peft matches the whole module name against it); routers and REPA's
# projector live outside ``blocks.`` and are never matched
TARGET_MODULES = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2)|adaLN_modulation\.1)"


def _peft():
    try:
        import peft
    except ImportError:
        raise ValueError("LoRA (distill.lora_rank, distill.fake_lora_rank) needs the peft package: pip install peft "
                         "(in a checkout: pip install -e '.[lora]')") from None
    return peft


def add_lora(model: torch.nn.Module, rank: int, alpha: float) -> torch.nn.Module:
    """Inject rank-``rank`` LoRA adapters with scaling ``alpha / rank`` into the linear layers of
    ``model``'s blocks (in place; returns ``model``). Freezes the adapted layers' base weights and
    biases; every other parameter keeps its ``requires_grad``. The adapters draw their A matrices
    from the global RNG (peft's default init) and start with B = 0: the model's function is unchanged."""
    peft = _peft()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGET_MODULES)
    model = peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    # peft freezes every parameter but the adapters; give back the others' trainability, except the
    # adapted layers' own weights (their names have moved under ``base_layer.``)
    for name, p in model.named_parameters():
        if not _is_adapter(name) and ".base_layer." not in name:
            p.requires_grad_(name in trainable)
    return model


def _is_adapter(name: str) -> bool:
    return any(part.startswith("lora_") for part in name.split("."))


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the plain model (keys as without adapters) with each adapted weight replaced
    by W + scaling * B A. The model is not modified; tensors of unadapted parameters are the model's
    own (detached, sharing storage): read them, do not write them."""
    from peft.tuners.lora import LoraLayer  # add_lora has checked that peft is there

    with torch.no_grad():
        deltas = {f"{name}.weight": module.get_delta_weight(ADAPTER)
                  for name, module in model.named_modules() if isinstance(module, LoraLayer)}
        merged = {}
        for key, value in model.state_dict().items():
            if _is_adapter(key):
                continue
            key = key.replace(".base_layer.", ".")
            merged[key] = value + deltas[key] if key in deltas else value
    return merged


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What training changes: the adapters and the parameters trained in full, by their names in the
    adapted model."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Load a :func:`trainable_state_dict` into an adapted model; the names and shapes must match."""
    own = dict(model.named_parameters())
    expected = set(trainable_state_dict(model))
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{source} does not fit the adapted model (another distill.lora_rank or student?): "
                              f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    for key, value in tensors.items():
        if value.shape != own[key].shape:
            raise CheckpointError(f"{source}: {key} has shape {tuple(value.shape)} there but "
                                  f"{tuple(own[key].shape)} in the model (another distill.lora_rank?)")
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value)
