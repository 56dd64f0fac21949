"""What every reader shares, below all of them: which files are images, how a photo file is opened,
the :class:`Source` protocol and the :class:`DataError` they raise.

The data modules form a DAG: ``errors`` <- ``files`` <- ``channels``, ``shards``, ``splits`` <-
``sources`` (which builds every kind of source from the configuration) <- ``pretrain`` and the rest.
A module here imports only the modules to its left, so no two of them import each other.
"""

from __future__ import annotations

import os
import warnings
from typing import IO, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from .errors import DataError, require_regular_file

__all__ = [
    "ARRAY_EXTENSIONS",
    "FILE_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "TIFF_EXTENSIONS",
    "DataError",
    "Source",
    "load_image",
    "require_regular_file",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
ARRAY_EXTENSIONS = (".npy",)  # always arrays (:mod:`conmim.data.channels`)
TIFF_EXTENSIONS = (".tif", ".tiff")  # arrays when model.in_chans != 3, else photos
FILE_EXTENSIONS = IMAGE_EXTENSIONS + ARRAY_EXTENSIONS  # what a folder source lists


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
