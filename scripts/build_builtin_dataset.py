"""Build dar's built-in dataset: a class-balanced subset of Fashion-MNIST.

The shipped file ``dar/assets/fashion_mnist_subset.npz`` lets every example and test run offline
and in minutes on a CPU, while still being a real, 10-class image distribution. It was built with::

    apt-get install dataset-fashion-mnist      # Debian package, version 0.0~git20200523.55506a9-1
    python scripts/build_builtin_dataset.py \\
        --source /usr/share/datasets/fashion-mnist \\
        --out dar/assets/fashion_mnist_subset.npz \\
        --train-per-class 1200 --test-per-class 200 --seed 0

Provenance: the Debian package installs the official Fashion-MNIST IDX files (Zalando Research,
https://github.com/zalandoresearch/fashion-mnist, MIT licence, see
``dar/assets/FASHION_MNIST_LICENSE.txt``). The MD5 of every source file (as found and uncompressed)
is recorded in the output.

Selection: one ``numpy.random.default_rng(seed)`` draws, for each class 0..9 in order, first
``train-per-class`` indices without replacement from that class's images in the official *train*
split, then, again class by class, ``test-per-class`` indices from the official *test* split
(``t10k``). So the built-in test split is held out exactly as in Fashion-MNIST. Within a split the
images are stored in increasing source index. The chosen source indices are stored next to the
images, so anyone can verify them against the original files, and the script checks that no image
appears byte-identically in both splits (the official splits share none).

Output (``np.load(..., allow_pickle=False)`` works; images are kept 28x28, padding happens at load time):

    train_images          uint8 [N_train, 28, 28]
    train_labels          int64 [N_train]
    train_source_indices  int64 [N_train]   indices into train-images-idx3-ubyte
    test_images           uint8 [N_test, 28, 28]
    test_labels           int64 [N_test]
    test_source_indices   int64 [N_test]    indices into t10k-images-idx3-ubyte
    class_names           str   [10]
    meta                  str   []          JSON: source, licence, seed, counts, source file MD5s

The archive is written with fixed zip timestamps and maximum deflate compression, so rebuilding with
the same arguments reproduces the file byte for byte.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dar.data import FASHION_MNIST_CLASSES, find_idx_file, load_idx_split  # noqa: E402

SOURCE_PACKAGE = "Debian package dataset-fashion-mnist (official Fashion-MNIST IDX files)"


def choose_balanced(labels: np.ndarray, per_class: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """``per_class`` distinct indices of every class, drawn class by class, returned sorted."""
    chosen = []
    for c in range(num_classes):
        candidates = np.flatnonzero(labels == c)
        if len(candidates) < per_class:
            raise ValueError(f"class {c} has only {len(candidates)} images, cannot take {per_class}")
        chosen.append(rng.choice(candidates, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def write_npz_reproducibly(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez_compressed``, but with fixed timestamps so identical inputs give identical bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asanyarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, buffer.getvalue(), compresslevel=9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=Path("/usr/share/datasets/fashion-mnist"),
                        help="directory with the Fashion-MNIST IDX files (raw or .gz)")
    parser.add_argument("--out", type=Path, default=Path("dar/assets/fashion_mnist_subset.npz"))
    parser.add_argument("--train-per-class", type=int, default=1200)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    num_classes = len(FASHION_MNIST_CLASSES)
    rng = np.random.default_rng(args.seed)
    arrays: dict[str, np.ndarray] = {}
    source_md5 = {}
    for split, prefix, per_class in (("train", "train", args.train_per_class), ("test", "t10k", args.test_per_class)):
        images, labels = load_idx_split(args.source, split)
        for stem in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
            file = find_idx_file(args.source, stem)
            raw = file.read_bytes()
            uncompressed = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
            # The uncompressed digest identifies the data whatever gzip settings a distributor used.
            source_md5[file.name] = {
                "md5": hashlib.md5(raw).hexdigest(),
                "md5_uncompressed": hashlib.md5(uncompressed).hexdigest(),
            }
        if labels.max() + 1 != num_classes:
            raise ValueError(
                f"{args.source}: expected {num_classes} Fashion-MNIST classes, labels go up to {labels.max()}"
            )
        indices = choose_balanced(labels, per_class, num_classes, rng)
        arrays[f"{split}_images"] = images[indices]
        arrays[f"{split}_labels"] = labels[indices].astype(np.int64)
        arrays[f"{split}_source_indices"] = indices.astype(np.int64)

    train_keys = {image.tobytes() for image in arrays["train_images"]}
    shared = sum(image.tobytes() in train_keys for image in arrays["test_images"])
    if shared:
        raise ValueError(f"{shared} test images also appear in the train subset; the splits must be disjoint")

    meta = {
        "dataset": "Fashion-MNIST subset (class-balanced)",
        "source": SOURCE_PACKAGE,
        "source_dir": str(args.source),
        "homepage": "https://github.com/zalandoresearch/fashion-mnist",
        "license": "MIT, Copyright (c) 2017 Zalando SE; see dar/assets/FASHION_MNIST_LICENSE.txt",
        "source_files": source_md5,
        "builder": "scripts/build_builtin_dataset.py",
        "seed": args.seed,
        "train_per_class": args.train_per_class,
        "test_per_class": args.test_per_class,
        "selection": (
            "numpy.random.default_rng(seed); per class 0..9: choice(class indices, per_class, replace=False) "
            "from the official train split, then the same from the official t10k split; sorted by source index"
        ),
        "pixels": "uint8 28x28, 0 = black background",
    }
    arrays["class_names"] = np.array(FASHION_MNIST_CLASSES)
    arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_npz_reproducibly(args.out, arrays)
    size = args.out.stat().st_size
    print(f"wrote {args.out}: {len(arrays['train_labels'])} train + {len(arrays['test_labels'])} test images, "
          f"{size:,} bytes ({size / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
