"""Position parameters of a ViT at another patch grid, with timm's resizers.

One place for both users: fine-tuning at another resolution (``conmim.eval.transfer``) and
continued pre-training from existing weights (``conmim.train.init_weights``, ``model.init``).
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed, resize_rel_pos_bias_table


def grid_of(spec: dict[str, Any]) -> tuple[int, int]:
    """Patch grid of a timm spec (``img_size // patch_size``)."""
    kw = spec["kwargs"]
    size, patch = kw.get("img_size", 224), kw.get("patch_size", 16)
    size = size if isinstance(size, (list, tuple)) else (size, size)
    patch = patch if isinstance(patch, (list, tuple)) else (patch, patch)
    return size[0] // patch[0], size[1] // patch[1]


def resize_rel_pos_table(table: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """A (num_rel, heads) BEiT table for ``old_grid`` resized to ``new_grid``; unchanged at the same grid."""
    if tuple(old_grid) == tuple(new_grid):
        return table
    size = (2 * new_grid[0] - 1) * (2 * new_grid[1] - 1) + 3
    return resize_rel_pos_bias_table(
        table, new_window_size=tuple(new_grid), new_bias_shape=(size, table.shape[1]), old_window_size=tuple(old_grid)
    )


def resize_abs_pos_embed(
    pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], num_prefix_tokens: int = 1
) -> torch.Tensor:
    """A (1, prefix + patches, D) absolute embedding resampled (bicubic) to ``new_grid``; the prefix
    ([CLS]) entries are kept. Unchanged at the same grid."""
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    return resample_abs_pos_embed(
        pos_embed, new_size=list(new_grid), old_size=list(old_grid), num_prefix_tokens=num_prefix_tokens
    )


def resize_patch_kernel(weight: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """A (D, C, p, p) patch-embedding kernel resampled to another patch size (timm's FlexiViT-style
    pseudo-inverse resize, which keeps the embedding of resized patches close); unchanged if equal."""
    if tuple(weight.shape[-2:]) == tuple(patch):
        return weight
    return resample_patch_embed(weight, new_size=list(patch))
