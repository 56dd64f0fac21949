"""Image sources.

A *source* (:class:`Source`) is an indexable collection of ``(image, label)`` with ``label = -1``
when unknown: an image folder, a list file, tar shards (:mod:`conmim.data.shards`), Fashion-MNIST's
IDX files, or synthetic images. An image is a PIL photo or, for array files (``.npy``; TIFF when
``model.in_chans != 3``), a uint8 ``(C, H, W)`` tensor (:mod:`conmim.data.channels`).
Pre-training (:mod:`conmim.data.pretrain`) and evaluation (:mod:`conmim.eval.common`) both read them;
:func:`build_source` builds the one a configuration names, for a split found by :mod:`conmim.data.splits`.
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .channels import is_array_file, read_array_file
from .files import FILE_EXTENSIONS, IMAGE_EXTENSIONS, DataError, Source, load_image
from .splits import ROOT_SPLIT, describe_missing, find_split, split_location

__all__ = [  # the names of files.py and splits.py are read from here too
    "FASHION_CLASSES",
    "FASHION_MNIST_DIR",
    "FILE_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "ROOT_SPLIT",
    "ArraySource",
    "DataError",
    "FileSource",
    "Source",
    "SyntheticSource",
    "build_source",
    "fashion_mnist",
    "find_split",
    "has_split",
    "image_folder",
    "list_file",
    "load_image",
    "split_location",
    "split_missing",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
SCENES_UNLABELLED = (
    "the built-in scenes' images carry no image labels and serve pre-training only (conmim pretrain, "
    "conmim stats); knn, linprobe and finetune need labelled images, and segment / detect read the "
    "scenes' masks and boxes themselves"
)
FASHION_MNIST_HINT = "install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or set data.path"


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
    images, labels = (_read_idx(path) for path in _fashion_files(root, split))
    return ArraySource(images, labels, FASHION_CLASSES)


def _fashion_files(root: str | os.PathLike, split: str) -> list[Path]:
    """The image and label IDX files of a Fashion-MNIST split, or :class:`DataError` naming the missing one."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise DataError(f"data.split={split!r}: choose train or test")
    found = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        candidates = [Path(root) / f"{prefix}-{kind}.gz", Path(root) / f"{prefix}-{kind}"]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            raise DataError(f"Fashion-MNIST file {candidates[0]} not found; {FASHION_MNIST_HINT}")
        found.append(hit)
    return found


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


def split_missing(data_cfg, split: str) -> str | None:
    """Why the data of a :class:`conmim.config.DataConfig` has no ``split`` (the path looked for), or
    None when it has one. Cheap: a few ``stat`` calls and no image read (only the training split of
    a folder without split folders lists ``data.path``, see :mod:`conmim.data.splits`). Pre-training
    asks it before its optional final evaluation, which needs ``data.eval_split``. Raises
    :class:`DataError` for data that is there but cannot be read that way (:func:`split_location`)."""
    src = data_cfg.source
    if src == "fashion_mnist":
        try:
            _fashion_files(data_cfg.path, split)
        except DataError as err:
            return str(err)
        return None
    if src == "synthetic":
        return None
    if src == "scenes":
        return SCENES_UNLABELLED
    if src in ("folder", "list", "webdataset"):
        return describe_missing(data_cfg, split) if find_split(data_cfg, split) is None else None
    return _unknown_source(src)


def has_split(data_cfg, split: str) -> bool:
    """Whether the data holds ``split`` (:func:`split_missing` says why not)."""
    return split_missing(data_cfg, split) is None


def build_source(data_cfg, img_size: int, split: str | None = None, in_chans: int = 3) -> Source:
    """The source named by a :class:`conmim.config.DataConfig`, for ``split`` (default: ``data.split``,
    the training images); folders and list files are found by :func:`split_location` (a folder or
    list file without splits is the training images itself). ``in_chans`` (``model.in_chans``)
    decides which files are arrays (:func:`conmim.data.channels.is_array_file`)."""
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
    if src == "scenes":  # pre-training reads them through conmim.data.scenes.source_for
        raise DataError(f"data.source=scenes: {SCENES_UNLABELLED}")
    raise DataError(_unknown_source(src))


def _unknown_source(src: str) -> str:
    return f"data.source={src!r}: choose fashion_mnist, folder, list, webdataset, synthetic or scenes"
