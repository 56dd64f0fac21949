"""MAE-style pixel baseline (He et al., 2021) inside the ConMIM framework: ``model.objective: mae``.

Where the ``pixel`` baseline (:mod:`conmim.models.pixel_mim`) puts mask tokens into the encoder
(SimMIM), here the encoder, a plain timm ViT with a fixed 2-D sin-cos absolute position embedding,
sees only [CLS] and the visible patches. A light decoder (``decoder_depth`` transformer blocks of
width ``decoder_dim``, its own fixed sin-cos positions) takes the encoded visible tokens projected
to its width, plus one shared learned mask token at every masked position, all back in image order;
a linear head predicts each patch's pixels. The loss is the mean squared error over the masked
patches only, against each patch's pixels normalised by its own mean and variance
(``norm_pix_loss``; off: the data-normalised pixels).

Stacking the visible tokens needs the same number of masked patches in every image: ``mask.type``
``random`` (exactly round(ratio * N)) or ``random_unit`` (a fixed number of units) give that, the
configuration refuses ``block`` (:func:`conmim.config.checks.check_mask`). Only the weak view is
used; there is no teacher and no EMA: ``teacher.encoder`` is the student's encoder, as in the pixel
baseline, so export, k-NN, fine-tuning and the final evaluation read the trained ViT under the usual names.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from timm.layers import build_sincos2d_pos_embed
from timm.models import checkpoint
from timm.models.vision_transformer import Block
from torch import nn

from .conmim import init_student, kwargs_from, timm_spec
from .pixel_mim import EncoderAlias, normalized_patches, patchify, pixel_regression_loss


def sincos_with_cls(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """(1, 1 + N, dim): the fixed 2-D sin-cos pattern of the patch grid after a zero [CLS] entry."""
    table = build_sincos2d_pos_embed(list(grid), dim)
    return torch.cat((torch.zeros(1, dim), table))[None]


def visible_first(mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the (B, N) patch order with the visible patches first, each part in image order; the number
    of visible patches per image). Reads the per-image masked counts back to the host (one sync):
    the encoder's input length must be known, and it must be the same for every image."""
    counts = mask.sum(1)
    low, high = (int(v) for v in torch.stack((counts.min(), counts.max())).tolist())
    if low != high:
        raise ValueError(
            f"model.objective=mae needs the same number of masked patches in every image, got {low} to {high} "
            "in one batch; use mask.type=random or random_unit"
        )
    order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)
    return order, mask.shape[1] - high


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` (B, K) of each image's tokens ``x`` (B, N, D)."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class MAEStudent(nn.Module):
    """Encoder (timm ViT, visible patches only) + light decoder + pixel head; what the optimizer steps."""

    def __init__(
        self,
        spec: dict[str, Any],
        out_dim: int,
        decoder_depth: int = 2,
        decoder_dim: int = 128,
        decoder_heads: int = 4,
    ):
        super().__init__()
        self.encoder = timm.create_model(spec["model_name"], pretrained=False, **spec["kwargs"])
        self.is_beit = False  # for init_student: no relative position table to initialise
        dim = self.encoder.embed_dim
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        # deterministic: rebuilt with the model, not in checkpoints
        self.register_buffer("decoder_pos", sincos_with_cls(self.grid_size, decoder_dim), persistent=False)
        self.decoder_blocks = nn.Sequential(
            *[Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, out_dim)

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.encoder.patch_embed.grid_size)  # type: ignore[return-value]

    @torch.no_grad()
    def fix_position_embedding(self) -> None:
        """The encoder's absolute position embedding becomes the fixed 2-D sin-cos pattern (frozen)."""
        pos = self.encoder.pos_embed
        pos.copy_(sincos_with_cls(self.grid_size, pos.shape[-1]))
        pos.requires_grad_(False)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the encoder's block activations in backward (the decoder is small: kept)."""
        self.encoder.set_grad_checkpointing(enable)

    def encode(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the encoder's output for [CLS] and the visible patches, (B, 1 + V, D), after its final
        norm; the patch order of :func:`visible_first`). Masked patches never enter the encoder."""
        enc = self.encoder
        order, visible = visible_first(mask)
        x = _take(enc.patch_embed(images) + enc.pos_embed[:, 1:], order[:, :visible])
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = enc.norm_pre(enc.pos_drop(torch.cat((cls.to(x.dtype), x), dim=1)))
        recompute = enc.grad_checkpointing and torch.is_grad_enabled()
        for blk in enc.blocks:
            x = checkpoint(blk, x) if recompute else blk(x)
        return enc.norm(x), order

    def decode(self, tokens: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """Pixel predictions (B, N, out_dim) for every patch from the encoded visible tokens."""
        y = self.decoder_embed(tokens)
        b, n = order.shape
        fill = self.mask_token.to(y.dtype).expand(b, n - (y.shape[1] - 1), -1)
        patches = _take(torch.cat((y[:, 1:], fill), dim=1), torch.argsort(order, dim=1))  # back to image order
        x = torch.cat((y[:, :1], patches), dim=1) + self.decoder_pos.to(y.dtype)
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x[:, 1:])

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.decode(*self.encode(images, mask))


class MAE(nn.Module):
    """The MAE baseline with the engine's interface of ConMIM but for the teacher EMA (``teacher`` is
    the student's encoder, so there is nothing to update; the engine only updates a ConMIM teacher)."""

    def __init__(
        self,
        arch: str = "vit_small",
        img_size: int = 224,
        patch_size: int = 16,
        *,
        encoder: str = "vit",
        in_chans: int = 3,
        depth: int = 0,
        init_values: float = 0.1,
        drop_path: float = 0.0,
        trunc_normal_1std: bool = True,
        decoder_depth: int = 2,
        decoder_dim: int = 128,
        decoder_heads: int = 4,
        norm_pix_loss: bool = True,
    ):
        super().__init__()
        if encoder != "vit":
            raise ValueError(f"the MAE baseline needs encoder='vit' (timm's ViT), not {encoder!r}")
        common = dict(
            arch=arch,
            img_size=img_size,
            patch_size=patch_size,
            encoder=encoder,
            in_chans=in_chans,
            depth=depth,
            init_values=init_values,
        )
        self.spec = timm_spec(**common, drop_path=0.0)
        self.patch_size, self.norm_pix_loss = patch_size, norm_pix_loss
        self.student = MAEStudent(
            timm_spec(**common, drop_path=drop_path),
            patch_size * patch_size * in_chans,
            decoder_depth,
            decoder_dim,
            decoder_heads,
        )
        init_student(self.student, trunc_normal_1std)  # the same initialisation as ConMIM's and pixel's encoder
        self.student.fix_position_embedding()
        self.teacher = EncoderAlias(self.student.encoder)

    @classmethod
    def from_config(cls, m: Any) -> MAE:
        """Build from a :class:`conmim.config.ModelConfig` (projector and temperature fields are unused)."""
        return cls(**kwargs_from(cls, m))

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N, patch * patch * C): per-patch normalised pixels (``norm_pix_loss``) or the pixels as given."""
        if self.norm_pix_loss:
            return normalized_patches(images, self.patch_size)
        return patchify(images.float(), self.patch_size)

    def forward_with_stats(
        self, weak: torch.Tensor, strong: torch.Tensor, mask: torch.Tensor, student: nn.Module | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(MSE over masked patches, masked-patch retrieval accuracy); ``strong`` is unused."""
        predictions = (self.student if student is None else student)(weak, mask)
        return pixel_regression_loss(predictions, self.targets(weak), mask)

    def forward(self, weak: torch.Tensor, strong: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.forward_with_stats(weak, strong, mask)[0]
