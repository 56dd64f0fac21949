"""Shared fixtures: real image folders and a tiny, fast configuration."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

# A ViT small enough for CPU tests: 16-px images, 4-px patches, 2 blocks, a narrow projector.
TINY = [
    "model.arch=vit_tiny",
    "model.depth=2",
    "model.img_size=16",
    "model.patch_size=4",
    "model.proj_hidden_dim=64",
    "model.proj_out_dim=32",
    "mask.unit=2",
    "data.num_workers=0",
    "train.batch_size=8",
    "train.epochs=1",
    "train.warmup_epochs=0.1",
    "train.log_every=2",
    "train.checkpoint_every=3",
    "train.precision=fp32",
    "train.base_lr=1e-3",
    "eval.final_knn=false",
    "eval.monitor_every=0",
]


def foolbox_data_dir() -> Path:
    """The 100 labelled natural images shipped in PyPI's foolbox (installed with --no-deps)."""
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("foolbox is not installed: pip install --no-deps foolbox")
    return Path(spec.submodule_search_locations[0]) / "data"


@pytest.fixture(scope="session")
def natural_images() -> Path:
    return foolbox_data_dir()


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> str:
    if not os.path.isfile(os.path.join(FASHION_MNIST, "train-images-idx3-ubyte.gz")):
        pytest.fail("Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
    return FASHION_MNIST


@pytest.fixture
def unlabelled_folder(tmp_path) -> Path:
    """Twenty real JPEG files straight in one folder: images without labels or splits."""
    import numpy as np
    from PIL import Image

    folder = tmp_path / "unlabelled"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(20):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / f"img_{i:02d}.jpg")
    return folder


@pytest.fixture
def tiny_overrides(tmp_path) -> list[str]:
    return TINY + [f"output_dir={tmp_path / 'run'}"]


@pytest.fixture
def one_thread():
    """One torch intra-op thread: on the shared 2-core machine it ran a training step several times
    faster than two threads competing with other processes."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
