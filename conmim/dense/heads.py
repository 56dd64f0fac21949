"""Segmentation heads on the pyramid: a compact UperNet (PPM + FPN fusion) and a linear probe head.

UperNet (Xiao et al., 2018) as BEiT's ADE20K model uses it: each level goes through a 1x1 lateral
convolution; the coarsest one instead through a pyramid pooling module (average pooling to 1, 2, 3
and 6 cells, 1x1 convolutions, upsampled and concatenated with the input, a 3x3 fusion); a top-down
path adds each coarser map, upsampled, to the next finer one; 3x3 convolutions smooth every level
but the coarsest; all levels, upsampled to the finest, are concatenated, fused by a 3x3 convolution,
dropped out and classified by a 1x1 convolution. Every convolution is followed by BatchNorm + ReLU.
The auxiliary FCN head (training only) adds a second, shallow path to the loss, as BEiT's ADE20K
model does, so the middle of the encoder gets a direct segmentation signal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F


def conv_bn_relu(cin: int, cout: int, kernel: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class PyramidPooling(nn.Module):
    """PSPNet's pooling module: context at several grid sizes, concatenated with the input, fused."""

    def __init__(self, cin: int, channels: int, pool_scales: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(cin, channels)) for s in pool_scales
        )
        self.fuse = conv_bn_relu(cin + len(pool_scales) * channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([x] + [_up(stage(x), x) for stage in self.stages], dim=1))


class UperNet(nn.Module):
    """Logits at the finest level's resolution from a pyramid ``{"0": finest, ..., "3": coarsest}``."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 512,
        levels: int = 4,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ):
        super().__init__()
        self.ppm = PyramidPooling(in_channels, channels, pool_scales)
        self.lateral = nn.ModuleList(conv_bn_relu(in_channels, channels) for _ in range(levels - 1))
        self.smooth = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in range(levels - 1))
        self.fuse = conv_bn_relu(levels * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        maps = list(features.values())
        top = self.ppm(maps[-1])
        laterals = [lat(m) for lat, m in zip(self.lateral, maps[:-1], strict=True)] + [top]
        for i in range(len(laterals) - 1, 0, -1):  # top-down: coarser into finer
            laterals[i - 1] = laterals[i - 1] + _up(laterals[i], laterals[i - 1])
        outs = [smooth(m) for smooth, m in zip(self.smooth, laterals[:-1], strict=True)] + [top]
        fused = self.fuse(torch.cat([outs[0]] + [_up(o, outs[0]) for o in outs[1:]], dim=1))
        return self.classifier(self.dropout(fused))


class FCNHead(nn.Module):
    """mmsegmentation's FCNHead as BEiT's auxiliary head configures it: one 3x3 convolution (no
    concatenation with the input), dropout, a 1x1 classifier."""

    def __init__(self, in_channels: int, num_classes: int, channels: int, dropout: float = 0.1):
        super().__init__()
        self.conv = conv_bn_relu(in_channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.conv(feature)))


class LinearHead(nn.Module):
    """BatchNorm (no affine) + 1x1 convolution on one frozen block's token map: the cheap probe.
    The BatchNorm fixes the feature scale as the linear probe's does (docs/evaluation.md)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels, affine=False)
        self.classifier = nn.Conv2d(in_channels, num_classes, 1)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.norm(feature))
