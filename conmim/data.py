"""Image sources and the pre-training dataset.

A *source* is an indexable collection of ``(PIL image, label)`` with ``label = -1`` when unknown:
an image folder, a list file, Fashion-MNIST's IDX files, or synthetic images. The pre-training
dataset turns a source into ``(weak, strong, mask)`` triples; all randomness of one sample comes
from a generator seeded by (seed, epoch, index), so results do not depend on the number of
data-loader workers and a resumed run sees exactly the samples it would have seen.
"""

from __future__ import annotations

import gzip
import logging
import os
import stat
import struct
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from .masking import MaskGenerator
from .views import PairedViews

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_HINT = "install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or set data.path"


class DataError(ValueError):
    """A data source that cannot be used; the message names the path and the reason."""


def load_image(path: str | os.PathLike | IO[bytes]) -> Image.Image:
    """Open an image file fully and convert it to 8-bit RGB (CMYK, 16-bit, palette, gray included).

    Raises :class:`DataError` for a path that is not a regular file (a FIFO would block forever,
    a directory cannot be decoded), and ``DecompressionBombWarning`` as an error for an image over
    ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (PIL's default 89,478,485; PIL itself only warns up to
    twice that); PIL's own errors (truncated, not an image, ...) propagate.
    """
    if isinstance(path, (str, os.PathLike)) and not stat.S_ISREG(os.stat(path).st_mode):
        # os.stat follows links: a symlink loop raises ELOOP here
        raise DataError(f"{path}: not a regular file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # over the limit: a bad file
        im = Image.open(path)
    with im:
        im.load()
        if im.mode.startswith("I;16"):
            arr = np.asarray(im, dtype=np.float64)
            im = Image.fromarray((arr / 65535.0 * 255.0).round().clip(0, 255).astype(np.uint8), "L")
        elif im.mode == "I":  # 32-bit integers: 16-bit data if any value is over 255, else 8-bit
            arr = np.asarray(im, dtype=np.float64)
            scale = 65535.0 if arr.max() > 255 else 255.0
            im = Image.fromarray((arr / scale * 255.0).round().clip(0, 255).astype(np.uint8), "L")
        elif im.mode in ("P", "PA", "LA", "RGBA") or "transparency" in im.info:
            im = im.convert("RGBA")
            background = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(background, im)
        return im.convert("RGB")


class FileSource:
    """Image files with optional integer labels."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], classes: Sequence[str] = ()):
        self.paths, self.labels, self.classes = list(paths), list(labels), list(classes)

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, index: int) -> str:
        return self.paths[index]

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return load_image(self.paths[index]), self.labels[index]


def image_folder(root: str | os.PathLike) -> FileSource:
    """All images under ``root``, recursively; the first-level sub-folder names are the classes."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.path={str(root)!r}: no such folder")
    files: list[Path] = []
    for dirpath, _dirs, names in os.walk(root, followlinks=False):
        files += [Path(dirpath) / n for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    files.sort()
    if not files:
        raise DataError(f"data.path={str(root)!r}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
    tops = [f.relative_to(root).parts for f in files]
    if all(len(parts) > 1 for parts in tops):
        classes = sorted({parts[0] for parts in tops})
        index = {c: i for i, c in enumerate(classes)}
        labels = [index[parts[0]] for parts in tops]
    else:
        classes, labels = [], [-1] * len(files)
    return FileSource([str(f) for f in files], labels, classes)


def list_file(path: str | os.PathLike) -> FileSource:
    """A text file with one ``path [label]`` per line; relative paths are relative to the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.path={str(path)!r}: no such list file")
    paths, labels = [], []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        label = -1
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            line, label = parts[0], int(parts[1])
        file = Path(line)
        paths.append(str(file if file.is_absolute() else path.parent / file))
        labels.append(label)
        if not line:
            raise DataError(f"{path}:{lineno}: empty path")
    if not paths:
        raise DataError(f"data.path={str(path)!r}: the list file names no images")
    return FileSource(paths, labels)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


class ArraySource:
    """In-memory uint8 images (N, H, W) or (N, H, W, C) with labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: Sequence[str] = ()):
        self.images, self.labels, self.classes = images, labels, list(classes)

    def __len__(self) -> int:
        return len(self.images)

    def name(self, index: int) -> str:
        return f"#{index}"

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]), int(self.labels[index])


FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def fashion_mnist(root: str | os.PathLike = FASHION_MNIST_DIR, split: str = "train") -> ArraySource:
    """Fashion-MNIST from its IDX files (``.gz`` or not): 60,000 train or 10,000 test images."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise DataError(f"data.split={split!r}: choose train or test")
    root = Path(root)
    found = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        candidates = [root / f"{prefix}-{kind}.gz", root / f"{prefix}-{kind}"]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            raise DataError(f"Fashion-MNIST file {candidates[0]} not found; {FASHION_MNIST_HINT}")
        found.append(_read_idx(hit))
    images, labels = found
    return ArraySource(images, labels, FASHION_CLASSES)


class SyntheticSource:
    """Deterministic random RGB images, for benchmarks and smoke tests."""

    def __init__(self, size: int, img_size: int, num_classes: int = 10):
        self.size, self.img_size, self.classes = size, img_size, [str(i) for i in range(num_classes)]

    def __len__(self) -> int:
        return self.size

    def name(self, index: int) -> str:
        return f"synthetic#{index}"

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        g = np.random.default_rng(index)
        arr = g.integers(0, 256, (self.img_size, self.img_size, 3), dtype=np.uint8)
        return Image.fromarray(arr), index % len(self.classes)


def build_source(data_cfg, img_size: int, split: str | None = None):
    """The source named by a :class:`conmim.config.DataConfig`."""
    src = data_cfg.source
    if src == "fashion_mnist":
        return fashion_mnist(data_cfg.path, split or data_cfg.split)
    if src == "folder":
        return image_folder(os.path.join(data_cfg.path, split) if split else data_cfg.path)
    if src == "list":
        return list_file(data_cfg.path if not split else f"{data_cfg.path.rsplit('.', 1)[0]}_{split}.txt")
    if src == "synthetic":
        return SyntheticSource(data_cfg.synthetic_size, img_size)
    raise DataError(f"data.source={src!r}: choose fashion_mnist, folder, list or synthetic")


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator for one sample of one epoch, independent of workers and ranks."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


def record_skipped(log_file: str | os.PathLike, name: str, reason: str) -> None:
    """Append ``name<TAB>reason`` to ``log_file`` with one ``O_APPEND`` write.

    Bad files are found inside data-loader worker processes (and on every rank), which share
    nothing but the file system: single appends of a short line from each keep the list whole.
    """
    line = f"{name}\t{' '.join(reason.split())}\n".encode()
    fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_skipped(log_file: str | os.PathLike) -> dict[str, str]:
    """Skipped files recorded by :func:`record_skipped`: ``{name: reason}``, each file once."""
    path = Path(log_file)
    if not path.is_file():
        return {}
    found: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        name, _tab, reason = line.partition("\t")
        if name:
            found.setdefault(name, reason)
    return found


class PretrainDataset(Dataset):
    """``(epoch, index) -> (weak, strong, mask)``; keys come from :class:`EpochSampler`.

    Unreadable files follow ``on_error``: ``raise`` stops with the path and reason, ``skip``
    substitutes the next readable sample and appends the file to ``skip_log`` (from whichever
    worker process met it; see :func:`record_skipped`).
    """

    def __init__(
        self,
        source,
        views: PairedViews,
        masks: MaskGenerator,
        seed: int = 0,
        on_error: str = "skip",
        skip_log: str | os.PathLike | None = None,
    ):
        self.source, self.views, self.masks, self.seed, self.on_error = source, views, masks, seed, on_error
        self.skip_log = skip_log
        self._seen_bad: set[str] = set()  # per process: record each bad file once

    def __len__(self) -> int:
        return len(self.source)

    def load(self, i: int) -> Image.Image:
        """Item ``i`` of the source as a PIL image; subclasses read other forms (file bytes)."""
        return self.source[i][0]

    def read(self, index: int):
        """``load`` of ``index``, or per ``on_error`` of the next readable item."""
        for attempt in range(len(self.source)):
            i = (index + attempt) % len(self.source)
            try:
                return self.load(i)
            except Exception as err:  # noqa: BLE001 - any decoder error is a bad file
                self.bad_file(self.source.name(i), err)
        raise DataError("no readable image in the data source")

    def bad_file(self, name: str, err: Exception) -> None:
        """Raise (``on_error=raise``) or record ``name`` once in the skip log (``skip``)."""
        reason = f"{type(err).__name__}: {err}"
        if self.on_error == "raise":
            raise DataError(f"cannot read {name}: {reason} (data.on_error=raise)") from err
        if name not in self._seen_bad:
            self._seen_bad.add(name)
            log.debug("skipping unreadable image %s (%s)", name, reason)
            if self.skip_log is not None:
                record_skipped(self.skip_log, name, reason)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        epoch, index = key
        img = self.read(index)
        gen = sample_generator(self.seed, epoch, index)
        weak, strong = self.views(img, gen)
        return weak, strong, self.masks(gen)


class EpochSampler(Sampler):
    """Endless ``(epoch, index)`` keys for one rank, resumable at any sample.

    Each epoch is a permutation seeded by (seed, epoch), split across ranks; every rank yields
    ``steps_per_epoch * batch_size`` keys an epoch, so batches never straddle epochs.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        start_step: int = 0,
        shuffle: bool = True,
    ):
        self.size, self.batch_size, self.rank, self.world_size = size, batch_size, rank, world_size
        self.seed, self.start_step, self.shuffle = seed, start_step, shuffle
        self.steps_per_epoch = size // world_size // batch_size
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{size} images cannot fill one batch of {batch_size} on each of {world_size} "
                "process(es); lower train.batch_size or add images"
            )

    def __len__(self) -> int:  # endless; report one epoch for progress displays
        return self.steps_per_epoch * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        per_epoch = self.steps_per_epoch * self.batch_size
        epoch, offset = divmod(self.start_step, self.steps_per_epoch)
        offset *= self.batch_size
        while True:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                order = torch.randperm(self.size, generator=g)
            else:
                order = torch.arange(self.size)
            mine = order[self.rank :: self.world_size][:per_epoch].tolist()
            for index in mine[offset:]:
                yield epoch, index
            epoch, offset = epoch + 1, 0
