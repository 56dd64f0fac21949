"""Mask generators over any patch grid (spec §3). True = masked.

Each generator draws from an explicit ``torch.Generator``, so the data pipeline can seed it per
sample from (seed, epoch, index): masks then differ across workers and epochs (the official code's
NumPy masks repeated in every worker and every epoch, spec §14.6) and are reproducible on resume.
"""

from __future__ import annotations

import math

import torch


def random_mask(grid: tuple[int, int], ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Exactly round(ratio * N) patches, chosen uniformly."""
    h, w = grid
    n = h * w
    count = int(round(ratio * n))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=generator)[:count]] = True
    return mask


def random_unit_mask(
    grid: tuple[int, int], ratio: float, unit: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """SimMIM-style: ceil(units * ratio) units of ``unit`` x ``unit`` patches (official random_mps32)."""
    h, w = grid
    if h % unit or w % unit:
        raise ValueError(f"patch grid {h}x{w} does not divide into mask units of {unit}x{unit} patches")
    uh, uw = h // unit, w // unit
    count = math.ceil(uh * uw * ratio)
    units = torch.zeros(uh * uw, dtype=torch.bool)
    units[torch.randperm(uh * uw, generator=generator)[:count]] = True
    units = units.view(uh, uw)
    return units.repeat_interleave(unit, 0).repeat_interleave(unit, 1).reshape(-1)


def block_mask(
    grid: tuple[int, int],
    ratio: float,
    min_patches: int = 16,
    aspect: float = 0.3,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """BEiT blockwise masking towards round(ratio * N) patches (spec §3.1); may end a little short."""
    h, w = grid
    target = int(round(ratio * h * w))
    min_patches = min(min_patches, target)
    mask = torch.zeros(h, w, dtype=torch.bool)
    log_lo, log_hi = math.log(aspect), math.log(1.0 / aspect)

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * torch.rand((), generator=generator).item()

    def randint(lo: int, hi: int) -> int:  # inclusive bounds
        return int(torch.randint(lo, hi + 1, (), generator=generator))

    count = 0
    while count < target:
        remaining = target - count
        added = 0
        for _attempt in range(10):
            area = uniform(min_patches, remaining)
            r = math.exp(uniform(log_lo, log_hi))
            bh, bw = int(round(math.sqrt(area * r))), int(round(math.sqrt(area / r)))
            if not (0 < bh < h and 0 < bw < w):
                continue
            top, left = randint(0, h - bh), randint(0, w - bw)
            block = mask[top : top + bh, left : left + bw]
            new = int((~block).sum())
            if 0 < new <= remaining:
                block.fill_(True)
                added = new
                break
        if added == 0:
            break
        count += added
    return mask.reshape(-1)


class MaskGenerator:
    """Callable ``(generator) -> (N,) bool`` for a configured type, ratio and grid."""

    def __init__(
        self,
        grid: tuple[int, int],
        kind: str = "random_unit",
        ratio: float = 0.75,
        unit: int = 2,
        min_block_patches: int = 16,
        block_aspect: float = 0.3,
    ):
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"mask ratio must be strictly between 0 and 1, got {ratio}")
        if kind == "random_unit" and (grid[0] % unit or grid[1] % unit):
            raise ValueError(
                f"patch grid {grid[0]}x{grid[1]} does not divide into mask units of "
                f"{unit}x{unit} patches; change mask.unit, model.img_size or model.patch_size"
            )
        if kind not in ("random_unit", "block", "random"):
            raise ValueError(f"unknown mask type {kind!r}; choose random_unit, block or random")
        self.grid, self.kind, self.ratio, self.unit = tuple(grid), kind, ratio, unit
        self.min_block_patches, self.block_aspect = min_block_patches, block_aspect

    def __call__(self, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.kind == "random_unit":
            return random_unit_mask(self.grid, self.ratio, self.unit, generator)
        if self.kind == "block":
            return block_mask(self.grid, self.ratio, self.min_block_patches, self.block_aspect, generator)
        return random_mask(self.grid, self.ratio, generator)

    @classmethod
    def from_config(cls, mask_cfg, img_size: int, patch_size: int) -> MaskGenerator:
        grid = (img_size // patch_size, img_size // patch_size)
        return cls(
            grid, mask_cfg.type, mask_cfg.ratio, mask_cfg.unit, mask_cfg.min_block_patches, mask_cfg.block_aspect
        )
