import os

import pytest
import torch

# Tests are sized for 2 CPU cores; keep torch from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """These models are tiny: a second thread only adds synchronisation (and on a busy 2-core machine,
    waiting for a core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """The distillation tests' teacher: a residual SiT-Pico/8 trained for a few steps on the built-in data
    (label dropout on: CFG works), once per test module."""
    from dar.training.config import resolve
    from dar.training.trainer import train

    run_dir = tmp_path_factory.mktemp("teacher")
    config = resolve("fmnist-residual", ["model.arch=SiT-Pico/8", "train.global_batch=8", "train.steps=6",
                                          "train.sample_every=0", "train.lr=1e-3"])
    train(config, run_dir, progress=False)
    return run_dir
