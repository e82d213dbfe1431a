"""Train the Fashion-MNIST classifier shipped in ``dar/assets/fmnist_classifier.safetensors``.

The classifier is the feature extractor of the in-domain metrics (FD-FMNIST, precision/recall,
class-conditional accuracy; see ``dar/evaluate/classifier.py``). This script is its complete,
deterministic recipe:

* data: the full Fashion-MNIST train set (60,000 images) from Debian's ``dataset-fashion-mnist``
  package (``apt-get install -y dataset-fashion-mnist``: IDX files in
  ``/usr/share/datasets/fashion-mnist``), padded 28 -> 32 with background, ``x = u / 127.5 - 1``;
* augmentation: a random shift of up to 2 pixels in each direction (background fill). No flips:
  Fashion-MNIST shoes all point the same way, and a feature extractor for generated samples should
  notice when they do not;
* optimisation: AdamW (lr 2e-3, weight decay 5e-4), batch 128, one-cycle schedule (cosine), fixed
  seed, ``torch.use_deterministic_algorithms(True)``, CPU with a fixed thread count (reduction
  order, and so the last bits of the weights, can depend on the number of threads);
* evaluation: accuracy on the official 10,000-image test set, which is never used for training or
  model selection (the weights after the last epoch are saved).

Run from the repository root (about 6-10 minutes on 2 idle CPU cores; 93.2 % test accuracy):

    python scripts/train_fmnist_classifier.py

The command, the SHA-256 of the four IDX files, the seed and the test accuracy are written into the
safetensors metadata, so the shipped file documents how to reproduce itself.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from dar.data import find_idx_file, load_idx_split  # noqa: E402
from dar.evaluate.classifier import CLASSIFIER_PATH, FashionMNISTClassifier, uint8_to_model  # noqa: E402
from dar.evaluate.features import file_sha256  # noqa: E402

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
MAX_SHIFT = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="directory with the Fashion-MNIST IDX files")
    parser.add_argument("--out", default=str(CLASSIFIER_PATH), help="output safetensors file")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the one-cycle schedule")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (fixed for bitwise reproducibility)")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    return args


def random_shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift every image of ``x [N, 1, H, W]`` by its own offset in [-2, 2]^2, filling with background -1."""
    n, _, h, w = x.shape
    padded = F.pad(x, (MAX_SHIFT,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * MAX_SHIFT + 1, (2, n), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # [N, H, 1]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # [N, 1, W]
    return padded[torch.arange(n)[:, None, None], 0, rows, cols][:, None]


@torch.no_grad()
def accuracy(
    model: FashionMNISTClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000
) -> float:
    model.eval()
    correct = sum(
        int((model(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum())
        for i in range(0, len(images), batch_size)
    )
    return correct / len(images)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    data_dir = Path(args.data_dir)
    train_u8, train_labels = load_idx_split(data_dir, "train")
    test_u8, test_labels = load_idx_split(data_dir, "test")
    data_files = {
        find_idx_file(data_dir, stem).name: file_sha256(find_idx_file(data_dir, stem))
        for stem in (
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        )
    }
    train_x, train_y = uint8_to_model(train_u8), torch.from_numpy(train_labels)
    test_x, test_y = uint8_to_model(test_u8), torch.from_numpy(test_labels)
    print(f"train {tuple(train_x.shape)}, test {tuple(test_x.shape)} from {data_dir}")

    model = FashionMNISTClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = len(train_x) // args.batch_size  # drop the last partial batch: fixed batch statistics
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch
    )

    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        total_loss = 0.0
        for step in range(steps_per_epoch):
            index = order[step * args.batch_size : (step + 1) * args.batch_size]
            x = random_shift(train_x[index], generator)
            loss = F.cross_entropy(model(x), train_y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item()
        test_acc = accuracy(model, test_x, test_y)
        print(
            f"epoch {epoch + 1}/{args.epochs}  loss {total_loss / steps_per_epoch:.4f}  "
            f"test acc {test_acc:.4f}  ({time.time() - start:.0f} s)",
            flush=True,
        )

    command = "python scripts/train_fmnist_classifier.py" + "".join(
        f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv)
    )
    metadata = {
        "format": "dar-fmnist-classifier-v1",
        "architecture": "dar.evaluate.classifier.FashionMNISTClassifier",
        "input": "[N, 1, 32, 32] float32, x = u / 127.5 - 1, 28x28 Fashion-MNIST padded with background (-1)",
        "training_command": command,
        "data": "Fashion-MNIST train split, all 60,000 images (Debian package dataset-fashion-mnist)",
        "data_sha256": json.dumps(data_files, sort_keys=True),
        "seed": str(args.seed),
        "hyperparameters": json.dumps(
            {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "weight_decay", "threads")}, sort_keys=True
        ),
        "augmentation": f"random shift up to {MAX_SHIFT} px (background fill), no flips",
        "test_accuracy": f"{test_acc:.4f}",
        "test_set": "official Fashion-MNIST test split, 10,000 images, never used for training or selection",
        "torch_version": torch.__version__,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out), metadata=metadata)
    print(f"test accuracy {test_acc:.4f}; wrote {out} ({out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
