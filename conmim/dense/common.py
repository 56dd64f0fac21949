"""What the dense commands share: the encoder as a pyramid, the built-in scenes, the step loader."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from ..config import Config, DenseTrainConfig
from ..data import scenes
from ..data.sources import DataError
from ..export.encoders import load_pretrained, random_weights
from ..runtime import distributed
from ..runtime.preemption import StopSignalLoader
from .backbone import ViTPyramid, build_backbone
from .data import StepSampler


def pyramid_of(encoder: str | Path, s: DenseTrainConfig, img_size: int, out_channels: int = 0) -> ViTPyramid:
    """The pyramid of a run directory, checkpoint or ``.safetensors`` as the dense section ``s`` asks
    (``which`` picks teacher or student, ``init="random"`` keeps the architecture with timm's
    initialisation: the scratch baseline; ``scales``, ``indices``, ``drop_path``)."""
    weights, spec = load_pretrained(encoder, s.which)
    if s.init == "random":
        weights = random_weights(spec)
    try:
        fresh = s.fresh_scale and s.init != "random"
        return build_backbone(weights, spec, img_size, s.scales, s.indices, s.drop_path, out_channels, fresh)
    except ValueError as err:  # scales or indices that do not fit this encoder
        raise DataError(f"{encoder}: {err}") from None


def builtin_scenes(cfg: Config) -> Path:
    """The folder of the built-in scenes of ``cfg.scenes`` (:func:`conmim.data.scenes.builtin`)."""
    return scenes.builtin(cfg.scenes, cfg.data)


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
    return StopSignalLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
        collate_fn=collate,
        stop_signals=cfg.stop_signals,
        generator=torch.Generator(),  # its base seed would otherwise come from the global RNG that resume restores
    )
