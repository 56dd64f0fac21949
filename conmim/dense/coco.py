"""COCO instance data for ``conmim detect``: images with boxes, labels and masks as torchvision's
detectors take them, checked before any work, and the pycocotools evaluation (box and mask AP).

Annotations are COCO's: ``bbox`` ``[x, y, w, h]`` in pixels, ``segmentation`` as polygons or RLE,
``iscrowd`` ones left out of training (the evaluator treats them as COCO does). Category ids become
the contiguous labels 1..K in the order of their ids (0 is torchvision's background).
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ..data.sources import DataError


def _coco(ann_file: str | os.PathLike):
    try:
        from pycocotools.coco import COCO
    except ImportError:
        raise DataError("COCO data needs pycocotools: pip install 'conmim[dense]'") from None
    if not Path(ann_file).is_file():
        raise DataError(f"{ann_file}: no such COCO annotation file")
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(ann_file))


class CocoInstances(Dataset):
    """(image (3, H, W) in [0, 1], target) pairs; training items are ``(index, seed)`` (flip and scale
    jitter drawn from the seed), evaluation items plain indices. Bad input stops here, naming the
    file: a missing image, a box outside its image or of no area, an unknown category.

    ``jitter=(low, high), size``: ViTDet's large-scale jitter for training items: the image is scaled
    to fit ``size`` x U(low, high), cropped at random to at most ``size`` x ``size`` and padded to it
    (the detector then sees it at scale 1); instances cut off by the crop are dropped."""

    def __init__(
        self,
        images: str | os.PathLike,
        ann_file: str | os.PathLike,
        masks: bool,
        flip: bool = False,
        jitter: tuple[float, float] | None = None,
        size: int = 0,
    ):
        self.coco, self.images, self.masks, self.flip = _coco(ann_file), Path(images), masks, flip
        self.jitter, self.size = jitter, size
        self.ids = sorted(self.coco.imgs)
        self.cat_ids = sorted(self.coco.cats)
        self.label_of = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        for image_id in self.ids:
            info = self.coco.imgs[image_id]
            path = self.images / info["file_name"]
            if not path.is_file():
                raise DataError(f"{ann_file}: image {image_id} is {path}, which does not exist")
            for ann in self.coco.imgToAnns[image_id]:
                self._check(ann, info, ann_file)

    def _check(self, ann: dict, info: dict, ann_file) -> None:
        where = f"{ann_file}: annotation {ann['id']} ({info['file_name']})"
        if ann["category_id"] not in self.label_of:
            raise DataError(f"{where}: category_id {ann['category_id']} is not among the categories {self.cat_ids}")
        x, y, w, h = ann["bbox"]
        if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > info["width"] + 0.5 or y + h > info["height"] + 0.5:
            raise DataError(
                f"{where}: bbox {ann['bbox']} is empty or outside the {info['width']}x{info['height']} image"
            )

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, item) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        with Image.open(self.images / info["file_name"]) as im:
            image = TF.pil_to_tensor(im.convert("RGB")).float().div_(255)
        anns = [a for a in self.coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        boxes = torch.tensor(
            [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns],
            dtype=torch.float32,
        ).reshape(-1, 4)
        target: dict[str, Any] = {
            "boxes": boxes,
            "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64),
            "image_id": image_id,
        }
        if self.masks:
            h, w = image.shape[-2:]
            stack = [self.coco.annToMask(a) for a in anns] or [np.zeros((0, h, w), np.uint8)]
            target["masks"] = torch.from_numpy(np.stack(stack) if anns else stack[0])
        if self.flip and seed is not None and np.random.default_rng(seed).random() < 0.5:
            width = image.shape[-1]
            image = image.flip(-1)
            target["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
            if self.masks:
                target["masks"] = target["masks"].flip(-1)
        if self.jitter and seed is not None:
            image, target = self._jitter(image, target, np.random.default_rng([seed, 1]))
        return image, target

    def _jitter(self, image: torch.Tensor, target: dict, rng: np.random.Generator) -> tuple[torch.Tensor, dict]:
        h, w = image.shape[-2:]
        scale = self.size * rng.uniform(*self.jitter) / max(h, w)
        nh, nw = max(round(h * scale), 1), max(round(w * scale), 1)
        image = TF.resize(image, [nh, nw], antialias=True)
        top, left = int(rng.integers(0, max(nh - self.size, 0) + 1)), int(rng.integers(0, max(nw - self.size, 0) + 1))
        image = image[:, top : top + self.size, left : left + self.size]
        ch, cw = image.shape[-2:]
        boxes = target["boxes"] * torch.tensor([nw / w, nh / h] * 2) - torch.tensor([left, top] * 2)
        boxes = torch.min(boxes.clamp(min=0), torch.tensor([cw, ch] * 2, dtype=boxes.dtype))
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        target = {**target, "boxes": boxes[keep], "labels": target["labels"][keep]}
        if self.masks:
            m = target["masks"][keep]
            m = TF.resize(m, [nh, nw], InterpolationMode.NEAREST) if len(m) else m.new_zeros(0, nh, nw)
            m = m[:, top : top + self.size, left : left + self.size]
            target["masks"] = torch.nn.functional.pad(m, (0, self.size - cw, 0, self.size - ch))
        return torch.nn.functional.pad(image, (0, self.size - cw, 0, self.size - ch)), target


def collate(batch):
    """Lists of images and targets, as torchvision's detectors take them."""
    return tuple(zip(*batch, strict=True))


def coco_results(outputs: list[dict], image_ids: list[int], cat_ids: list[int], masks: bool) -> list[dict]:
    """torchvision detections (original image coordinates) as COCO result records."""
    from pycocotools import mask as mask_utils

    records = []
    for out, image_id in zip(outputs, image_ids, strict=True):
        boxes = out["boxes"].tolist()
        rles = []
        if masks:
            binary = (out["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
            rles = [mask_utils.encode(np.asfortranarray(m)) for m in binary]
        for i, (score, label) in enumerate(zip(out["scores"].tolist(), out["labels"].tolist(), strict=True)):
            x0, y0, x1, y1 = boxes[i]
            rec = {
                "image_id": image_id,
                "category_id": cat_ids[label - 1],
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "score": score,
            }
            if masks:
                rles[i]["counts"] = rles[i]["counts"].decode("ascii")
                rec["segmentation"] = rles[i]
            records.append(rec)
    return records


def coco_ap(coco_gt, records: list[dict], image_ids: list[int], iou_type: str) -> dict[str, float]:
    """AP, AP50, AP75 (%) by pycocotools' COCOeval over ``image_ids``; 0 with no detections."""
    from pycocotools.cocoeval import COCOeval

    if not records:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco_gt, coco_gt.loadRes(records), iou_type)
        ev.params.imgIds = image_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"AP": 100 * max(ev.stats[0], 0.0), "AP50": 100 * max(ev.stats[1], 0.0), "AP75": 100 * max(ev.stats[2], 0.0)}
