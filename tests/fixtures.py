"""Shared fixtures (the conftest.py of tests/ and lab/tests/ import them): real image folders, a tiny configuration."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
from tiny import TINY

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


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


@pytest.fixture(autouse=True)
def no_run_outlives_its_test():
    """Stop what tests/reliability_utils.start() left running when a test failed before stopping it."""
    yield
    utils = sys.modules.get("reliability_utils")
    if utils is not None:
        utils.stop_started_runs()


@pytest.fixture
def one_thread():
    """One torch intra-op thread: on the shared 2-core machine it ran a training step several times
    faster than two threads competing with other processes."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fit_one_batch(model, weak, strong, mask, steps: int = 20) -> tuple[list[float], float]:
    """(the loss at every one of ``steps`` AdamW steps on one batch, the last retrieval accuracy):
    a pre-training objective that learns fits a batch it sees again and again."""
    import torch

    opt = torch.optim.AdamW([p for p in model.student.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(steps):
        loss, accuracy = model.forward_with_stats(weak, strong, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, accuracy.item()
