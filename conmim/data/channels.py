"""Images of any channel count: reading array files, and bringing every image to the model's channels.

Two forms of image travel from a source to the views and the evaluation transforms:

* **photos** (JPEG, PNG, ... and TIFF when ``model.in_chans=3``), PIL images read by
  :func:`conmim.data.files.load_image`; :func:`as_channels` converts them to RGB for
  ``in_chans=3`` (exactly as before N-channel support) or to 8-bit gray ``L`` for ``in_chans=1``;
* **arrays** (``.npy`` always, ``.tif`` / ``.tiff`` when ``in_chans != 3``), read here into a uint8
  ``(C, H, W)`` tensor with exactly ``in_chans`` channels.

Both end as the 8-bit values the 3-channel photo path has always used, so every later step (crops,
photometric ops, ``/ 255`` then ``data.mean`` / ``data.std``) has one meaning for all of them.
The dtype rule, the same for ``.npy`` and TIFF: uint8 as is; uint16 scaled by 255/65535 and rounded
(PIL's rule for 16-bit photos in ``load_image``); float16/32/64 must lie in [0, 1] and are scaled
by 255 and rounded; any other dtype, a value outside [0, 1] in a float array or a non-finite one
is an error naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from .files import ARRAY_EXTENSIONS, TIFF_EXTENSIONS, DataError, Source, require_regular_file

DTYPE_RULE = "uint8 (as is), uint16 (x 255/65535) or float16/32/64 in [0, 1] (x 255), rounded to 8 bits"
TIFF_HINT = "TIFF arrays need tifffile: pip install 'conmim[arrays]'"


class ChannelError(DataError):
    """An image whose channels or dtype cannot feed a model of ``model.in_chans`` channels."""


def is_array_file(path: str | os.PathLike, in_chans: int) -> bool:
    """Whether ``path`` is read as an array: ``.npy`` always, TIFF unless the model takes RGB photos."""
    suffix = Path(path).suffix.lower()
    return suffix in ARRAY_EXTENSIONS or (suffix in TIFF_EXTENSIONS and in_chans != 3)


def read_array_file(path: str | os.PathLike, in_chans: int) -> torch.Tensor:
    """A ``.npy`` or TIFF file as a uint8 ``(in_chans, H, W)`` tensor (module docstring: the dtype rule).

    Layouts: ``(H, W)`` is one channel; a 3-D array is ``(C, H, W)`` when its first axis has
    ``in_chans`` entries, else ``(H, W, C)`` when its last one has. Arrays of more than
    ``PIL.Image.MAX_IMAGE_PIXELS`` pixels are refused like oversized photos.
    """
    require_regular_file(path)
    if Path(path).suffix.lower() in ARRAY_EXTENSIONS:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)  # the header first: shape and dtype
    else:
        try:
            import tifffile
        except ImportError:
            raise ChannelError(f"{path}: {TIFF_HINT}") from None
        arr = tifffile.imread(path)
    arr = channels_first(arr, in_chans, str(path))
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and arr.shape[1] * arr.shape[2] > limit:
        raise ChannelError(f"{path}: {arr.shape[1]}x{arr.shape[2]} pixels is over PIL's limit of {limit}")
    return torch.from_numpy(np.array(to_uint8(arr, str(path)), order="C"))  # a copy: the file's map is read-only


def channels_first(arr: np.ndarray, in_chans: int, name: str) -> np.ndarray:
    """``arr`` as ``(in_chans, H, W)`` (see :func:`read_array_file`), or :class:`ChannelError` naming
    ``name``, the shape and what ``model.in_chans`` asks for."""
    if arr.ndim == 2 and in_chans == 1:
        return arr[None]
    if arr.ndim == 3 and arr.shape[0] == in_chans:
        return arr
    if arr.ndim == 3 and arr.shape[-1] == in_chans:
        return arr.transpose(2, 0, 1)
    raise ChannelError(
        f"{name}: array of shape {tuple(arr.shape)} has not model.in_chans={in_chans} channels "
        f"(allowed: ({in_chans}, H, W) or (H, W, {in_chans})" + (", or (H, W))" if in_chans == 1 else ")")
    )


def to_uint8(arr: np.ndarray, name: str) -> np.ndarray:
    """``arr`` as uint8 by :data:`DTYPE_RULE`, or :class:`ChannelError` naming ``name`` and the dtype."""
    kind, size = arr.dtype.kind, arr.dtype.itemsize  # not ``== np.uint16``: big-endian files count too
    if kind == "u" and size == 1:
        return arr
    if kind == "u" and size == 2:
        return np.rint(arr.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)
    if kind == "f":
        values = arr.astype(np.float64)
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if not (np.isfinite(low) and np.isfinite(high) and 0.0 <= low and high <= 1.0):
            raise ChannelError(
                f"{name}: {arr.dtype} values span [{low:g}, {high:g}]; float arrays must lie in [0, 1] "
                f"(scale them first); allowed: {DTYPE_RULE}"
            )
        return np.rint(values * 255.0).astype(np.uint8)
    raise ChannelError(f"{name}: dtype {arr.dtype} is not supported; allowed: {DTYPE_RULE}")


def as_channels(img: Image.Image | torch.Tensor, in_chans: int) -> Image.Image | torch.Tensor:
    """``img`` ready for a model of ``in_chans`` channels: a photo converted to RGB (3) or L (1), an
    array checked to be uint8 ``(in_chans, H, W)``. A photo for any other count is an error: it has
    no such channels to give (N-channel data must come as array files)."""
    if isinstance(img, Image.Image):
        if in_chans == 3:
            return img.convert("RGB")
        if in_chans == 1:
            return img.convert("L")
        raise ChannelError(
            f"a {img.mode} photo cannot feed model.in_chans={in_chans} (photos give 1 or 3 channels); "
            f"{in_chans}-channel images must be array files ({', '.join(ARRAY_EXTENSIONS + TIFF_EXTENSIONS)})"
        )
    if img.ndim != 3 or img.shape[0] != in_chans or img.dtype != torch.uint8:
        raise ChannelError(
            f"a {img.dtype} tensor of shape {tuple(img.shape)} cannot feed model.in_chans={in_chans}: "
            f"sources give uint8 ({in_chans}, H, W) arrays"
        )
    return img


def check_first_images(source: Source, in_chans: int, probe: int = 8) -> None:
    """Stop early when ``model.in_chans`` does not fit the data at all: if each of the first ``probe``
    images of ``source`` fails :func:`as_channels` with a :class:`ChannelError` (gray photos for 5
    channels, RGB arrays for 1, ...), raise one naming ``model.in_chans`` and the first error. Without
    this, ``data.on_error=skip`` would try every file of the data set for each sample before giving
    up. One good image passes; unreadable files say nothing about the channels and are left to
    ``data.on_error``."""
    errors: list[str] = []
    for i in range(min(probe, len(source))):
        try:
            as_channels(source[i][0], in_chans)
            return
        except ChannelError as err:
            errors.append(str(err) if source.name(i) in str(err) else f"{source.name(i)}: {err}")
        except Exception:  # noqa: BLE001 - unreadable: left to data.on_error
            continue
    if errors:
        raise ChannelError(
            f"model.in_chans={in_chans} does not fit the data: the first {len(errors)} image(s) all fail, "
            f"e.g. {errors[0]}"
        )


def image_size(img: Image.Image | torch.Tensor) -> tuple[int, int]:
    """(height, width) of a photo or a ``(C, H, W)`` array."""
    if isinstance(img, Image.Image):
        return img.height, img.width
    return int(img.shape[-2]), int(img.shape[-1])


def to_uint8_tensor(img: Image.Image | torch.Tensor) -> torch.Tensor:
    """The uint8 ``(C, H, W)`` tensor of a photo (PIL's bands as channels) or an array."""
    return TF.pil_to_tensor(img) if isinstance(img, Image.Image) else img
