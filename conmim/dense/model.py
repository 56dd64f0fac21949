"""The segmentation model: pyramid backbone + head, and its optimizer groups (layer-wise lr decay)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..eval.finetune import layer_decay_groups
from ..train.optim import param_groups
from .backbone import ViTPyramid
from .heads import LinearHead, UperNet


class Segmenter(nn.Module):
    """Logits (B, K, H, W) at the input's size. With a linear head the encoder is frozen (eval mode,
    no gradients) and the head reads the last pyramid block's token map; with UperNet everything trains."""

    def __init__(self, backbone: ViTPyramid, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.frozen = isinstance(head, LinearHead)
        if self.frozen:
            self.backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> Segmenter:
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            with torch.no_grad():
                x_pad, (h, w) = self.backbone.pad(x)
                feat = self.backbone.features(x_pad)[-1]
                p = self.backbone.patch
                feat = feat[..., : -(-h // p), : -(-w // p)]
            logits = self.head(feat)
        else:
            logits = self.head(self.backbone(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def build_segmenter(backbone: ViTPyramid, head: str, num_classes: int, channels: int, dropout: float) -> Segmenter:
    if head == "linear":
        return Segmenter(backbone, LinearHead(backbone.encoder.embed_dim, num_classes))
    return Segmenter(
        backbone, UperNet(backbone.out_channels, num_classes, channels, len(backbone.scales), dropout=dropout)
    )


def _outside(model: nn.Module, inner: nn.Module) -> list[nn.Module]:
    """The largest sub-modules of ``model`` that do not contain ``inner``."""
    found = []
    for child in model.children():
        if child is inner:
            continue
        if any(m is inner for m in child.modules()):
            found += _outside(child, inner)
        else:
            found.append(child)
    return found


def layer_decay_groups_around(
    model: nn.Module, encoder: nn.Module, weight_decay: float, layer_decay: float
) -> list[dict]:
    """AdamW groups of a dense model around its encoder. Encoder: timm's layer-decay groups with
    BEiT's ``LayerDecayOptimizerConstructor`` scales (block i of L: decay ** (L - i), patch embedding
    decay ** (L + 1)); everything else (pyramid necks, heads): full lr, no decay on 1-D parameters
    (pre-training's grouping). Parameters that do not train are left out."""
    groups = []
    if any(p.requires_grad for p in encoder.parameters()):
        groups = layer_decay_groups(encoder, weight_decay, layer_decay)
        for g in groups:  # timm counts the top block as the top layer of a headless encoder; BEiT's head sits above it
            g["lr_scale"] *= layer_decay
    for g in param_groups(nn.ModuleList(_outside(model, encoder)), weight_decay):
        g.pop("wd_scale")
        groups.append({**g, "lr_scale": 1.0})
    return [g for g in groups if g["params"]]


def optimizer_groups(model: Segmenter, weight_decay: float, layer_decay: float) -> list[dict]:
    """The segmentation model's groups (:func:`layer_decay_groups_around`); a frozen encoder adds none."""
    return layer_decay_groups_around(model, model.backbone.encoder, weight_decay, layer_decay)
