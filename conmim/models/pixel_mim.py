"""Pixel-regression MIM baseline (MAE / SimMIM style) inside the ConMIM framework.

The control for "is the denoising-contrast target better than a pixel target?" (docs/method.md §14): the same
encoder, masks, views, optimiser and budget as ConMIM, but the student's masked-token outputs go
through one linear layer that regresses the per-patch normalised pixels (MAE's ``norm_pix_loss``)
of the student's own input (the weak view). There is no teacher: ``teacher.encoder`` is the
student's encoder, so export, k-NN and fine-tuning read the trained weights under the usual names.
Selected by ``model.objective: pixel``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .conmim import Branch, init_student, kwargs_from, timm_spec


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, patch * patch * C), patches in row-major order like the encoder's tokens."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def normalized_patches(images: torch.Tensor, patch: int, eps: float = 1e-6) -> torch.Tensor:
    """Each patch's pixels standardised by its own mean and variance (MAE's normalised-pixel target)."""
    x = patchify(images.float(), patch)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True)
    return (x - mean) / (var + eps).sqrt()


def pixel_regression_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean squared error over masked patches, masked-patch retrieval accuracy), in fp32.

    The accuracy is the pixel analogue of ConMIM's metric: a masked patch counts as a hit when its
    prediction is more cosine-similar to its own target patch than to any other patch of the image,
    so the two objectives' pre-training curves can be read on the same scale.
    """
    with torch.autocast(device_type=pred.device.type, enabled=False):
        pred, target = pred.float(), target.float()
        weight = mask.float()
        count = weight.sum().clamp_min(1.0)
        loss = (((pred - target) ** 2).mean(-1) * weight).sum() / count
        sim = torch.bmm(F.normalize(pred, dim=-1), F.normalize(target, dim=-1).transpose(1, 2))
        own = torch.arange(sim.shape[1], device=sim.device)
        hits = (sim.argmax(-1) == own).float()
        accuracy = (hits * weight).sum() / count
    return loss, accuracy


class EncoderAlias(nn.Module):
    """Holds the student's encoder under ``teacher.encoder`` so checkpoints carry both names."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder


class PixelMIM(nn.Module):
    """Student Branch with a linear pixel head in place of the projector; the engine's interface of ConMIM
    but for the teacher EMA (``teacher`` is the student's encoder, so there is nothing to update)."""

    def __init__(
        self,
        arch: str = "vit_small",
        img_size: int = 224,
        patch_size: int = 16,
        *,
        encoder: str = "beit",
        in_chans: int = 3,
        depth: int = 0,
        init_values: float = 0.1,
        drop_path: float = 0.0,
        trunc_normal_1std: bool = True,
        pos_embed: str = "none",
        rel_pos_init: str = "zero",
    ):
        super().__init__()
        common = dict(
            arch=arch,
            img_size=img_size,
            patch_size=patch_size,
            encoder=encoder,
            in_chans=in_chans,
            depth=depth,
            init_values=init_values,
            pos_embed=pos_embed,
        )
        self.spec = timm_spec(**common, drop_path=0.0)
        self.patch_size = patch_size
        self.student = Branch(timm_spec(**common, drop_path=drop_path), 1, 1, mask_pos=pos_embed == "mask_sincos")
        self.student.projector = nn.Linear(self.student.encoder.embed_dim, patch_size * patch_size * in_chans)
        init_student(self.student, trunc_normal_1std, pos_embed, rel_pos_init)
        self.teacher = EncoderAlias(self.student.encoder)

    @classmethod
    def from_config(cls, m: Any) -> PixelMIM:
        """Build from a :class:`conmim.config.ModelConfig` (projector and temperature fields are unused)."""
        return cls(**kwargs_from(cls, m))

    def forward_with_stats(
        self, weak: torch.Tensor, strong: torch.Tensor, mask: torch.Tensor, student: nn.Module | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, retrieval accuracy); ``strong`` is unused: the target is the student's own input."""
        predictions = (student or self.student)(weak, mask)
        return pixel_regression_loss(predictions, normalized_patches(weak, self.patch_size), mask)

    def forward(self, weak: torch.Tensor, strong: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.forward_with_stats(weak, strong, mask)[0]
