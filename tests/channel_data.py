"""Generated data sets of 1 and 5 channels for the N-channel tests: two classes that differ in the
brightness of their first channel, as ``.npy`` and TIFF files in class folders, split train / test."""

from __future__ import annotations

from pathlib import Path

import numpy as np

try:
    import tifffile
except ImportError as err:  # scripts/setup.sh installs the extra; without it these tests cannot run
    raise ImportError("tifffile missing: pip install -e '.[arrays]' (scripts/setup.sh does)") from err


def write_channel_dataset(root: Path, in_chans: int, per_class: int = 12, test_per_class: int = 4, size: int = 20):
    """``root/{train,test}/{dark,light}/img_NN.{npy,tif}``: even images as uint8 (C, H, W) ``.npy``,
    odd ones as uint16 (H, W, C) TIFF (planar (C, H, W) for one channel). Returns ``root``."""
    rng = np.random.default_rng(in_chans)
    for split, count in (("train", per_class), ("test", test_per_class)):
        for label, name in enumerate(("dark", "light")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                x = rng.integers(0, 120, (in_chans, size, size)).astype(np.uint8)
                x[0] += np.uint8(120 * label)
                if i % 2 == 0:
                    np.save(folder / f"img_{i:02d}.npy", x)
                else:
                    wide = x.astype(np.uint16) * 257  # 16 bits: reads back as x exactly (x * 257 * 255 / 65535)
                    tifffile.imwrite(folder / f"img_{i:02d}.tif", wide[0] if in_chans == 1 else wide.transpose(1, 2, 0))
    return root


def channel_overrides(root: Path, in_chans: int) -> list[str]:
    """The configuration of a folder of ``in_chans``-channel arrays (mean 0.5, std 0.25 per channel)."""
    values = ",".join(["0.5"] * in_chans), ",".join(["0.25"] * in_chans)
    return [
        "data.source=folder",
        f"data.path={root}",
        "data.split=train",
        "data.eval_split=test",
        f"model.in_chans={in_chans}",
        f"data.mean=[{values[0]}]",
        f"data.std=[{values[1]}]",
    ]
