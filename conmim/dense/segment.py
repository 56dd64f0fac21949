"""``conmim segment``: semantic segmentation from a pre-trained encoder (docs/dense.md).

Iteration-based fine-tuning as BEiT's ADE20K runs: random scale / crop / flip, cross-entropy with
ignore index 255, AdamW with layer-wise lr decay, linear warm-up then poly decay; sliding-window
evaluation at the original resolution (windows of the crop size, logits averaged, resized to the
image's size before the argmax); mIoU, mAcc and pixel accuracy (aAcc) per class and overall.
``checkpoints/last.pt`` is written every ``checkpoint_every`` iterations and resumed from when the
command runs again; batches and augmentations are functions of the seed and the iteration, so a
resumed run sees the data an uninterrupted one would. Under torchrun each rank trains on its slice
of every batch (DDP), evaluates every world_size-th validation image, and the confusion matrices are
summed over the ranks; rank 0 writes.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ..config import Config, to_yaml
from ..data.sources import DataError
from ..runtime import distributed
from ..runtime.device import resolve_precision
from ..runtime.preemption import held_run
from ..runtime.seeding import seed_process
from .common import builtin_scenes, pyramid_of, shard, step_loader
from .data import IGNORE, EvalSegDataset, TrainSegDataset, ade20k_pairs, check_sizes, pairs_in, windows
from .loop import Schedule, train_iterations
from .metrics import confusion, scores
from .model import Segmenter, build_segmenter, optimizer_groups, segmentation_loss
from .pictures import prediction_picture

log = logging.getLogger(__name__)


def segmentation_data(cfg: Config) -> tuple[list, list, list[str]]:
    """(training pairs, validation pairs, class names) from ``segment.*``: an ADE20K-layout root, a
    pair of folders, or the built-in scenes (generated into ``scenes.dir`` on first use)."""
    s = cfg.segment
    if s.images:
        train, val = pairs_in(s.images, s.masks), pairs_in(s.val_images, s.val_masks)
        names = [str(i + 1) for i in range(s.num_classes)]
    else:
        root = Path(s.data) if s.data else builtin_scenes(cfg)
        train, val = ade20k_pairs(root, s.train_split), ade20k_pairs(root, s.val_split)
        meta = root / "scenes.json"
        names = json.loads(meta.read_text())["classes"] if meta.is_file() else []
        if s.num_classes and names and s.num_classes != len(names):
            raise DataError(f"segment.num_classes={s.num_classes}, but {meta} names {len(names)} classes")
        names = names or [str(i + 1) for i in range(s.num_classes)]
    if s.val_limit:
        val = val[: s.val_limit]
    check_sizes(train + val)
    return train, val, names


@torch.no_grad()
def sliding_logits(model: nn.Module, image: torch.Tensor, crop: int, stride: int, num_classes: int) -> torch.Tensor:
    """(K, H, W) logits of one (3, H, W) image: windows of ``crop`` every ``stride`` px, averaged."""
    _, h, w = image.shape
    out = image.new_zeros(num_classes, h, w)
    count = image.new_zeros(1, h, w)
    for top in windows(h, crop, stride):
        for left in windows(w, crop, stride):
            patch = image[:, top : top + crop, left : left + crop]
            out[:, top : top + patch.shape[1], left : left + patch.shape[2]] += model(patch[None])[0].float()
            count[:, top : top + patch.shape[1], left : left + patch.shape[2]] += 1
    return out / count


@torch.no_grad()
def predict(
    model: nn.Module, image: torch.Tensor, size: tuple[int, int], cfg: Config, num_classes: int, device, amp_dtype
) -> torch.Tensor:
    """(H, W) class ids of one normalised (3, h, w) image at the mask's ``size``: sliding-window logits
    (windows of the crop size every ``segment.eval_stride`` px), resized before the argmax."""
    s = cfg.segment
    stride = s.eval_stride or max(s.crop_size * 2 // 3, 1)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = sliding_logits(model, image.to(device), s.crop_size, stride, num_classes)
    return F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0].argmax(0)


@torch.no_grad()
def evaluate(
    model: Segmenter,
    dataset,
    cfg: Config,
    num_classes: int,
    names: list[str],
    device,
    amp_dtype,
    info: distributed.DistInfo | None = None,
) -> dict:
    """Sliding-window predictions, resized to each mask's size, scored by :func:`metrics.scores`; under
    torchrun each rank predicts its share of the images and the confusion matrices are summed."""
    was_training, info = model.training, info or distributed.DistInfo()
    model.eval()
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.long)
    mine = Subset(dataset, shard(len(dataset), info))
    for image, target in tqdm(
        DataLoader(mine, batch_size=None),
        desc="segment eval",
        leave=False,
        dynamic_ncols=True,
        disable=not info.is_main,
    ):
        prediction = predict(model, image, tuple(target.shape), cfg, num_classes, device, amp_dtype)
        matrix += confusion(prediction.cpu(), target, num_classes, IGNORE)
    matrix = distributed.all_sum(matrix.to(device)).cpu()
    model.train(was_training)
    return {**scores(matrix, names), "confusion": matrix.tolist()}


def segment(encoder: str | Path, cfg: Config, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Train ``cfg.segment``'s model from the encoder of a run directory, checkpoint or ``.safetensors``
    (``segment.which`` picks teacher or student); writes ``<output_dir>/segment`` (or ``out_dir``).
    Under torchrun ``segment.batch_size`` is the total over the processes."""
    s, start_time = cfg.segment, time.perf_counter()
    info, device, owns_group = distributed.setup_process(cfg.device, cfg.dist_timeout_s)
    amp_dtype = resolve_precision(cfg.precision, device)
    out = Path(out_dir or Path(cfg.output_dir) / "segment")
    train_pairs, val_pairs, names = segmentation_data(cfg)
    k = len(names)
    torch.manual_seed(cfg.seed)
    backbone = pyramid_of(encoder, s, s.crop_size)
    model = build_segmenter(backbone, s.head, k, s.channels, s.dropout, s.aux_weight).to(device)
    groups = optimizer_groups(model, s.weight_decay, s.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=s.lr, betas=tuple(s.betas), fused=True)  # fused: the guard skips NaN steps
    net = DistributedDataParallel(model) if info.enabled else model
    seed_process(cfg.seed, info.rank)  # the same initial weights, a drop path stream per rank
    log.info(
        "segmentation: %s head%s, %d classes, %d training / %d validation images, crop %d, strides %s (blocks %s)",
        s.head,
        f" + auxiliary FCN head (loss weight {s.aux_weight})" if model.aux is not None else "",
        k,
        len(train_pairs),
        len(val_pairs),
        s.crop_size,
        backbone.strides,
        backbone.indices,
    )
    m = cfg.data
    train_set = TrainSegDataset(train_pairs, k, s.crop_size, s.base_size, s.ratio_range, s.flip, m.mean, m.std)
    val_set = EvalSegDataset(val_pairs, k, s.base_size, m.mean, m.std)
    criterion = nn.CrossEntropyLoss(ignore_index=IGNORE)

    def loss_of(batch) -> torch.Tensor:
        images, targets = (t.to(device, non_blocking=True) for t in batch)
        return segmentation_loss(net(images), targets, criterion, s.aux_weight)

    with held_run(out, cfg.stop_signals, info.is_main, info.enabled, cfg.dist_timeout_s) as stop:  # one run per folder
        final, history = train_iterations(
            model,
            optimizer,
            lambda start: step_loader(train_set, s.batch_size, s.iters, cfg, start, device, info=info),
            loss_of,
            lambda: evaluate(model, val_set, cfg, k, names, device, amp_dtype, info),
            ("mIoU", "mAcc", "aAcc"),
            Schedule.of(s),
            out,
            to_yaml(cfg),
            device,
            amp_dtype,
            "segment",
            info,
            stop,
        )
    result = {
        "mIoU": final["mIoU"],
        "mAcc": final["mAcc"],
        "aAcc": final["aAcc"],
        "iters": s.iters,
        "head": s.head,
        "aux_weight": s.aux_weight if model.aux is not None else 0.0,
        "init": s.init,
        "num_classes": k,
        "train_images": len(train_pairs),
        "val_images": len(val_pairs),
        "val_pixels": final["pixels"],
        "strides": backbone.strides,
        "blocks": backbone.indices,
        "processes": info.world_size,
        "per_class": final["per_class"],
        "history": history,
        "seconds": round(time.perf_counter() - start_time, 1),
        "source": str(encoder),
        "output_dir": str(out),
    }
    if info.is_main:
        (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "confusion.json").write_text(json.dumps(final["confusion"]) + "\n")
        if s.pictures:
            model.eval()
            prediction_picture(
                [val_set[i] for i in range(min(s.pictures, len(val_set)))],
                lambda image, size: predict(model, image, size, cfg, k, device, amp_dtype),
                k,
                m.mean,
                m.std,
                out / "predictions.png",
            )
    if owns_group:
        distributed.teardown()
    return result
