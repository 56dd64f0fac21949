"""Paired weak/strong views with one shared crop and flip (docs/method.md §6), CPU reference path.

Every random choice is drawn from an explicit ``torch.Generator`` into a :class:`ViewParams`
record first, then applied. Sampling and applying are separate so a batched GPU path can reuse
:func:`sample_view_params` and draw from exactly the same distributions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from .channels import as_channels, image_size, to_uint8_tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ViewParams:
    """The random draws for one image: shared geometry, then the strong view's photometric ops."""

    top: int
    left: int
    height: int
    width: int
    flip: bool
    jitter: bool  # ColorJitter applied (p 0.8)
    brightness: float
    contrast: float
    saturation: float
    hue: float
    jitter_order: tuple[int, ...]  # permutation of (brightness, contrast, saturation, hue)
    grayscale: bool  # p 0.2
    blur_sigma: float  # 0 = no blur (p 0.9)
    solarize: bool  # p 0.2


def _uniform(gen: torch.Generator | None, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def _chance(gen: torch.Generator | None, p: float) -> bool:
    return float(torch.rand((), generator=gen)) < p


def sample_crop(
    gen: torch.Generator | None,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, h, w): 10 tries, then a centre crop clamped to ``ratio``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(gen, *scale)
        aspect = math.exp(_uniform(gen, *log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=gen))
            left = int(torch.randint(0, width - w + 1, (), generator=gen))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_view_params(
    gen: torch.Generator | None, height: int, width: int, crop_scale: tuple[float, float] = (0.08, 1.0)
) -> ViewParams:
    """Draw every random choice for one image (BYOL's second-view photometric parameters)."""
    top, left, h, w = sample_crop(gen, height, width, crop_scale)
    flip = _chance(gen, 0.5)
    jitter = _chance(gen, 0.8)
    brightness, contrast = _uniform(gen, 0.6, 1.4), _uniform(gen, 0.6, 1.4)
    saturation, hue = _uniform(gen, 0.8, 1.2), _uniform(gen, -0.1, 0.1)
    order = tuple(int(i) for i in torch.randperm(4, generator=gen))
    grayscale = _chance(gen, 0.2)
    blur_sigma = _uniform(gen, 0.1, 2.0) if _chance(gen, 0.1) else 0.0
    solarize = _chance(gen, 0.2)
    return ViewParams(
        top, left, h, w, flip, jitter, brightness, contrast, saturation, hue, order, grayscale, blur_sigma, solarize
    )


def apply_photometric(img: torch.Tensor, p: ViewParams) -> torch.Tensor:
    """The strong view's ops on a uint8 (C, H, W) or (B, C, H, W) tensor, in the official order.

    RGB (C = 3), the official ops: colour jitter (brightness, contrast, saturation, hue in a random
    order), random grayscale, blur, solarize. Any other C runs :func:`_per_channel_photometric`.
    """
    if img.shape[-3] != 3:
        return _per_channel_photometric(img, p)
    if p.jitter:
        ops = (
            lambda x: TF.adjust_brightness(x, p.brightness),
            lambda x: TF.adjust_contrast(x, p.contrast),
            lambda x: TF.adjust_saturation(x, p.saturation),
            lambda x: TF.adjust_hue(x, p.hue),
        )
        for i in p.jitter_order:
            img = ops[i](img)
    if p.grayscale:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    if p.blur_sigma > 0:
        k = 2 * math.ceil(3 * p.blur_sigma) + 1
        img = TF.gaussian_blur(img, [k, k], [p.blur_sigma, p.blur_sigma])
    if p.solarize:
        img = TF.solarize(img, 128)
    return img


def _per_channel_photometric(img: torch.Tensor, p: ViewParams) -> torch.Tensor:
    """The strong view's ops for C != 3 channels, with the RGB path's draws: brightness and contrast
    (in their drawn order, with p 0.8), blur, solarize, each channel on its own (contrast blends a
    channel with its own mean). Saturation, hue and grayscale need RGB and are skipped; their draws
    are still made, so every image consumes the generator the same way. For C = 1 each op is
    torchvision's gray-image op."""
    img = img.unsqueeze(-3)  # (..., C, 1, H, W): every channel a gray image of its own
    if p.jitter:
        for i in p.jitter_order:
            if i == 0:
                img = TF.adjust_brightness(img, p.brightness)
            elif i == 1:
                img = TF.adjust_contrast(img, p.contrast)
    if p.blur_sigma > 0:
        k = 2 * math.ceil(3 * p.blur_sigma) + 1
        img = TF.gaussian_blur(img, [k, k], [p.blur_sigma, p.blur_sigma])
    if p.solarize:
        img = TF.solarize(img, 128)
    return img.squeeze(-3)


class RandomPhotometric:
    """The strong view's photometric ops as a random transform of one uint8 (C, H, W) tensor, drawn
    from the global torch generator: fine-tuning's augmentation for inputs RandAugment cannot take."""

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return apply_photometric(img, sample_view_params(None, *img.shape[-2:]))


class PairedViews:
    """Image -> (weak, strong) normalised float tensors of one shared crop.

    The image is a photo or a uint8 (C, H, W) array (:mod:`conmim.data.channels`); the model's channel
    count is ``len(mean)`` (``data.mean`` has ``model.in_chans`` values). Photos are converted to RGB
    (3 channels) or L (1); arrays must have that many channels.

    ``strong=False`` turns off the photometric ops on the teacher's view (then both views are the
    same pixels); ``weak_strong=True`` applies independently drawn strong ops to the student's view
    too (the symmetric-perturbation ablation).
    """

    def __init__(
        self,
        img_size: int,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        strong: bool = True,
        weak_strong: bool = False,
    ):
        self.img_size, self.crop_scale = img_size, tuple(crop_scale)
        self.mean, self.std = list(mean), list(std)
        self.in_chans = len(self.mean)
        self.strong, self.weak_strong = strong, weak_strong

    @classmethod
    def from_config(cls, model_cfg, data_cfg) -> PairedViews:
        """The views a pre-training of ``model`` / ``data`` sections draws (crops from ``data.crop_scale_min``)."""
        d = data_cfg
        return cls(
            model_cfg.img_size, (d.crop_scale_min, 1.0), tuple(d.mean), tuple(d.std), d.strong_aug, d.weak_aug_strong
        )

    def crop(self, img: Image.Image | torch.Tensor, p: ViewParams) -> torch.Tensor:
        out = TF.resized_crop(
            img,
            p.top,
            p.left,
            p.height,
            p.width,
            [self.img_size, self.img_size],
            interpolation=InterpolationMode.BICUBIC,
            antialias=True,
        )
        if p.flip:
            out = TF.horizontal_flip(out)
        return to_uint8_tensor(out)

    def normalize(self, img: torch.Tensor) -> torch.Tensor:
        return TF.normalize(img.float().div_(255), self.mean, self.std)

    def sample(self, gen: torch.Generator | None, height: int, width: int) -> tuple[ViewParams, ViewParams | None]:
        """The draws for one image: ``p`` (crop, flip, strong ops) and, with ``weak_strong``, ``q`` (the
        weak view's own photometric ops; its crop is unused). The device path draws through this too."""
        p = sample_view_params(gen, height, width, self.crop_scale)
        q = sample_view_params(gen, height, width, self.crop_scale) if self.weak_strong else None
        return p, q

    def __call__(
        self, img: Image.Image | torch.Tensor, gen: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        img = as_channels(img, self.in_chans)
        p, q = self.sample(gen, *image_size(img))
        base = self.crop(img, p)
        strong = apply_photometric(base, p) if self.strong else base
        weak = apply_photometric(base, q) if q is not None else base
        return self.normalize(weak), self.normalize(strong)
