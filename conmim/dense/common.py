"""What the dense commands share: the encoder as a pyramid, the built-in scenes, the step loader."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from ..config import Config
from ..data.sources import FASHION_MNIST_DIR, DataError
from ..export.encoders import load_pretrained, random_weights
from . import scenes
from .backbone import ViTPyramid, build_backbone
from .data import StepSampler

log = logging.getLogger(__name__)


def pyramid_of(
    encoder: str | Path,
    cfg: Config,
    img_size: int,
    scales: Sequence[float],
    indices: Sequence[int],
    drop_path: float,
    init: str = "pretrained",
    out_channels: int = 0,
) -> ViTPyramid:
    """The pyramid of a run directory, checkpoint or ``.safetensors`` (``cfg.eval.which`` picks teacher
    or student); ``init="random"`` keeps the architecture with timm's initialisation (the scratch baseline)."""
    weights, spec = load_pretrained(encoder, cfg.eval.which)
    if init == "random":
        weights = random_weights(spec)
    try:
        return build_backbone(weights, spec, img_size, scales, indices, drop_path, out_channels)
    except ValueError as err:  # scales or indices that do not fit this encoder
        raise DataError(f"{encoder}: {err}") from None


def builtin_scenes(cfg: Config) -> Path:
    """The folder of the built-in scenes of ``cfg.scenes``, generated on first use."""
    sc = cfg.scenes
    params = scenes.SceneParams(sc.train, sc.val, sc.size, sc.seed)
    fm = cfg.data.path if cfg.data.source == "fashion_mnist" else FASHION_MNIST_DIR
    if not Path(sc.dir).exists():
        log.info("writing the built-in scenes to %s (%d training, %d validation)", sc.dir, sc.train, sc.val)
    return scenes.ensure(sc.dir, params, fm)


def step_loader(
    dataset: Dataset, batch_size: int, iters: int, cfg: Config, start: int, device: torch.device, collate=None
) -> DataLoader:
    """Batches of iterations ``start..iters-1``, each a function of ``train.seed`` and the iteration."""
    return DataLoader(
        dataset,
        batch_sampler=StepSampler(len(dataset), batch_size, iters, cfg.train.seed, start),
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
        collate_fn=collate,
        generator=torch.Generator(),  # its base seed would otherwise come from the global RNG that resume restores
    )
