"""``dar eval``: measure a sample file (FID, sFID, IS, precision/recall, KID, class accuracy) or make a reference.

    dar eval samples.npz --ref VIRTUAL_imagenet256_labeled.npz --inception-weights pt_inception-2015-12-05-6726825d.pth
    dar eval samples.npz --ref builtin-train                     # Fashion-MNIST classifier metrics
    dar eval train_images.npz --make-ref ref_stats.npz           # reference statistics for later evaluations

SAMPLES is an ADM-format .npz (``arr_0``: uint8 NHWC; optional ``labels``). A JSON sidecar with the
same stem (``samples.json`` next to ``samples.npz``, as ``dar sample`` writes it) holds the sampling
settings and is copied verbatim into the result under ``"sampling"``, so the number and the sampler,
CFG scale, NFE, checkpoint and seed that produced it stay together.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path

import torch

from dar.evaluate.evaluator import evaluate_samples
from dar.evaluate.features import EXTRACTORS, file_sha256, make_feature_extractor
from dar.evaluate.inception import WEIGHTS_ENV_VAR
from dar.evaluate.reference import (
    BUILTIN_REFERENCES,
    load_image_npz,
    load_reference,
    make_reference,
    save_reference,
    stored_extractor_name,
)

EPILOG = """examples:
  dar eval samples/fmnist/samples.npz --ref builtin-train
  dar eval samples.npz --ref VIRTUAL_imagenet256_labeled.npz --inception-weights pt_inception-2015-12-05-6726825d.pth
  dar eval imagenet_train_50k.npz --make-ref imagenet256_ref.npz --device cuda
  dar eval samples.npz --ref imagenet256_ref.npz --out results/fid.json
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval",
        help="FID/sFID/IS/precision/recall/KID of a sample .npz, or make reference statistics",
        description="Measure a sample file (FID, sFID, IS, precision/recall, KID, class accuracy) or make a reference.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    parser.add_argument("samples", metavar="SAMPLES", help="ADM-format .npz: arr_0 uint8 [N, H, W, C], optional labels")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--ref",
        metavar="REF",
        help="reference: " + " | ".join(BUILTIN_REFERENCES) + " | an image .npz (arr_0) | ADM statistics .npz "
        "(mu, sigma, mu_s, sigma_s) | a file made with --make-ref",
    )
    target.add_argument(
        "--make-ref", metavar="OUT", help="compute reference statistics of SAMPLES and write them to OUT (.npz)"
    )
    parser.add_argument(
        "--extractor",
        choices=EXTRACTORS,
        help="feature network (default: fmnist-classifier for builtin-* references and for files made with it, "
        "otherwise inception)",
    )
    parser.add_argument(
        "--inception-weights",
        metavar="PATH",
        help=f"local pt_inception-2015-12-05-6726825d.pth (default: ${WEIGHTS_ENV_VAR}, the torch hub cache, or a download)",
    )
    parser.add_argument(
        "--batch-size", type=int, metavar="N", help="images per forward pass (default: 100 Inception, 1000 classifier)"
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    parser.add_argument("--out", metavar="JSON", help="result file (default: SAMPLES with .eval.json instead of .npz)")
    parser.set_defaults(func=run)
    return parser


def _default_extractor(args: argparse.Namespace) -> str:
    if args.extractor is not None:
        return args.extractor
    if args.ref in BUILTIN_REFERENCES:
        return "fmnist-classifier"
    if args.ref is not None:
        return stored_extractor_name(args.ref) or "inception"
    return "inception"


def _read_sidecar(samples: Path) -> dict | None:
    sidecar = samples.with_suffix(".json")
    if not sidecar.is_file():
        return None
    try:
        return json.loads(sidecar.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{sidecar}: the sampling-settings sidecar is not valid JSON ({e})") from e


def _format_table(result: dict) -> str:
    metrics, settings = result["metrics"], result["settings"]
    lines = [
        f"samples    {settings['num_samples']:,} images {'x'.join(map(str, settings['sample_shape']))}",
        f"reference  {settings['reference']['source']} ({settings['reference']['statistics']})",
        f"extractor  {settings['extractor']['name']} (weights sha256 {settings['extractor']['weights_sha256'][:16]}...)",
    ]
    for name, value in metrics.items():
        if name.endswith("_std"):
            continue
        std = metrics.get(name + "_std")
        lines.append(f"  {name:<18} {value:10.4f}" + (f"  ± {std:.4f}" if std is not None else ""))
    for name, reason in result["skipped"].items():
        lines.append(f"  {name:<18} {'-':>10}  ({reason})")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run ``dar eval`` with parsed arguments; returns the exit status. Errors are raised as ValueError."""
    samples_path = Path(args.samples)
    if args.make_ref is not None and args.out is not None:
        raise ValueError("--out applies to evaluations; with --make-ref the output is the --make-ref file")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available in this torch build or machine")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    images, labels = load_image_npz(samples_path)
    extractor = make_feature_extractor(
        _default_extractor(args), device=device, inception_weights=args.inception_weights
    )

    if args.make_ref is not None:
        reference = make_reference(images, extractor, str(samples_path), batch_size=args.batch_size, progress=True)
        reference.file_sha256 = file_sha256(samples_path)
        path = save_reference(reference, args.make_ref, extractor)
        print(f"wrote {path}: {extractor.name} statistics of {len(images):,} images from {samples_path}")
        return 0

    sampling = _read_sidecar(samples_path)  # before the long part: a broken sidecar fails fast
    reference = load_reference(args.ref, extractor, batch_size=args.batch_size, progress=True)
    result = evaluate_samples(images, labels, reference, extractor, batch_size=args.batch_size, progress=True)
    result = {
        **result,
        "samples": {"path": str(samples_path), "sha256": file_sha256(samples_path), "labels": labels is not None},
        "sampling": sampling,
        "arguments": {key: value for key, value in vars(args).items() if key != "func"},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    out = Path(args.out) if args.out is not None else samples_path.with_suffix(".eval.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(_format_table(result))
    if sampling is None:
        print(
            f"note: no sampling settings found ({samples_path.with_suffix('.json')}); "
            "the result does not say how the samples were made"
        )
    print(f"wrote {out}")
    return 0
