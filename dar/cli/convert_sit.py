"""``dar convert-sit``: an official SiT/DiT state dict -> a self-describing dar weights file."""

from __future__ import annotations

from pathlib import Path

from dar.models.sit import ARCH_NAMES
from dar.training.config import PRESETS

TAKES_OVERRIDES = True


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "convert-sit", help="turn an official SiT/DiT checkpoint into a dar weights file",
        usage="dar convert-sit CHECKPOINT --arch ARCH --out FILE [options] [KEY=VALUE ...]",
        epilog="KEY=VALUE sets the rest of the config stored with the weights, e.g. data.path=latents/ "
               "or model.routing.mode=dar (a DAR model whose routing starts uniform)")
    p.add_argument("checkpoint", help="e.g. SiT-XL-2-256x256.pt (a raw state dict, learn_sigma rows are dropped)")
    p.add_argument("--arch", required=True, choices=ARCH_NAMES)
    p.add_argument("--out", required=True, help=".safetensors file to write")
    p.add_argument("--preset", default="imagenet256-xl-residual", choices=sorted(PRESETS),
                   help="config the converted weights carry (data, sampler)")
    p.set_defaults(func=run)


def run(args) -> int:
    """The official file is read with ``weights_only=True`` (never unpickled as code)."""
    import pickle

    import torch

    from dar.files import atomic_path
    from dar.models.sit import build_model, load_official_sit_state_dict
    from dar.training.checkpoint import save_weights
    from dar.training.config import resolve

    config = resolve(args.preset, [f"model.arch={args.arch}", "model.routing.mode=residual", *args.overrides])
    try:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message advises weights_only=False, i.e. running the file's code
        raise ValueError(f"cannot read {args.checkpoint}: it holds objects other than tensors and numbers, "
                         "and is refused (never unpickled as code)") from None
    except Exception as error:  # torch raises several types for unreadable files
        raise ValueError(f"cannot read {args.checkpoint} as a state dict of tensors ({type(error).__name__})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{args.checkpoint} holds a {type(state).__name__}, not a state dict")
    model = build_model(config.model)
    load_official_sit_state_dict(model, state)
    out = Path(args.out)
    with atomic_path(out) as tmp:
        save_weights(model, tmp, config, step=-1)
    print(f"wrote {out} ({config.model.arch}, {config.model.routing.describe}, from {args.checkpoint})")
    return 0
