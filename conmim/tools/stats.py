"""``conmim stats``: per-channel mean and standard deviation of a data set, for ``data.mean`` / ``data.std``.

The statistics are of the values the model's input is normalised from: every image at
``model.in_chans`` channels (photos converted to RGB or L, arrays by the dtype rule of
:mod:`conmim.data.channels`), divided by 255, over every pixel of every image at its own size
(before crops and resizing, so a large image weighs more than a small one). Sums are exact integer
sums of the 8-bit values, so the result does not depend on the order or the number of workers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..data.channels import as_channels, to_uint8_tensor
from ..data.sources import DataError, Source


class _PixelSums(Dataset):
    """Item ``i``: (per-channel sum, per-channel sum of squares, pixel count) of image ``i`` as int64,
    or the file's name and error when it cannot be read (the caller applies ``data.on_error``)."""

    def __init__(self, source: Source, in_chans: int):
        self.source, self.in_chans = source, in_chans

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int] | tuple[str, str]:
        try:
            x = to_uint8_tensor(as_channels(self.source[i][0], self.in_chans))
        except Exception as err:  # noqa: BLE001 - any decoder error is a bad file, as in pre-training
            return self.source.name(i), f"{type(err).__name__}: {err}"
        x = x.reshape(self.in_chans, -1).long()
        return x.sum(1), (x * x).sum(1), x.shape[1]


def channel_stats(source: Source, in_chans: int, num_workers: int = 0, on_error: str = "raise") -> dict[str, Any]:
    """``{"mean": [...], "std": [...], "images", "pixels", "skipped": {name: reason}}`` of ``source``
    in [0, 1] units (population standard deviation). ``on_error``: ``raise`` stops at the first
    unreadable image naming it, ``skip`` leaves it out and lists it."""
    total, squares = torch.zeros(in_chans, dtype=torch.long), torch.zeros(in_chans, dtype=torch.long)
    pixels, images, skipped = 0, 0, {}
    loader = DataLoader(_PixelSums(source, in_chans), batch_size=None, num_workers=num_workers)
    for item in tqdm(loader, desc="channel statistics", unit="img", dynamic_ncols=True):
        if len(item) == 2:
            name, reason = item
            if on_error == "raise":
                raise DataError(f"cannot read {name}: {reason} (data.on_error=raise)")
            skipped[name] = reason
            continue
        total, squares, pixels, images = total + item[0], squares + item[1], pixels + item[2], images + 1
    if not pixels:
        raise DataError("no readable image in the data source")
    mean = [float(s) / (255.0 * pixels) for s in total.tolist()]
    mean_square = [float(q) / (255.0**2 * pixels) for q in squares.tolist()]
    std = [math.sqrt(max(q - m * m, 0.0)) for q, m in zip(mean_square, mean, strict=True)]
    return {"mean": mean, "std": std, "images": images, "pixels": pixels, "skipped": skipped}


def override_line(stats: dict[str, Any], digits: int = 4) -> str:
    """The ``data.mean=[...] data.std=[...]`` overrides that use ``stats``, ready to paste."""

    def fmt(values: list[float]) -> str:
        return "[" + ",".join(f"{v:.{digits}f}" for v in values) + "]"

    return f"data.mean={fmt(stats['mean'])} data.std={fmt(stats['std'])}"


def write_stats(stats: dict[str, Any], path: str | Path) -> Path:
    """``stats`` as JSON at ``path`` (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stats, indent=2) + "\n")
    return path
