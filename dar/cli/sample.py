"""``dar sample``: a labelled grid PNG and/or an ADM-format ``.npz`` (sharded, resumable, torchrun-aware).
Latent models' samples are decoded to images by a VAE (``--vae``, default the checkpoint's data.vae)."""

from __future__ import annotations

import math

from dar.cli.arguments import positive_int

TAKES_OVERRIDES = True


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "sample", help="generate samples: a labelled grid PNG and/or an ADM .npz",
        usage="dar sample CHECKPOINT [options] [sampler.KEY=VALUE ...]",
        epilog="sampler.KEY=VALUE overrides the checkpoint's sampler, e.g. sampler.method=sde "
               "sampler.steps=250 sampler.cfg_scale=1.5 sampler.guidance_interval=0,0.7. Latent models "
               "(4 channels) are decoded by --vae or the checkpoint's data.vae; the VAE is recorded in "
               "samples.json, and rerunning into the same --out with another VAE is refused.")
    p.add_argument("checkpoint", help="run dir (latest checkpoint), checkpoint dir, or .safetensors file")
    p.add_argument("--num", type=positive_int, default=80, help="number of samples")
    p.add_argument("--out", help="directory for samples.npz + samples.json (sharded, resumable, torchrun-aware)")
    p.add_argument("--grid", help="PNG path for a labelled grid of the first samples (at most 160)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--labels", default="balanced", choices=["balanced", "random"])
    p.add_argument("--weights", default="ema", choices=["ema", "model"])
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"],
                   help="the model's arithmetic while sampling: fp32 (default), tf32 (TF32 matmuls on CUDA, as "
                        "SiT's and DiT's sample_ddp.py do by default) or bf16 (autocast); recorded with the samples")
    p.add_argument("--vae", metavar="FOLDER_OR_HUB_ID",
                   help="latent models: the VAE that decodes samples to images, a local diffusers AutoencoderKL "
                        "folder or a hub id such as stabilityai/sd-vae-ft-ema (default: the checkpoint's data.vae)")
    p.add_argument("--vae-scale-factor", type=float, default=None, metavar="S",
                   help="the scale the model's training latents were multiplied by (default 0.18215, SD-VAE; "
                        "dar prepare-latents records it in manifest.json)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def sampler_from(overrides: list[str], base):
    """The checkpoint's sampler with ``sampler.KEY=VALUE`` overrides applied and validated."""
    from dar.diffusion.samplers import SamplerConfig
    from dar.training.config import from_dict

    values = base.to_dict()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("sampler."):
            raise ValueError(f"override {item!r}: `dar sample` takes sampler.KEY=VALUE overrides only")
        values[key[len("sampler."):]] = value
    return from_dict(SamplerConfig, values, "sampler.")


def load_decoder(option: str | None, config, device, scale_factor: float | None = None):
    """The VAE that decodes a latent model's samples: ``--vae``, else the checkpoint's ``data.vae``,
    loaded once on ``device``; None for pixel models, which refuse ``--vae``."""
    from dar.data.vae import DEFAULT_SCALE_FACTOR, load_vae
    from dar.generation.generate import check_decoder

    if not config.model.is_latent:
        if option is not None or scale_factor is not None:
            raise ValueError(f"--vae/--vae-scale-factor: the checkpoint models {config.model.in_channels}-channel "
                             "pixels, which need no VAE; leave them out")
        return None
    if scale_factor is None:
        scale_factor = DEFAULT_SCALE_FACTOR
    if not (scale_factor > 0 and math.isfinite(scale_factor)):
        raise ValueError(f"--vae-scale-factor must be a positive number, got {scale_factor}")
    source = option if option is not None else config.data.vae
    if source is None:
        check_decoder(config, None)  # raises: the error says to pass --vae
    try:
        vae = load_vae(source, device, scale_factor=scale_factor)
    except ValueError as error:
        if option is not None:
            raise
        raise ValueError(f"{error} (the VAE the checkpoint names in data.vae; pass --vae FOLDER_OR_HUB_ID to "
                         "use another copy)") from None
    check_decoder(config, vae)
    return vae


def run(args) -> int:
    from dar.training.runtime import Distributed

    if args.out is None and args.grid is None:
        raise ValueError("give --out DIR (an ADM .npz + JSON sidecar) and/or --grid PNG")
    env = Distributed(args.device)
    try:
        return _sample(args, env)
    finally:
        env.close()


def _sample(args, env) -> int:
    from dar.generation.generate import LoadedCheckpoint, generate
    from dar.generation.grid import save_checkpoint_grid
    from dar.training.checkpoint import load_model, resolve_checkpoint, weights_file

    # Resolved once and read once: a run dir's "latest checkpoint" must not change between the
    # samples, their record and the grid while a training run keeps writing.
    path = resolve_checkpoint(args.checkpoint)
    file = weights_file(path, args.weights)
    model, config, step = load_model(file, args.weights, env.device)
    checkpoint = LoadedCheckpoint(model, config, step, path, file, args.weights)
    sampler = sampler_from(args.overrides, config.sampler)
    vae = load_decoder(args.vae, config, env.device, args.vae_scale_factor)
    if args.out is not None:
        out = generate(checkpoint, args.out, args.num, sampler, env, batch_size=args.batch_size, seed=args.seed,
                       labels=args.labels, progress=not args.no_progress, vae=vae, precision=args.precision)
        if env.is_main:
            print(f"wrote {out} and {out.with_suffix('.json')}")
    if args.grid is not None and env.is_main:
        grid, info = save_checkpoint_grid(model, config, args.grid, args.num, sampler, args.seed, vae=vae,
                                          precision=args.precision)
        print(f"wrote {grid} (step {step}, {sampler.method}, NFE {info['nfe']}, cfg {sampler.cfg_scale})")
    return 0
