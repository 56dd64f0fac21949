"""The segmentation model: pyramid backbone + head, and its optimizer groups (layer-wise lr decay)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..eval.finetune import layer_decay_groups
from ..train.optim import param_groups
from .backbone import ViTPyramid
from .heads import FCNHead, LinearHead, UperNet


class Segmenter(nn.Module):
    """Logits (B, K, H, W) at the input's size. With a linear head the encoder is frozen (eval mode,
    no gradients) and the head reads the last pyramid block's token map; with UperNet everything trains.
    With an ``aux`` head (on the second-coarsest level, BEiT's third of four) training returns
    ``(logits, aux_logits)``; evaluation returns the logits alone."""

    def __init__(self, backbone: ViTPyramid, head: nn.Module, aux: nn.Module | None = None):
        super().__init__()
        self.backbone, self.head, self.aux = backbone, head, aux
        self.frozen = isinstance(head, LinearHead)
        if self.frozen:
            self.backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> Segmenter:
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.frozen:
            with torch.no_grad():
                x_pad, (h, w) = self.backbone.pad(x)
                feat = self.backbone.features(x_pad)[-1]
                p = self.backbone.patch
                feat = feat[..., : -(-h // p), : -(-w // p)]
            return _resize(self.head(feat), x)
        features = self.backbone(x)
        logits = _resize(self.head(features), x)
        if self.aux is not None and self.training:
            return logits, _resize(self.aux(list(features.values())[-2]), x)
        return logits


def _resize(logits: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(logits, size=like.shape[-2:], mode="bilinear", align_corners=False)


def build_segmenter(
    backbone: ViTPyramid, head: str, num_classes: int, channels: int, dropout: float, aux_weight: float = 0.0
) -> Segmenter:
    """A linear probe or UperNet; with ``aux_weight > 0`` UperNet gets the auxiliary FCN head, a third
    of UperNet's width (BEiT: 256 beside 768). The linear probe has none."""
    if head == "linear":
        return Segmenter(backbone, LinearHead(backbone.encoder.embed_dim, num_classes))
    aux = FCNHead(backbone.out_channels, num_classes, max(channels // 3, 1), dropout) if aux_weight > 0 else None
    return Segmenter(
        backbone, UperNet(backbone.out_channels, num_classes, channels, len(backbone.scales), dropout=dropout), aux
    )


def segmentation_loss(
    outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor, criterion, aux_weight: float
) -> torch.Tensor:
    """The main head's loss, plus ``aux_weight`` times the auxiliary head's when the model returned one."""
    if isinstance(outputs, tuple):
        logits, aux = outputs
        return criterion(logits.float(), targets) + aux_weight * criterion(aux.float(), targets)
    return criterion(outputs.float(), targets)


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
