"""Segmentation metrics from a confusion matrix: per-class IoU and accuracy, mIoU, pixel accuracy.

As mmsegmentation reports them on ADE20K: ignored pixels count nowhere; a class neither present
nor predicted in the evaluated images has no IoU and is left out of the means (NaN in the per-class
list, ``null`` in JSON); a class present nowhere but predicted somewhere has IoU 0.
"""

from __future__ import annotations

import math

import torch


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """(K, K) int64 counts, rows = ground truth, columns = prediction, over pixels not ignored."""
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    if t.numel() and (t.max() >= num_classes or t.min() < 0):
        raise ValueError(f"target class {int(t.max())} outside 0..{num_classes - 1}")
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def _or_none(value: float) -> float | None:
    return None if math.isnan(value) else value


def scores(matrix: torch.Tensor, class_names: list[str] | None = None) -> dict:
    """mIoU, mAcc and aAcc (pixel accuracy) in %, and the per-class IoU / accuracy."""
    m = matrix.double()
    hits, gt, predicted = m.diag(), m.sum(1), m.sum(0)
    union = gt + predicted - hits
    iou = [100 * h / u if u > 0 else math.nan for h, u in zip(hits.tolist(), union.tolist(), strict=True)]
    acc = [100 * h / g if g > 0 else math.nan for h, g in zip(hits.tolist(), gt.tolist(), strict=True)]
    total = gt.sum().item()
    names = class_names or [str(i) for i in range(len(iou))]
    return {
        "mIoU": _nanmean(iou),
        "mAcc": _nanmean(acc),
        "aAcc": 100 * hits.sum().item() / total if total else math.nan,
        "pixels": int(total),
        "per_class": {n: {"IoU": _or_none(i), "Acc": _or_none(a)} for n, i, a in zip(names, iou, acc, strict=True)},
    }
