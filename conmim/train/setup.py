"""Setting up a pre-training run before its first step: the checks that need the data, the step plan
(steps, warm-up, lr after the batch-size rule) and the data loader."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..config import Config, ConfigError
from ..data.channels import check_first_images
from ..data.gpu_views import EncodedPretrainDataset, collate_encoded
from ..data.masking import MaskGenerator
from ..data.pretrain import EpochSampler, PretrainDataset
from ..data.scenes import source_for
from ..data.views import PairedViews
from ..runtime import distributed
from ..runtime.preemption import StopSignalLoader


def check_writable(folder: Path) -> None:
    """Fail before any work when the output folder cannot be created or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test.{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"output_dir={str(folder)!r} is not writable: {err.strerror or err}") from None


@dataclass
class Plan:
    """Step counts derived once, so every schedule has the same length."""

    steps_per_epoch: int  # optimizer steps
    total_steps: int  # length of every schedule
    run_steps: int  # where this run stops (train.max_steps caps it)
    warmup_steps: int
    lr: float  # peak lr after the batch-size rule
    total_batch: int


def make_plan(cfg: Config, micro_steps_per_epoch: int, world_size: int) -> Plan:
    t = cfg.train
    steps_per_epoch = max(micro_steps_per_epoch // t.accum_steps, 1)
    total = steps_per_epoch * t.epochs
    total_batch = t.batch_size * t.accum_steps * world_size
    return Plan(
        steps_per_epoch,
        total,
        min(total, t.max_steps) if t.max_steps else total,
        int(round(t.warmup_epochs * steps_per_epoch)),
        t.base_lr * total_batch / 256,
        total_batch,
    )


def preflight(cfg: Config, dist: distributed.DistInfo, device: torch.device):
    """Checks that need the data, the device or the process group, before any model is built.

    Returns the data source. ``train.batch_size`` is per process, so the batch can never be smaller
    than the number of ranks; what can fail is the data filling one batch on every rank.
    """
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device!r} is not allowed: no CUDA device is visible; use auto or cpu")
    if cfg.resume and not Path(cfg.resume).is_file():
        raise ConfigError(f"resume={cfg.resume!r} is not allowed: no such checkpoint file")
    if cfg.model.init and not Path(cfg.model.init).exists():
        raise ConfigError(f"model.init={cfg.model.init!r} is not allowed: no such file or folder")
    source = source_for(cfg)
    check_first_images(source, cfg.model.in_chans)
    b, w = cfg.train.batch_size, dist.world_size
    if len(source) // w < b:
        raise ConfigError(
            f"train.batch_size={b} is not allowed: {len(source)} images split over {w} process(es) "
            f"fill no batch of {b} per process; use at most {len(source) // w}"
        )
    if dist.is_main:
        check_writable(Path(cfg.output_dir))
    return source


def build_loader(
    cfg: Config, dist: distributed.DistInfo, start_micro_step: int, source=None, skip_log: Path | None = None
) -> tuple[DataLoader, EpochSampler, PretrainDataset]:
    """The pre-training loader. Its own generator keeps the main process's torch RNG untouched when
    an iterator starts (a resumed run must draw drop-path masks from exactly the saved RNG state)."""
    m, d = cfg.model, cfg.data
    source = source if source is not None else source_for(cfg)
    views = PairedViews.from_config(m, d)
    masks = MaskGenerator.from_config(cfg.mask, m.img_size, m.patch_size)
    dataset_cls = EncodedPretrainDataset if d.gpu_aug else PretrainDataset
    dataset = dataset_cls(source, views, masks, cfg.seed, d.on_error, skip_log)
    sampler = EpochSampler(
        len(dataset), cfg.train.batch_size, dist.rank, dist.world_size, cfg.seed, start_step=start_micro_step
    )
    loader = StopSignalLoader(
        dataset,
        batch_size=cfg.train.batch_size,
        sampler=sampler,
        num_workers=d.num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=True,
        collate_fn=collate_encoded if d.gpu_aug else None,
        persistent_workers=d.num_workers > 0,
        prefetch_factor=4 if d.num_workers > 0 else None,
        stop_signals=cfg.stop_signals,
        # its own generator: creating the iterator must not draw from the global RNG,
        # or a resumed run's drop-path draws would shift
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    return loader, sampler, dataset
