"""A pre-trained ViT encoder as a 4-level feature pyramid (BEiT's fpn1-4, ViTDet's simple pyramid).

The encoder is the timm model :func:`conmim.eval.transfer.build_classifier` makes for fine-tuning
(per-block relative position tables from the shared one, position parameters resized to the dense
training resolution), pruned to the blocks the pyramid reads. timm's ``forward_intermediates``
returns those blocks' patch tokens as maps on the token grid (stride = patch size); each level then
rescales one map by a factor of ``scales``: 4 and 2 with transposed convolutions, 1 unchanged, 1/2
with max pooling. With BEiT's scales (4, 2, 1, 0.5) the strides are patch/4, patch/2, patch and
2*patch: 4, 8, 16, 32 at patch 16 (BEiT's ADE20K model), 1, 2, 4, 8 at patch 4 (the built-in
32-px encoders, whose 8x8 token grid would be 2x2 at stride 16). The levels are defined relative to
the token grid, not as absolute strides, so a small-patch encoder keeps its spatial detail.

The module is a torchvision detection backbone as well: ``out_channels`` is one integer and
``forward`` returns an ``OrderedDict`` of maps named ``"0"``..``"3"``, finest first.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from timm.layers import LayerNorm2d
from torch import nn
from torch.nn import functional as F

from ..eval.transfer import build_classifier

BEIT_SCALES = (4.0, 2.0, 1.0, 0.5)


def block_indices(depth: int, levels: int = 4) -> list[int]:
    """Blocks read by the pyramid, spread as BEiT's 3/5/7/11 of 12 (7/11/15/23 of 24): the blocks
    ending at 1/3, 1/2, 2/3 and all of the depth (0-based, at least block 0); shallow encoders may
    repeat a block."""
    if depth < 1:
        raise ValueError(f"depth={depth}: an encoder needs at least one block")
    if levels != 4:
        return [max(round(depth * (i + 1) / levels) - 1, 0) for i in range(levels)]
    return [max(round(depth * k / 12) - 1, 0) for k in (4, 6, 8, 12)]


def _rescale(dim: int, scale: float) -> nn.Module:
    """Upsampling by 2**k (transposed 2x2 convolutions with LayerNorm + GELU between), identity, or
    max pooling by 2**k. LayerNorm (ViTDet) instead of BEiT's SyncBN: it does not depend on the
    batch, so detection's batches of 1-2 images and a single process behave as large batches do."""
    k = math.log2(scale)
    if k != int(k):
        raise ValueError(f"segment.scales: {scale} is not a power of 2 (allowed: 8, 4, 2, 1, 0.5, 0.25, ...)")
    k = int(k)
    if k == 0:
        return nn.Identity()
    if k < 0:
        return nn.MaxPool2d(2**-k, 2**-k)
    layers: list[nn.Module] = []
    for i in range(k):
        if i:
            layers += [LayerNorm2d(dim), nn.GELU()]
        layers.append(nn.ConvTranspose2d(dim, dim, 2, 2))
    return nn.Sequential(*layers)


class ViTPyramid(nn.Module):
    """Feature pyramid of a timm BEiT or ViT encoder, fixed to one input resolution.

    ``forward(x)`` takes images up to the encoder's resolution; smaller ones (detection batches
    padded to a multiple of 32, non-square images) are zero-padded at the bottom and right to it and
    the maps cropped back, so positions keep the meaning they were trained with. ``features(x)``
    gives the raw per-block maps (the linear probe's input).
    """

    def __init__(
        self,
        encoder: nn.Module,
        indices: Sequence[int],
        scales: Sequence[float] = BEIT_SCALES,
        out_channels: int = 0,
    ):
        super().__init__()
        if len(indices) != len(scales):
            raise ValueError(f"{len(indices)} block indices for {len(scales)} pyramid scales")
        self.encoder, self.indices, self.scales = encoder, list(indices), [float(s) for s in scales]
        self.unique = sorted(set(self.indices))
        self.encoder.prune_intermediate_layers(self.unique, prune_norm=True, prune_head=True)
        dim = encoder.embed_dim
        self.patch = encoder.patch_embed.patch_size[0]
        self.img_size = tuple(encoder.patch_embed.img_size)
        self.rescale = nn.ModuleList(_rescale(dim, s) for s in self.scales)
        self.strides = [self.patch / s for s in self.scales]
        if any(s != int(s) or s < 1 for s in self.strides):
            raise ValueError(
                f"segment.scales={list(scales)} at patch {self.patch} give strides {self.strides}; "
                "each patch / scale must be a whole number >= 1"
            )
        self.strides = [int(s) for s in self.strides]
        self.project = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(dim, out_channels, 1, bias=False),
                LayerNorm2d(out_channels),
                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                LayerNorm2d(out_channels),
            )
            if out_channels
            else nn.Identity()
            for _ in self.scales
        )
        self.out_channels = out_channels or dim

    def pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """``x`` zero-padded at the bottom and right to the backbone's resolution, and its own (h, w)."""
        h, w = x.shape[-2:]
        H, W = self.img_size
        if h > H or w > W:
            raise ValueError(f"input {h}x{w} is larger than the backbone's resolution {H}x{W} (segment.crop_size)")
        return F.pad(x, (0, W - w, 0, H - h)), (h, w)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Patch-token maps (B, dim, H/patch, W/patch) of the blocks in ``indices``, in that order."""
        maps = self.encoder.forward_intermediates(x, indices=self.unique, intermediates_only=True)
        by_block = dict(zip(self.unique, maps, strict=True))
        return [by_block[i] for i in self.indices]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        x, (h, w) = self.pad(x)
        out = OrderedDict()
        for i, (feat, rescale, project, stride) in enumerate(
            zip(self.features(x), self.rescale, self.project, self.strides, strict=True)
        ):
            out[str(i)] = project(rescale(feat))[..., : math.ceil(h / stride), : math.ceil(w / stride)]
        return out


def build_backbone(
    weights: dict[str, torch.Tensor],
    spec: dict[str, Any],
    img_size: int = 0,
    scales: Sequence[float] = BEIT_SCALES,
    indices: Sequence[int] = (),
    drop_path: float = 0.1,
    out_channels: int = 0,
    fresh_scale: bool = False,
) -> ViTPyramid:
    """The pyramid of pre-trained encoder weights (``conmim.export.encoders.load_pretrained``).

    ``img_size`` 0 keeps the pre-training resolution; another one resizes the relative position
    tables and absolute embeddings as fine-tuning does. ``indices`` empty: :func:`block_indices`.
    ``fresh_scale``: the residual stream rescaled to a fresh patch embedding's size, as
    ``finetune.fresh_scale`` does (:func:`conmim.eval.transfer.build_classifier`).
    """
    patch = spec["kwargs"].get("patch_size", 16)
    if img_size and img_size % patch:
        raise ValueError(f"resolution {img_size} is not a multiple of the encoder's patch size {patch}")
    encoder, _spec = build_classifier(weights, spec, 0, img_size, drop_path, fc_norm=False, fresh_scale=fresh_scale)
    depth = len(encoder.blocks)
    indices = list(indices) or block_indices(depth, len(scales))
    if any(not 0 <= i < depth for i in indices):
        raise ValueError(f"segment.indices={indices}: blocks run from 0 to {depth - 1}")
    return ViTPyramid(encoder, indices, scales, out_channels)
