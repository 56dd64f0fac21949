"""Linear probe: a BatchNorm without affine + a linear head on a frozen encoder (MAE's protocol).

The paper reports no linear probe (docs/method.md §11.4); this is ours. The BatchNorm fixes the scale of
features that differ wildly between blocks and pretext tasks, so one learning rate fits all. With
``cache_features`` the encoder runs once over centre crops and the head trains on the cache (fast,
no augmentation); without it every epoch sees fresh random crops through the frozen encoder.
"""

from __future__ import annotations

import json
import math
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.optim import Lars
from timm.utils import accuracy
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2 as T
from tqdm import tqdm

from ..config import Config
from ..runtime.device import autocast, resolve_precision
from ..train.schedules import warmup_cosine
from .common import ChannelTransform, EvalTransform, LabeledDataset, check_channels, img_size_of, num_classes_of
from .knn import encode, extract_features


def probe_transform(img_size: int, mean, std, scale_min: float = 0.08) -> ChannelTransform:
    """RandomResizedCrop (bicubic) + flip + normalise, for probes without a feature cache; photos and
    uint8 arrays of ``len(mean)`` channels alike (``PILToTensor`` passes arrays through)."""
    return ChannelTransform(
        T.Compose(
            [
                T.RandomResizedCrop(img_size, (scale_min, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                T.RandomHorizontalFlip(),
                T.PILToTensor(),
                T.ToDtype(torch.float32, scale=True),
                T.Normalize(list(mean), list(std)),
            ]
        ),
        len(mean),
    )


def probe_head(dim: int, num_classes: int) -> nn.Sequential:
    """BatchNorm1d(affine=False) then Linear, the linear layer initialised with std 0.01 (MAE)."""
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    return head


def resolve_encoder(encoder: nn.Module | str | Path, which: str = "teacher") -> nn.Module:
    """A timm encoder, or one loaded from an export / run directory / checkpoint path."""
    if isinstance(encoder, nn.Module):
        return encoder
    from ..export.encoders import load_encoder

    return load_encoder(encoder, which)


def linear_probe(
    encoder: nn.Module | str | Path,
    train_source,
    test_source,
    cfg: Config | None = None,
    device: str | torch.device = "cpu",
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train a linear head on frozen features of ``train_source``; top-1/top-5 (%) on ``test_source``.

    Uses ``cfg.linprobe`` (block, pooling, optimizer, schedule), ``cfg.data`` (mean, std, workers,
    crop scale), ``cfg.eval.batch_size`` and ``cfg.precision`` for feature extraction.
    Writes ``metrics.jsonl`` and ``results.json`` into ``out_dir`` when given.
    """
    cfg, device, start = cfg or Config(), torch.device(device), time.perf_counter()
    p, d = cfg.linprobe, cfg.data
    amp_dtype = resolve_precision(cfg.precision, device)  # encoder forward only; the head trains in fp32
    torch.manual_seed(cfg.seed)
    encoder = resolve_encoder(encoder, cfg.eval.which).to(device)
    check_channels(encoder, d.mean)
    was_training = encoder.training
    encoder.eval()  # frozen: eval mode, and features only ever computed under no_grad
    size, classes = img_size_of(encoder), num_classes_of(train_source, test_source)
    test = LabeledDataset(test_source, EvalTransform(size, d.mean, d.std))
    test_x, test_y = extract_features(
        encoder, test, cfg.eval.batch_size, p.pool, device, d.num_workers, "probe test features", p.block, amp_dtype
    )
    if p.cache_features:
        train_x, train_y = extract_features(
            encoder,
            LabeledDataset(train_source, EvalTransform(size, d.mean, d.std)),
            cfg.eval.batch_size,
            p.pool,
            device,
            d.num_workers,
            "probe train features",
            p.block,
            amp_dtype,
        )
        batches, steps_per_epoch = cached_batches(train_x, train_y, p.batch_size)
    else:
        train = LabeledDataset(train_source, probe_transform(size, d.mean, d.std, d.crop_scale_min))
        batches = partial(_encoded_batches, encoder, train, p, device, d.num_workers, amp_dtype)
        steps_per_epoch = math.ceil(len(train) / p.batch_size)
    log = _Log(out_dir)
    top1, top5, lr = fit_head(batches, steps_per_epoch, test_x, test_y, classes, p, device, cfg.seed, log)
    encoder.train(was_training)
    result = {
        "top1": top1,
        "top5": top5,
        "epochs": p.epochs,
        "block": p.block,
        "pool": p.pool,
        "optimizer": p.optimizer,
        "lr": lr,
        "cache_features": p.cache_features,
        "feature_dim": test_x.shape[1],
        "train_images": len(train_source),
        "test_images": len(test_source),
        "num_classes": classes,
        "seconds": round(time.perf_counter() - start, 1),
    }
    log.finish(result)
    return result


def fit_head(
    batches,
    steps_per_epoch: int,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    classes: int,
    p,
    device: torch.device,
    seed: int = 0,
    log: _Log | None = None,
) -> tuple[float, float, float]:
    """Train :func:`probe_head` with ``cfg.linprobe``'s optimizer and schedule on the feature batches
    that ``batches(generator)`` yields each epoch; (top-1 %, top-5 %, peak lr) on the test features."""
    torch.manual_seed(seed)
    head = probe_head(test_x.shape[1], classes).to(device)
    lr = train_head(head, batches, steps_per_epoch, p, device, seed, log)
    with torch.no_grad():
        top1, top5 = accuracy(head(test_x.to(device)), test_y.to(device), topk=(1, min(5, classes)))
    return top1.item(), top5.item(), lr


def train_head(
    head: nn.Module, batches, steps_per_epoch: int, p, device: torch.device, seed: int = 0, log: _Log | None = None
) -> float:
    """Train ``head`` in place on cached features with ``p``'s (a :class:`LinProbeConfig`) optimizer,
    epochs and warm-up + cosine schedule; leaves it in eval mode and returns the peak lr."""
    lr = p.base_lr * p.batch_size / 256
    opt_cls = Lars if p.optimizer == "lars" else torch.optim.SGD
    optimizer = opt_cls(head.parameters(), lr=lr, momentum=p.momentum, weight_decay=p.weight_decay)
    total, warmup = p.epochs * steps_per_epoch, int(round(p.warmup_epochs * steps_per_epoch))
    step, gen = 0, torch.Generator().manual_seed(seed)
    for epoch in tqdm(range(p.epochs), desc="linear head", dynamic_ncols=True, leave=False):
        head.train()
        loss_sum, seen = 0.0, 0
        for x, y in batches(gen):
            for group in optimizer.param_groups:
                group["lr"] = warmup_cosine(step, total, lr, 0.0, warmup)
            loss = F.cross_entropy(head(x.to(device)), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum, seen, step = loss_sum + loss.item() * len(y), seen + len(y), step + 1
        if log:
            log.write(
                {"step": step, "epoch": epoch + 1, "train_loss": loss_sum / seen, "lr": optimizer.param_groups[0]["lr"]}
            )
    head.eval()
    return lr


def cached_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int):
    """A ``batches(generator)`` callable over cached features: a fresh shuffle every epoch."""
    return partial(_cached_batches, x, y, batch_size), math.ceil(len(x) / batch_size)


def probe_cached(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    classes: int,
    p,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> float:
    """Linear-probe top-1 (%) on features extracted already (the final summary of pre-training)."""
    return fit_head(
        *cached_batches(train_x, train_y, p.batch_size), test_x, test_y, classes, p, torch.device(device), seed
    )[0]


def _cached_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, gen: torch.Generator):
    order = torch.randperm(len(x), generator=gen)
    for i in range(0, len(x), batch_size):
        idx = order[i : i + batch_size]
        if len(idx) > 1:  # BatchNorm needs two samples
            yield x[idx], y[idx]


def _encoded_batches(
    encoder: nn.Module, dataset, p, device: torch.device, workers: int, amp_dtype, gen: torch.Generator
):
    loader = DataLoader(
        dataset,
        batch_size=p.batch_size,
        shuffle=True,
        generator=gen,
        num_workers=workers,
        drop_last=len(dataset) > p.batch_size,
    )
    for images, y in loader:
        with torch.no_grad(), autocast(device, amp_dtype):
            feats = encode(encoder, images.to(device, non_blocking=True), p.pool, p.block).float()
        yield feats, y


class _Log:
    """``metrics.jsonl`` per epoch and ``results.json`` at the end, when an output folder is given."""

    def __init__(self, out_dir: str | Path | None):
        self.out = Path(out_dir) if out_dir else None
        if self.out:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "metrics.jsonl").write_text("")

    def write(self, record: dict) -> None:
        if self.out:
            with (self.out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")

    def finish(self, result: dict) -> None:
        if self.out:
            (self.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
