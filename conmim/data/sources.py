"""Image sources.

A *source* (:class:`Source`) is an indexable collection of ``(image, label)`` with ``label = -1``
when unknown: an image folder, a list file, tar shards (:mod:`conmim.data.shards`), Fashion-MNIST's
IDX files, or synthetic images. An image is a PIL photo or, for array files (``.npy``; TIFF when
``model.in_chans != 3``), a uint8 ``(C, H, W)`` tensor (:mod:`conmim.data.channels`).
Pre-training (:mod:`conmim.data.pretrain`) and evaluation (:mod:`conmim.eval.common`) both read them.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from .channels import ARRAY_EXTENSIONS, is_array_file, read_array_file
from .errors import DataError, require_regular_file

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
FILE_EXTENSIONS = IMAGE_EXTENSIONS + ARRAY_EXTENSIONS  # what a folder source lists
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_HINT = "install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or set data.path"


@runtime_checkable
class Source(Protocol):
    """What every command reads images through. A new kind of data needs only these four members."""

    classes: list[str]  # class names by label; empty when the labels are unnamed or unknown

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Image.Image | torch.Tensor, int]:
        """Image ``index`` (a photo in any PIL mode, or a uint8 (C, H, W) array; readers bring both to
        the model's channels with :func:`conmim.data.channels.as_channels`) and its label, -1 when unknown."""
        ...

    def name(self, index: int) -> str:
        """What an error message or a skipped-files list calls item ``index`` (a path for files)."""
        ...


def load_image(path: str | os.PathLike | IO[bytes]) -> Image.Image:
    """Open an image file fully and convert it to 8-bit RGB (CMYK, 16-bit, palette, gray included).

    Raises :class:`DataError` for a path that is not a regular file (a FIFO would block forever,
    a directory cannot be decoded), and ``DecompressionBombWarning`` as an error for an image over
    ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (PIL's default 89,478,485; PIL itself only warns up to
    twice that); PIL's own errors (truncated, not an image, ...) propagate.
    """
    if isinstance(path, (str, os.PathLike)):
        require_regular_file(path)
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
    """Image files with optional integer labels; ``in_chans`` decides which files are read as arrays."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], classes: Sequence[str] = (), in_chans: int = 3):
        self.paths, self.labels, self.classes, self.in_chans = list(paths), list(labels), list(classes), in_chans

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, index: int) -> str:
        return self.paths[index]

    def __getitem__(self, index: int) -> tuple[Image.Image | torch.Tensor, int]:
        path = self.paths[index]
        if is_array_file(path, self.in_chans):
            return read_array_file(path, self.in_chans), self.labels[index]
        return load_image(path), self.labels[index]

    def raw(self, index: int) -> bytes:
        """The file's encoded bytes (the device data path decodes them itself)."""
        return Path(self.paths[index]).read_bytes()


def image_folder(root: str | os.PathLike, in_chans: int = 3) -> FileSource:
    """All images and ``.npy`` arrays under ``root``, recursively; the first-level sub-folder names are
    the classes."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.path={str(root)!r}: no such folder")
    files: list[Path] = []
    for dirpath, _dirs, names in os.walk(root, followlinks=False):
        files += [Path(dirpath) / n for n in names if n.lower().endswith(FILE_EXTENSIONS)]
    files.sort()
    if not files:
        raise DataError(f"data.path={str(root)!r}: no image files ({', '.join(FILE_EXTENSIONS)}) found")
    tops = [f.relative_to(root).parts for f in files]
    if all(len(parts) > 1 for parts in tops):
        classes = sorted({parts[0] for parts in tops})
        index = {c: i for i, c in enumerate(classes)}
        labels = [index[parts[0]] for parts in tops]
    else:
        classes, labels = [], [-1] * len(files)
    return FileSource([str(f) for f in files], labels, classes, in_chans)


def list_file(path: str | os.PathLike, in_chans: int = 3) -> FileSource:
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
    return FileSource(paths, labels, in_chans=in_chans)


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
    """Deterministic random images, for benchmarks and smoke tests: RGB photos, or uint8 arrays of
    ``in_chans`` channels when that is not 3."""

    def __init__(self, size: int, img_size: int, num_classes: int = 10, in_chans: int = 3):
        self.size, self.img_size, self.classes = size, img_size, [str(i) for i in range(num_classes)]
        self.in_chans = in_chans

    def __len__(self) -> int:
        return self.size

    def name(self, index: int) -> str:
        return f"synthetic#{index}"

    def __getitem__(self, index: int) -> tuple[Image.Image | torch.Tensor, int]:
        g = np.random.default_rng(index)
        if self.in_chans != 3:
            arr = g.integers(0, 256, (self.in_chans, self.img_size, self.img_size), dtype=np.uint8)
            return torch.from_numpy(arr), index % len(self.classes)
        arr = g.integers(0, 256, (self.img_size, self.img_size, 3), dtype=np.uint8)
        return Image.fromarray(arr), index % len(self.classes)


ROOT_SPLIT = "."  # data.split / data.eval_split: the images directly under data.path (no split folders)


def split_location(data_cfg, split: str) -> str:
    """Where the images of ``split`` live for a folder, list or webdataset source: the one rule of every command.

    ``data.path`` is the data root. A folder source reads ``data.path/<split>`` (ImageNet layout:
    ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``); a list source reads
    ``<data.path without .txt>_<split>.txt``. ``split=.`` (or empty) is ``data.path`` itself. A
    webdataset source whose ``data.path`` is a folder reads ``data.path/<split>/*.tar``; a shard file
    or brace pattern has ``{split}`` replaced by the split, and without ``{split}`` it holds the
    training images only (``data.split``): another split has no shards to find.
    Pre-training reads ``data.split``; knn / linprobe / finetune read ``data.split`` as their training
    set and ``data.eval_split`` as the held-out one. Raises :class:`DataError` naming the missing path.
    """
    path = data_cfg.path
    if data_cfg.source == "webdataset" and not os.path.isdir(path):
        return _shard_pattern(path, split, data_cfg.split)
    if split in ("", ROOT_SPLIT):
        return path
    if data_cfg.source == "list":
        found = f"{path.rsplit('.', 1)[0]}_{split}.txt"
        if not os.path.isfile(found):
            raise DataError(
                f"list file {found!r} of split {split!r} not found (data.path={path!r}: list sources "
                f"read <data.path without .txt>_<split>.txt; data.split=. reads data.path itself)"
            )
        return found
    found = os.path.join(path, split)
    if not os.path.isdir(found):
        hint = ""
        if Path(path).name == split:
            hint = f"; data.path looks like the split folder itself: use data.path={str(Path(path).parent)!r}"
        elif os.path.isdir(path):
            subs = sorted(e.name for e in os.scandir(path) if e.is_dir())[:6]
            hint = f"; {path!r} holds {', '.join(subs) if subs else 'no sub-folders'}"
        raise DataError(
            f"split folder {found!r} not found: {data_cfg.source} sources read data.path/<split> (data.path="
            f"{path!r}, split {split!r}), data.split=. for images directly under data.path{hint}"
        )
    return found


def _shard_pattern(pattern: str, split: str, train_split: str) -> str:
    """The shard pattern of ``split`` (see :func:`split_location`)."""
    if "{split}" in pattern:
        if split in ("", ROOT_SPLIT):
            raise DataError(f"data.path={pattern!r} has a {{split}} placeholder: data.split=. names no split")
        return pattern.replace("{split}", split)
    if split not in ("", ROOT_SPLIT, train_split):
        raise DataError(
            f"data.path={pattern!r} names no shards of split {split!r} (only the training shards, data.split="
            f"{train_split!r}): write {{split}} where the split's name goes, e.g. "
            "shards/{split}-{000000..000009}.tar, or give a folder with one sub-folder of .tar files per split"
        )
    return pattern


def build_source(data_cfg, img_size: int, split: str | None = None, in_chans: int = 3) -> Source:
    """The source named by a :class:`conmim.config.DataConfig`, for ``split`` (default: ``data.split``,
    the training images); folders and list files are found by :func:`split_location`. ``in_chans``
    (``model.in_chans``) decides which files are arrays (:func:`conmim.data.channels.is_array_file`)."""
    src = data_cfg.source
    split = data_cfg.split if split is None else split
    if src == "fashion_mnist":
        return fashion_mnist(data_cfg.path, split)
    if src == "folder":
        return image_folder(split_location(data_cfg, split), in_chans)
    if src == "list":
        return list_file(split_location(data_cfg, split), in_chans)
    if src == "webdataset":
        from .shards import open_shards  # the optional webdataset package, only when asked for

        return open_shards(split_location(data_cfg, split), data_cfg.on_error)
    if src == "synthetic":
        return SyntheticSource(data_cfg.synthetic_size, img_size, in_chans=in_chans)
    raise DataError(f"data.source={src!r}: choose fashion_mnist, folder, list, webdataset or synthetic")
