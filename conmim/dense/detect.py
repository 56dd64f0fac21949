"""``conmim detect``: instance detection and segmentation with torchvision's Mask R-CNN (or Faster
R-CNN) on the ViT pyramid, COCO data, pycocotools' box and mask AP (docs/dense.md).

The detector is torchvision's, with the pyramid as its backbone (ViTDet's neck: a 1x1 + 3x3
convolution with LayerNorm to ``out_channels`` per level), one anchor size per level
(``anchor_scale`` x stride, aspect ratios 0.5, 1, 2) and RoIAlign over the four levels. Images are
resized so their longer side is the backbone's resolution and padded to a multiple of the patch
size. Training is the dense iteration loop (``conmim/dense/loop.py``): layer decay, warm-up + poly,
horizontal flips, optionally ViTDet's large-scale jitter (``detect.scale_range``), exact resume.
Under torchrun each rank trains on its slice of every batch (DDP) and detects on every
world_size-th validation image; rank 0 scores all detections and writes.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign

from ..config import Config, to_yaml
from ..runtime import distributed
from ..runtime.device import resolve_precision
from ..runtime.preemption import held_run
from ..runtime.seeding import seed_process
from .backbone import ViTPyramid
from .coco import CocoInstances, coco_ap, coco_results, collate
from .common import builtin_scenes, pyramid_of, shard, step_loader
from .loop import Schedule, train_iterations
from .model import layer_decay_groups_around

log = logging.getLogger(__name__)


def build_detector(backbone: ViTPyramid, num_classes: int, masks: bool, anchor_scale: float, mean, std) -> nn.Module:
    """torchvision's Mask R-CNN / Faster R-CNN for ``num_classes`` object classes (plus background)."""
    names = [str(i) for i in range(len(backbone.strides))]
    common: dict[str, Any] = dict(
        num_classes=num_classes + 1,
        min_size=backbone.img_size[0],
        max_size=backbone.img_size[0],
        image_mean=list(mean),
        image_std=list(std),
        size_divisible=backbone.patch,
        rpn_anchor_generator=AnchorGenerator(
            tuple((anchor_scale * s,) for s in backbone.strides), ((0.5, 1.0, 2.0),) * len(names)
        ),
        box_roi_pool=MultiScaleRoIAlign(names, 7, 2),
    )
    if masks:
        return MaskRCNN(backbone, mask_roi_pool=MultiScaleRoIAlign(names, 14, 2), **common)
    return FasterRCNN(backbone, **common)


def detection_data(cfg: Config) -> tuple[CocoInstances, CocoInstances]:
    d = cfg.detect
    if d.train_images:
        train = (d.train_images, d.train_ann)
        val = (d.val_images, d.val_ann)
    else:  # the scenes' file_name entries are relative to images/ and name the split folder
        root = builtin_scenes(cfg)
        train = (root / "images", root / "coco" / "instances_training.json")
        val = (root / "images", root / "coco" / "instances_validation.json")
    jitter = (d.scale_range[0], d.scale_range[1]) if d.scale_range else None
    return CocoInstances(*train, d.masks, d.flip, jitter, d.img_size), CocoInstances(*val, d.masks)


@torch.no_grad()
def evaluate(
    model: nn.Module, val: CocoInstances, cfg: Config, device, amp_dtype, info: distributed.DistInfo | None = None
) -> dict[str, float]:
    """Box (and mask) AP, AP50, AP75 in % over the validation images (or the first ``val_limit``);
    under torchrun each rank detects on its share, rank 0 scores them all and shares the result."""
    d, was_training, info = cfg.detect, model.training, info or distributed.DistInfo()
    model.eval()
    count = min(d.val_limit or len(val), len(val))
    records, ids, mine = [], val.ids[:count], list(shard(count, info))
    for start in range(0, len(mine), d.batch_size):
        batch = [val[i] for i in mine[start : start + d.batch_size]]
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            outputs = model([img.to(device) for img, _ in batch])
        outputs = [{k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in o.items()} for o in outputs]
        records += coco_results(outputs, [t["image_id"] for _, t in batch], val.cat_ids, d.masks)
    model.train(was_training)
    gathered = distributed.gather_to_main(records)
    result = None
    if gathered is not None:
        records = [r for part in gathered for r in part]
        result = {f"bbox_{k}": v for k, v in coco_ap(val.coco, records, ids, "bbox").items()}
        if d.masks:
            result.update({f"segm_{k}": v for k, v in coco_ap(val.coco, records, ids, "segm").items()})
        result = {**result, "detections": len(records), "images": len(ids)}
    return distributed.share_from_main(result)


def detect(encoder: str | Path, cfg: Config, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Train ``cfg.detect``'s detector from an encoder source; writes ``<output_dir>/detect``. Under
    torchrun ``detect.batch_size`` is the total over the processes."""
    d, start_time = cfg.detect, time.perf_counter()
    info, device, owns_group = distributed.setup_process(cfg.device, cfg.dist_timeout_s)
    amp_dtype = resolve_precision(cfg.precision, device)
    out = Path(out_dir or Path(cfg.output_dir) / "detect")
    train, val = detection_data(cfg)
    torch.manual_seed(cfg.seed)
    backbone = pyramid_of(encoder, d, d.img_size, d.out_channels)
    model = build_detector(backbone, len(val.cat_ids), d.masks, d.anchor_scale, cfg.data.mean, cfg.data.std).to(device)
    groups = layer_decay_groups_around(model, backbone.encoder, d.weight_decay, d.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=d.lr, betas=tuple(d.betas), fused=True)  # fused: the guard skips NaN steps
    net = DistributedDataParallel(model) if info.enabled else model
    seed_process(cfg.seed, info.rank)  # the same initial weights, a drop path stream per rank
    log.info(
        "detection: %s, %d classes, %d training / %d validation images, %d px, strides %s (blocks %s)",
        "Mask R-CNN" if d.masks else "Faster R-CNN",
        len(val.cat_ids),
        len(train),
        len(val),
        d.img_size,
        backbone.strides,
        backbone.indices,
    )

    def loss_of(batch) -> torch.Tensor:
        images, targets = batch
        images = [i.to(device, non_blocking=True) for i in images]
        targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        return sum(loss.float() for loss in net(images, targets).values())

    keys = ("bbox_AP", "bbox_AP50") + (("segm_AP", "segm_AP50") if d.masks else ())
    with held_run(out, cfg.stop_signals, info.is_main, info.enabled, cfg.dist_timeout_s) as stop:  # one run per folder
        final, history = train_iterations(
            model,
            optimizer,
            lambda start: step_loader(train, d.batch_size, d.iters, cfg, start, device, collate, info),
            loss_of,
            lambda: evaluate(model, val, cfg, device, amp_dtype, info),
            keys,
            Schedule.of(d),
            out,
            to_yaml(cfg),
            device,
            amp_dtype,
            "detect",
            info,
            stop,
        )
    result = {
        **final,
        "iters": d.iters,
        "model": "mask_rcnn" if d.masks else "faster_rcnn",
        "init": d.init,
        "num_classes": len(val.cat_ids),
        "train_images": len(train),
        "strides": backbone.strides,
        "blocks": backbone.indices,
        "processes": info.world_size,
        "history": history,
        "seconds": round(time.perf_counter() - start_time, 1),
        "source": str(encoder),
        "output_dir": str(out),
    }
    if info.is_main:
        (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    if owns_group:
        distributed.teardown()
    return result
