"""``dar eval``: measure a sample file (FID, sFID, IS, precision/recall, KID, class accuracy) or make a reference.

    dar eval samples.npz --ref VIRTUAL_imagenet256_labeled.npz --inception-weights pt_inception-2015-12-05-6726825d.pth
    dar eval samples.npz --ref builtin-train                     # Fashion-MNIST classifier metrics
    dar eval train_images.npz --make-ref ref_stats.npz           # reference statistics for later evaluations

SAMPLES is an ADM-format .npz (``arr_0``: uint8 NHWC; optional ``labels``). A JSON sidecar with the
same stem (``samples.json`` next to ``samples.npz``, as ``dar sample`` writes it) holds the sampling
settings and is copied verbatim into the result under ``"sampling"``, so the number and the sampler,
CFG scale, NFE, checkpoint and seed that produced it stay together.

Before anything is computed, the inputs are checked (:mod:`dar.evaluate.checks`): an output may not
be one of the inputs, too few images or a resolution/channel count that differs from the reference
are refused unless ``--force``, and suspicious pixel values are warned about. Warnings go to stderr
and into the result's ``"warnings"`` list. Outputs are written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from dar.evaluate.checks import check_image_count, check_image_shape, value_warnings
from dar.evaluate.evaluator import evaluate_samples
from dar.evaluate.features import EXTRACTORS, FeatureExtractor, file_sha256, make_feature_extractor, minimum_images
from dar.evaluate.inception import FID_WEIGHTS_FILENAME, WEIGHTS_ENV_VAR
from dar.evaluate.reference import (
    BUILTIN_REFERENCES,
    load_image_npz,
    load_reference,
    make_reference,
    reference_images,
    save_reference,
    stored_extractor_name,
)
from dar.files import atomic_write_text

EPILOG = """examples:
  dar eval runs/samples/fmnist/samples.npz --ref builtin-train
  dar eval samples.npz --ref VIRTUAL_imagenet256_labeled.npz --inception-weights pt_inception-2015-12-05-6726825d.pth
  dar eval imagenet_train_50k.npz --make-ref imagenet256_ref.npz --device cuda
  dar eval samples.npz --ref imagenet256_ref.npz --out runs/results/fid.json
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
        help=f"local {FID_WEIGHTS_FILENAME} (default: ${WEIGHTS_ENV_VAR}, the torch hub cache, or a download); "
        "identified by its SHA-256",
    )
    parser.add_argument(
        "--allow-unknown-weights",
        action="store_true",
        help="accept Inception weights of the right layout whose SHA-256 is not pytorch-fid's file (the numbers "
        "are then not FID; the result records the hash and a warning)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="evaluate even with fewer images than the extractor's feature dimension + 1 (2,049 Inception, 129 "
        "fmnist-classifier: below that the feature covariance is singular; papers use 50,000) or with samples whose "
        "resolution or channels differ from the reference's; each override is recorded as a warning",
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


def _inputs(args: argparse.Namespace, samples: Path) -> dict[str, Path]:
    """Every file the command reads, by role: none of them may be overwritten by an output."""
    inputs = {"SAMPLES file": samples, "sampling-settings sidecar": samples.with_suffix(".json")}
    if args.ref is not None and args.ref not in BUILTIN_REFERENCES:
        inputs["--ref file"] = Path(args.ref)
    if args.inception_weights is not None:
        inputs["--inception-weights file"] = Path(args.inception_weights)
    return inputs


def _same_file(a: Path, b: Path) -> bool:
    """Same path after resolving symlinks and ``..``, or (when both exist) the same file on disk,
    which also catches hard links."""
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _check_output(option: str, out: Path, inputs: dict[str, Path]) -> None:
    for role, path in inputs.items():
        if _same_file(out, path):
            raise ValueError(
                f"{option} {out} is the {role} ({path}); writing it would destroy an input. Choose another path"
            )


def _check_arguments(args: argparse.Namespace, samples: Path) -> Path:
    """Everything that can be refused before reading a file; returns the output path."""
    if args.make_ref is not None and args.out is not None:
        raise ValueError("--out applies to evaluations; with --make-ref the output is the --make-ref file")
    if args.make_ref is not None and Path(args.make_ref).suffix != ".npz":
        raise ValueError(f"--make-ref: the reference output must be a .npz file, got {args.make_ref}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available in this torch build or machine")
    if args.make_ref is not None:
        option, out = "--make-ref", Path(args.make_ref)
    elif args.out is not None:
        option, out = "--out", Path(args.out)
    else:
        option, out = "the default output", samples.with_suffix(".eval.json")
    _check_output(option, out, _inputs(args, samples))
    return out


def _check_inputs(args: argparse.Namespace, images: np.ndarray, extractor: str) -> list[str]:
    """The checks of :mod:`dar.evaluate.checks` on samples and reference; returns the warnings."""
    minimum = minimum_images(extractor)
    what = "SAMPLES" if args.make_ref is None else "the images for --make-ref"
    warnings = check_image_count(len(images), minimum, f"{what} ({args.samples})", args.force)
    warnings += value_warnings(images, f"{what} ({args.samples})")
    if args.ref is not None:
        num_reference, reference_shape = reference_images(args.ref)
        if num_reference is not None:
            warnings += check_image_count(num_reference, minimum, f"the reference {args.ref}", args.force)
        warnings += check_image_shape(images.shape[1:], reference_shape, args.ref, args.force)
    return warnings


def _extractor_warnings(extractor: FeatureExtractor) -> list[str]:
    if extractor.weights_verified is not False:
        return []
    return [
        f"the Inception weights {extractor.weights_path} (SHA-256 {extractor.weights_sha256}) are not pytorch-fid's "
        f"{FID_WEIGHTS_FILENAME}; accepted with --allow-unknown-weights, so the numbers are not FID"
    ]


def run(args: argparse.Namespace) -> int:
    """Run ``dar eval`` with parsed arguments; returns the exit status. Errors are raised as ValueError."""
    samples_path = Path(args.samples)
    out = _check_arguments(args, samples_path)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    images, labels = load_image_npz(samples_path)
    name = _default_extractor(args)
    warnings = _check_inputs(args, images, name)  # before loading any network: fail fast
    extractor = make_feature_extractor(
        name, device=device, inception_weights=args.inception_weights, allow_unknown_weights=args.allow_unknown_weights
    )
    warnings += _extractor_warnings(extractor)
    for warning in warnings:
        print(f"dar eval: warning: {warning}", file=sys.stderr)

    if args.make_ref is not None:
        reference = make_reference(images, extractor, str(samples_path), batch_size=args.batch_size, progress=True)
        reference.file_sha256 = file_sha256(samples_path)
        reference.metadata["warnings"] = warnings
        path = save_reference(reference, out, extractor)
        print(f"wrote {path}: {extractor.name} statistics of {len(images):,} images from {samples_path}")
        return 0

    sampling = _read_sidecar(samples_path)  # before the long part: a broken sidecar fails fast
    reference = load_reference(args.ref, extractor, batch_size=args.batch_size, progress=True)
    result = evaluate_samples(images, labels, reference, extractor, batch_size=args.batch_size, progress=True)
    result = {
        **result,
        "warnings": warnings,
        "samples": {"path": str(samples_path), "sha256": file_sha256(samples_path), "labels": labels is not None},
        "sampling": sampling,
        "arguments": {key: value for key, value in vars(args).items() if key != "func"},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(_format_table(result))
    if sampling is None:
        print(
            f"note: no sampling settings found ({samples_path.with_suffix('.json')}); "
            "the result does not say how the samples were made"
        )
    if warnings:
        print(f"{len(warnings)} warning(s), recorded in the result; see above")
    print(f"wrote {out}")
    return 0
