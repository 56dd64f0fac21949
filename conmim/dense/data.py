"""Segmentation data: image + class-mask pairs, their checks, the training and evaluation transforms.

Layouts: ADE20K's (``ROOT/images/<split>/*.jpg|png`` with ``ROOT/annotations/<split>/<same stem>.png``)
and any pair of folders (images, masks with the same stems). Masks hold ADE20K's labels: 0 = not
labelled (ignored), 1..K = classes; they become training targets 0..K-1 with 255 = ignore
(mmsegmentation's ``reduce_zero_label``). Bad input stops with an error naming the file: an image
without a mask, a mask whose size differs from its image's (checked for every pair before any work,
from the file headers), a value above K (checked when the mask is read).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ..data.sources import DataError

IGNORE = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def pairs_in(images: str | os.PathLike, masks: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(image, mask) files: every image in ``images`` with the ``.png`` of the same stem in ``masks``."""
    images, masks = Path(images), Path(masks)
    for folder, what in ((images, "image"), (masks, "mask")):
        if not folder.is_dir():
            raise DataError(f"{folder}: no such {what} folder")
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{images}: no images ({', '.join(IMAGE_SUFFIXES)})")
    pairs = []
    for img in files:
        mask = masks / f"{img.stem}.png"
        if not mask.is_file():
            raise DataError(f"{img}: no mask for this image (expected {mask})")
        pairs.append((img, mask))
    return pairs


def ade20k_pairs(root: str | os.PathLike, split: str) -> list[tuple[Path, Path]]:
    """The pairs of one split of an ADE20K-layout folder (``training`` or ``validation``)."""
    return pairs_in(Path(root) / "images" / split, Path(root) / "annotations" / split)


def check_sizes(pairs: Sequence[tuple[Path, Path]]) -> None:
    """Every mask has its image's size (read from the headers, no decoding)."""
    for img, mask in pairs:
        with Image.open(img) as a, Image.open(mask) as b:
            if a.size != b.size:
                raise DataError(
                    f"{mask}: mask is {b.size[0]}x{b.size[1]} but its image {img} is {a.size[0]}x{a.size[1]}"
                )


def read_target(path: Path, num_classes: int) -> np.ndarray:
    """A mask file as int64 targets: 0 -> 255 (ignore), c in 1..K -> c - 1."""
    with Image.open(path) as m:
        if m.mode not in ("L", "P", "I", "I;16"):
            raise DataError(f"{path}: mask mode {m.mode!r}; a class mask is a one-channel PNG (L or P)")
        arr = np.asarray(m).astype(np.int64)
    top = int(arr.max()) if arr.size else 0
    if top > num_classes:
        raise DataError(
            f"{path}: class id {top} beyond the {num_classes} classes (allowed: 0 = ignore, 1..{num_classes})"
        )
    return np.where(arr == 0, IGNORE, arr - 1)


def _normalise(img: Image.Image, mean, std) -> torch.Tensor:
    return TF.normalize(TF.pil_to_tensor(img.convert("RGB")).float().div_(255), list(mean), list(std))


def _short_side(img_or_size, base: int) -> tuple[int, int]:
    w, h = img_or_size.size if hasattr(img_or_size, "size") else img_or_size
    scale = base / min(w, h)
    return max(int(round(h * scale)), 1), max(int(round(w * scale)), 1)


class TrainSegDataset(Dataset):
    """Random scale (short side ``base_size`` x U(ratio_range)), random crop padded to ``crop`` (image 0,
    mask ignore), horizontal flip; indexed by ``(index, seed)`` so each step's augmentation is a
    function of the run's seed and the step (exact resume)."""

    def __init__(self, pairs, num_classes: int, crop: int, base_size: int, ratio_range, flip: bool, mean, std):
        self.pairs, self.k, self.crop, self.base = list(pairs), num_classes, crop, base_size
        self.ratio, self.flip, self.mean, self.std = tuple(ratio_range), flip, mean, std

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = item
        rng = np.random.default_rng(seed)
        path, mask_path = self.pairs[index]
        with Image.open(path) as im:
            img = im.convert("RGB")
        target = torch.from_numpy(read_target(mask_path, self.k))[None]
        size = _short_side(img, self.base * rng.uniform(*self.ratio)) if self.base else (img.height, img.width)
        x = TF.resize(_normalise(img, self.mean, self.std), list(size), InterpolationMode.BILINEAR, antialias=True)
        y = TF.resize(target, list(size), InterpolationMode.NEAREST)
        h, w = size
        top = int(rng.integers(0, max(h - self.crop, 0) + 1))
        left = int(rng.integers(0, max(w - self.crop, 0) + 1))
        x, y = (
            x[:, top : top + self.crop, left : left + self.crop],
            y[:, top : top + self.crop, left : left + self.crop],
        )
        pad = (0, self.crop - x.shape[2], 0, self.crop - x.shape[1])
        x, y = torch.nn.functional.pad(x, pad), torch.nn.functional.pad(y, pad, value=IGNORE)
        if self.flip and rng.random() < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        return x, y[0]


class EvalSegDataset(Dataset):
    """The image resized to short side ``base_size`` (0: as it is) and the mask at its original size."""

    def __init__(self, pairs, num_classes: int, base_size: int, mean, std):
        self.pairs, self.k, self.base, self.mean, self.std = list(pairs), num_classes, base_size, mean, std

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        path, mask_path = self.pairs[index]
        with Image.open(path) as im:
            img = im.convert("RGB")
        x = _normalise(img, self.mean, self.std)
        if self.base:
            x = TF.resize(x, list(_short_side(img, self.base)), InterpolationMode.BILINEAR, antialias=True)
        return x, torch.from_numpy(read_target(mask_path, self.k))


class StepSampler(Sampler):
    """Batches of ``(index, augmentation seed)`` for steps ``start..total-1``: step s takes positions
    s*B..(s+1)*B-1 of a sequence of seeded epoch permutations, so a resumed run reads what an
    uninterrupted one would. Under torchrun ``batch`` is the total over the ``world`` processes and
    rank r takes the r-th of ``world`` equal slices of it: together the ranks read the batch one
    process would (DistributedSampler's split, kept a function of the step for exact resume)."""

    def __init__(self, size: int, batch: int, total: int, seed: int, start: int = 0, rank: int = 0, world: int = 1):
        if batch % world:
            raise DataError(f"a batch of {batch} cannot be split evenly over {world} processes")
        self.size, self.batch, self.total, self.seed, self.start = size, batch, total, seed, start
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return self.total - self.start

    def _perm(self, epoch: int) -> list[int]:
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)).tolist()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        cache: dict[int, list[int]] = {}
        part = self.batch // self.world
        for step in range(self.start, self.total):
            batch = []
            first = step * self.batch + self.rank * part
            for pos in range(first, first + part):
                epoch, j = divmod(pos, self.size)
                if epoch not in cache:
                    cache = {epoch: self._perm(epoch)}
                batch.append((cache[epoch][j], self.seed * 1_000_000_007 + pos))
            yield batch


def windows(size: int, crop: int, stride: int) -> list[int]:
    """Window starts covering ``0..size`` with windows of ``crop`` every ``stride`` (the last flush)."""
    if size <= crop:
        return [0]
    n = math.ceil((size - crop) / stride) + 1
    return sorted({min(i * stride, size - crop) for i in range(n)})
