"""Per-sample randomness that depends on (seed, epoch, index) only, for datasets whose transforms
draw from the global RNGs (torchvision's and timm's augmentations: torch, ``random`` and NumPy).

With :class:`EpochSeeded` the augmentation of a sample is the same whatever the number of data-loader
workers or where a run was stopped, so a resumed fine-tuning sees exactly the images an uninterrupted
one would; the caller's RNG streams are put back after each sample, so drop path and mixup in the
main process draw on undisturbed.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample of one epoch, well mixed (NumPy's SeedSequence)."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


@contextlib.contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed torch's CPU RNG, ``random`` and NumPy's global RNG with ``seed``; restore all three after."""
    saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        torch.set_rng_state(saved[0])
        random.setstate(saved[1])
        np.random.set_state(saved[2])


class EpochSeeded(Dataset):
    """``(epoch, index) -> dataset[index]``, drawn under :func:`seeded_global_rngs` of that key;
    the keys come from :class:`conmim.data.pretrain.EpochSampler`."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        with seeded_global_rngs(sample_seed(self.seed, epoch, index)):
            return self.dataset[index]
