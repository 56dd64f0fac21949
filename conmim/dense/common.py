"""What the dense commands share: the encoder as a pyramid, the built-in scenes, the step loader."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from ..config import Config, DenseTrainConfig
from ..data.sources import FASHION_MNIST_DIR, DataError
from ..export.encoders import load_pretrained, random_weights
from ..runtime import distributed
from . import scenes
from .backbone import ViTPyramid, build_backbone
from .data import StepSampler

log = logging.getLogger(__name__)


def pyramid_of(encoder: str | Path, s: DenseTrainConfig, img_size: int, out_channels: int = 0) -> ViTPyramid:
    """The pyramid of a run directory, checkpoint or ``.safetensors`` as the dense section ``s`` asks
    (``which`` picks teacher or student, ``init="random"`` keeps the architecture with timm's
    initialisation: the scratch baseline; ``scales``, ``indices``, ``drop_path``)."""
    weights, spec = load_pretrained(encoder, s.which)
    if s.init == "random":
        weights = random_weights(spec)
    try:
        return build_backbone(weights, spec, img_size, s.scales, s.indices, s.drop_path, out_channels)
    except ValueError as err:  # scales or indices that do not fit this encoder
        raise DataError(f"{encoder}: {err}") from None


def builtin_scenes(cfg: Config) -> Path:
    """The folder of the built-in scenes of ``cfg.scenes``, generated on first use (under torchrun by
    rank 0, while the others wait, so that no two processes write the same files)."""
    sc = cfg.scenes
    params = scenes.SceneParams(sc.train, sc.val, sc.size, sc.seed)
    fm = cfg.data.path if cfg.data.source == "fashion_mnist" else FASHION_MNIST_DIR
    with distributed.main_first():
        if not Path(sc.dir).exists():
            log.info("writing the built-in scenes to %s (%d training, %d validation)", sc.dir, sc.train, sc.val)
        return scenes.ensure(sc.dir, params, fm)


def shard(count: int, info: distributed.DistInfo) -> range:
    """This rank's share of ``count`` evaluation items (every world_size-th one)."""
    return range(info.rank, count, info.world_size)


def step_loader(
    dataset: Dataset,
    batch_size: int,
    iters: int,
    cfg: Config,
    start: int,
    device: torch.device,
    collate=None,
    info: distributed.DistInfo | None = None,
) -> DataLoader:
    """This rank's part of the batches of iterations ``start..iters-1`` (``batch_size`` in total over
    the processes), each a function of ``seed`` and the iteration."""
    info = info or distributed.DistInfo()
    sampler = StepSampler(len(dataset), batch_size, iters, cfg.seed, start, info.rank, info.world_size)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
        collate_fn=collate,
        generator=torch.Generator(),  # its base seed would otherwise come from the global RNG that resume restores
    )
