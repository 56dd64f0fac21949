"""Fine-tuning's training augmentations: timm's transform (RandomResizedCrop, flip, RandAugment or
colour jitter, random erasing) for RGB models, a tensor pipeline for other channel counts."""

from __future__ import annotations

import torch
from PIL import Image, ImageOps
from timm.data import create_transform
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from torchvision.transforms import v2 as T

from ..config import Config
from ..data.views import RandomPhotometric
from .common import ChannelTransform


def _posterize(img: Image.Image, bits_to_keep: int, **_kwargs) -> Image.Image:
    """timm's posterize, accepting 0 bits (a black image, as older Pillow gave); Pillow 13 raises."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep >= 1:
        return ImageOps.posterize(img, bits_to_keep)
    return img.point([0] * 256 * len(img.getbands()))


def train_transform(img_size: int, cfg: Config) -> ChannelTransform:
    """timm's training transform: RandomResizedCrop (bicubic) + flip, RandAugment (or, without it,
    colour jitter of strength ``finetune.color_jitter``), random erasing.

    With ``mstd0.5`` the RandAugment magnitude reaches 10 in about 2 % of draws, where timm's
    increasing posterize keeps 0 bits and Pillow 13 raises; those ops get :func:`_posterize`.
    RandAugment works on PIL RGB images only: other channel counts get :func:`tensor_train_transform`.
    """
    f, d = cfg.finetune, cfg.data
    if len(d.mean) != 3:
        return tensor_train_transform(img_size, cfg)
    ops = create_transform(
        img_size,
        is_training=True,
        scale=(f.crop_scale_min, 1.0),
        auto_augment=f.auto_augment or None,
        color_jitter=f.color_jitter or None,
        interpolation="bicubic",
        re_prob=f.reprob,
        re_mode="pixel",
        re_count=1,
        mean=tuple(d.mean),
        std=tuple(d.std),
    )
    for t in ops.transforms:
        for op in getattr(t, "ops", []) if isinstance(t, RandAugment) else []:
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize
    return ChannelTransform(ops)


def tensor_train_transform(img_size: int, cfg: Config) -> ChannelTransform:
    """Fine-tuning's training transform for ``model.in_chans != 3``, on uint8 (C, H, W) tensors:
    RandomResizedCrop (bicubic, ``finetune.crop_scale_min``) + flip; when ``finetune.auto_augment`` is
    set, instead of RandAugment the pre-training strong view's per-channel photometric ops
    (:class:`conmim.data.views.RandomPhotometric`: brightness, contrast, blur, solarize); then
    normalisation and random erasing (``finetune.reprob``, per-pixel noise), as in timm's transform."""
    f, d = cfg.finetune, cfg.data
    ops: list = [
        T.RandomResizedCrop(img_size, (f.crop_scale_min, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.PILToTensor(),  # a gray photo (in_chans=1) becomes a tensor; arrays pass through
    ]
    if f.auto_augment:
        ops.append(RandomPhotometric())
    ops += [T.ToDtype(torch.float32, scale=True), T.Normalize(list(d.mean), list(d.std))]
    if f.reprob > 0:
        ops.append(RandomErasing(f.reprob, mode="pixel", device="cpu"))
    return ChannelTransform(T.Compose(ops), len(d.mean))
