"""A picture of segmentation predictions: image | ground truth | prediction, one row per image.

Class *c* (0-based) gets a fixed colour of an evenly spaced hue wheel, so pictures of different runs
compare at a glance; pixels the metrics ignore (ADE20K's label 0, the built-in scenes' background) are
black in both the truth and the prediction column, because nothing is scored there.
"""

from __future__ import annotations

import colorsys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data import IGNORE


def palette(num_classes: int) -> np.ndarray:
    """(K + 1, 3) uint8 colours: K hues for the classes, black last for ignored pixels."""
    hues = [colorsys.hsv_to_rgb(c / num_classes, 0.75, 1.0) for c in range(num_classes)]
    return (np.array([*hues, (0.0, 0.0, 0.0)]) * 255).round().astype(np.uint8)


def colour(labels: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """(H, W) class ids (``IGNORE`` for unscored pixels) -> (H, W, 3) colours."""
    return colours[np.where(labels == IGNORE, len(colours) - 1, labels)]


def denormalise(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised (3, H, W) tensor back to (H, W, 3) uint8."""
    x = image.float() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def prediction_picture(
    samples: Sequence[tuple[torch.Tensor, torch.Tensor]],
    predict: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor],
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    path: str | Path,
    scale: int = 4,
) -> Path:
    """Write ``path`` (PNG): for each (normalised image, target mask) one row of image, truth and
    ``predict(image, mask_size)`` (class ids at the mask's size), shown on the scored pixels only;
    every side enlarged ``scale`` times (nearest) so small scenes stay readable."""
    colours, rows = palette(num_classes), []
    for image, target in samples:
        truth = target.numpy()
        pred = np.where(truth == IGNORE, IGNORE, predict(image, tuple(truth.shape)).cpu().numpy())
        shown = Image.fromarray(denormalise(image, mean, std)).resize(truth.shape[::-1], Image.BILINEAR)
        rows.append(np.concatenate([np.asarray(shown), colour(truth, colours), colour(pred, colours)], axis=1))
    width = max(r.shape[1] for r in rows)
    grid = np.concatenate([np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows])
    picture = Image.fromarray(grid)
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return Path(path)
