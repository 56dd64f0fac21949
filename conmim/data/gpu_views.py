"""Device data path (``data.gpu_aug``): workers only read file bytes, the device does the rest.

Images held in memory (Fashion-MNIST) travel as their uint8 pixels instead: the workers' cost per
image falls from two augmented views (about 1.1 ms of CPU for a 28-px image) to a copy and a draw of
parameters (4.4x less, ``benchmarks/worker_cost.py``), which matters when a few cores feed a GPU.

A worker reads a file, parses its header for the size, and draws the sample's crop, flip, strong
photometric ops and mask with :meth:`PairedViews.sample` and the same per-sample generator as the
CPU path, so both paths draw *the same values* for the same (epoch, index), not merely the same
distributions. The batch then travels as encoded JPEG bytes plus a small parameter table; the
device decodes it (nvJPEG through ``torchvision.io.decode_jpeg``), crops and resizes each image
(bicubic, antialiased, as the CPU path), and runs the strong view's ops batched with per-sample
parameters, reproducing torchvision's uint8 arithmetic op by op. Files that are not baseline RGB
JPEGs (PNG, CMYK or gray JPEG, ...) are decoded by the worker with the CPU path's loader.

Everything here is device-agnostic, so the CPU runs it too (tests compare it with the CPU path).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from ..config import Config
from .channels import as_channels, is_array_file, read_array_file
from .files import DataError, load_image
from .pretrain import PretrainDataset, sample_generator
from .sources import ArraySource
from .views import ViewParams

# Columns of the packed parameter table, one row per view (ViewParams flattened).
TOP, LEFT, HEIGHT, WIDTH, FLIP, JITTER, BRIGHTNESS, CONTRAST, SATURATION, HUE = range(10)
ORDER = 10  # 10..13: jitter_order
GRAY, SIGMA, SOLARIZE = 14, 15, 16
NUM_FIELDS = 17
MAX_BLUR_RADIUS = 6  # ceil(3 * sigma) for sigma <= 2.0, the top of the blur radius range


def pack_params(p: ViewParams) -> list[float]:
    """One :class:`ViewParams` as a row of the parameter table (float64 keeps every value exact)."""
    return [
        p.top,
        p.left,
        p.height,
        p.width,
        float(p.flip),
        float(p.jitter),
        p.brightness,
        p.contrast,
        p.saturation,
        p.hue,
        *p.jitter_order,
        float(p.grayscale),
        p.blur_sigma,
        float(p.solarize),
    ]


class EncodedPretrainDataset(PretrainDataset):
    """``(epoch, index) -> (payload, params (2, 17), mask, name)`` for a source of encoded images (``raw(i)``)
    or an :class:`ArraySource` held in memory.

    ``payload`` is the file's bytes (1-D uint8) for RGB JPEGs, else the decoded (3, H, W) uint8 image (the
    in-memory images too, grey ones replicated to RGB as the CPU path does)
    (``.npy`` arrays of 3 channels included, read by :func:`conmim.data.channels.read_array_file`).
    Row 0 of ``params`` is the crop/flip/strong-ops draw, row 1 the weak view's own ops (ablation
    ``weak_strong``; a copy of row 0 otherwise, unused).
    """

    def __init__(self, source, *args, **kwargs):
        if not callable(getattr(source, "raw", None)) and not isinstance(source, ArraySource):
            raise DataError(
                "data.gpu_aug=true needs encoded images (data.source=folder, list, webdataset, scenes) "
                "or images in memory (fashion_mnist)"
            )
        super().__init__(source, *args, **kwargs)

    def load(self, i: int) -> tuple[torch.Tensor, int, int, str]:
        name = self.source.name(i)
        if isinstance(self.source, ArraySource):  # in memory: the pixels, as RGB like the CPU path
            img = TF.pil_to_tensor(as_channels(self.source[i][0], 3))
            return img, img.shape[1], img.shape[2], name
        if is_array_file(name, 3):  # folder and list sources: arrays are read from their files
            img = read_array_file(name, 3)
            return img, img.shape[1], img.shape[2], name
        raw = self.source.raw(i)
        with Image.open(io.BytesIO(raw)) as im:  # header only: no pixel is decoded here
            fmt, mode, (width, height) = im.format, im.mode, im.size
        if fmt == "JPEG" and mode == "RGB":
            return torch.frombuffer(bytearray(raw), dtype=torch.uint8), height, width, name
        img = TF.pil_to_tensor(load_image(io.BytesIO(raw)))
        return img, img.shape[1], img.shape[2], name

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
        epoch, index = key
        payload, height, width, name = self.read(index)
        gen = sample_generator(self.seed, epoch, index)
        p, q = self.views.sample(gen, height, width)
        params = torch.tensor([pack_params(p), pack_params(q or p)], dtype=torch.float64)
        return payload, params, self.masks(gen), name


def collate_encoded(items: list[tuple]) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, list[str]]:
    payloads, params, masks, names = zip(*items, strict=True)
    return list(payloads), torch.stack(params), torch.stack(masks), list(names)


def _column(prm: torch.Tensor, k: int) -> torch.Tensor:
    return prm[:, k].view(-1, 1, 1, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """torchvision's luma, float, (B, 1, H, W)."""
    r, g, b = x.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3)


def _blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """uint8 ``x * ratio + other * (1 - ratio)``, clamped and truncated as torchvision's ``_blend``."""
    out = x.float() * ratio.float() + other * (1.0 - ratio).float()
    return out.clamp_(0, 255).to(torch.uint8)


def _brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x.float() * f.float()).clamp_(0, 255).to(torch.uint8)


def _contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    mean = _gray(x).floor_().mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(x, mean, f)


def _saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x).floor_(), f)


# torchvision's adjust_hue takes one factor for the whole batch, and its RGB <-> HSV helpers are
# private: these two reproduce its arithmetic operation for operation (the CPU path's results, bit for bit).
def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) RGB in [0, 1] -> HSV, hue in [0, 1); gray pixels get hue and saturation 0."""
    r, g, _b = x.unbind(dim=-3)
    minc, maxc = torch.aminmax(x, dim=-3)
    gray = maxc == minc
    span = maxc - minc
    s = span / torch.where(gray, 1.0, maxc)
    # distance of each channel below the maximum, in units of the span
    rc, gc, bc = ((maxc.unsqueeze(-3) - x) / torch.where(gray, 1.0, span).unsqueeze(-3)).unbind(dim=-3)
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, (rc + 2.0) - bc, (gc + 4.0) - rc))
    h = torch.where(gray, 0.0, h)
    return torch.stack((torch.fmod(h * (1.0 / 6.0) + 1.0, 1.0), s, maxc), dim=-3)


# HSV sector (0..5) -> which of (v, p, q, t) becomes R, G and B
_HSV_SECTORS = ((0, 2, 1, 1, 3, 0), (3, 0, 0, 2, 1, 1), (1, 1, 3, 0, 0, 2))


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_rgb_to_hsv`, clamped to [0, 1]."""
    h, s, v = x.unbind(dim=-3)
    h6 = h * 6
    sector = torch.floor(h6)
    frac = h6 - sector
    sf = s * frac
    p = ((1.0 - s) * v).clamp(0.0, 1.0)
    q = ((1.0 - sf) * v).clamp(0.0, 1.0)
    t = ((sf + (1.0 - s)) * v).clamp(0.0, 1.0)
    table = torch.tensor(_HSV_SECTORS, device=x.device)[:, sector.long().remainder(6)]  # (3, ..., H, W)
    return torch.stack((v, p, q, t), dim=-3).gather(-3, table.movedim(0, -3))


def _hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    hsv = _rgb_to_hsv(x.float().mul_(1.0 / 255))
    h, s, v = hsv.unbind(dim=-3)
    h = (h + f.float().view(-1, 1, 1)).remainder_(1.0)
    return _hsv_to_rgb(torch.stack((h, s, v), dim=-3)).mul_(255.999).to(torch.uint8)


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample Gaussian blur as torchvision's (kernel 2*ceil(3 sigma)+1, reflect padding, rounding),
    done separably with every kernel zero-padded to the largest radius."""
    b, c, h, w = x.shape
    r = MAX_BLUR_RADIUS
    taps = torch.arange(-r, r + 1, device=x.device, dtype=torch.float32)
    radius = torch.ceil(3 * sigma).view(-1, 1)  # float64, as math.ceil on the CPU path
    logits = -(taps.div(math.sqrt(2.0)) / sigma.float().view(-1, 1)).pow(2)
    kernel = torch.softmax(logits.masked_fill(taps.abs() > radius, -math.inf), dim=1)  # (B, 2r+1)
    kernel = kernel.repeat_interleave(c, dim=0)  # one per (sample, channel) group
    out = F.pad(x.float().reshape(1, b * c, h, w), (r, r, r, r), mode="reflect")
    out = F.conv2d(out, kernel.view(b * c, 1, 1, 2 * r + 1), groups=b * c)
    out = F.conv2d(out, kernel.view(b * c, 1, 2 * r + 1, 1), groups=b * c)
    return out.reshape(b, c, h, w).round_().to(torch.uint8)


def photometric_batch(x: torch.Tensor, prm: torch.Tensor) -> torch.Tensor:
    """:func:`conmim.data.views.apply_photometric` for a (B, 3, H, W) uint8 batch, one parameter row each.

    Every op is evaluated for the whole batch and selected per sample with ``torch.where``: no
    data-dependent branch, so no host synchronisation and one graph for ``torch.compile``.
    """
    jitter = _column(prm, JITTER) > 0.5
    ops = ((_brightness, BRIGHTNESS), (_contrast, CONTRAST), (_saturation, SATURATION), (_hue, HUE))
    for slot in range(4):
        out = x
        for i, (op, col) in enumerate(ops):
            out = torch.where(jitter & (_column(prm, ORDER + slot) == i), op(x, _column(prm, col)), out)
        x = out
    x = torch.where(_column(prm, GRAY) > 0.5, _gray(x).to(torch.uint8).expand_as(x), x)
    x = torch.where(_column(prm, SIGMA) > 0, _blur(x, prm[:, SIGMA].clamp_min(0.1)), x)
    return torch.where((_column(prm, SOLARIZE) > 0.5) & (x >= 128), 255 - x, x)


def crop_resize_flip(images: list[torch.Tensor], boxes: list[list[int]], flip: torch.Tensor, size: int) -> torch.Tensor:
    """Each image's (top, left, h, w) box resized to ``size`` (bicubic, antialiased), flipped where
    ``flip``; uint8 (B, 3, size, size) as the CPU path's cropped view."""
    out = torch.empty(len(images), 3, size, size, device=flip.device)
    for k, (img, (top, left, h, w)) in enumerate(zip(images, boxes, strict=True)):
        crop = img[None, :, top : top + h, left : left + w].float()
        out[k] = F.interpolate(crop, size=(size, size), mode="bicubic", align_corners=False, antialias=True)[0]
    out = torch.where(flip.view(-1, 1, 1, 1), out.flip(-1), out)
    return out.clamp_(0, 255).round_().to(torch.uint8)


class DeviceViews:
    """Collated :class:`EncodedPretrainDataset` batch -> (weak, strong, mask) on ``device``."""

    def __init__(
        self,
        img_size: int,
        mean,
        std,
        strong: bool,
        weak_strong: bool,
        device: torch.device,
        compile: bool = False,
        bad_file: Callable[[str, Exception], None] | None = None,
    ):
        self.img_size, self.strong, self.weak_strong, self.device = img_size, strong, weak_strong, device
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.photometric = torch.compile(photometric_batch) if compile else photometric_batch
        self.bad_file = bad_file  # the dataset's on_error policy: raise, or record the file as skipped

    def decode(self, payloads: list[torch.Tensor], names: list[str]) -> list[torch.Tensor | None]:
        """Batched decode of the encoded payloads; if the batch fails, one by one, then PIL on the
        CPU; ``None`` for a file nothing can decode (reported to ``bad_file``)."""
        images: list[torch.Tensor | None] = [x if x.ndim == 3 else None for x in payloads]
        encoded = [k for k, x in enumerate(payloads) if x.ndim == 1]
        if not encoded:
            return [x.to(self.device, non_blocking=True) for x in images]
        try:
            decoded = decode_jpeg([payloads[k] for k in encoded], mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            decoded = [self._decode_one(payloads[k], names[k]) for k in encoded]
        for k, img in zip(encoded, decoded, strict=True):
            images[k] = img
        return [x.to(self.device, non_blocking=True) if x is not None else None for x in images]

    def _decode_one(self, payload: torch.Tensor, name: str) -> torch.Tensor | None:
        try:
            return decode_jpeg(payload, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            pass
        try:
            return TF.pil_to_tensor(load_image(io.BytesIO(payload.numpy().tobytes())))
        except Exception as err:  # noqa: BLE001 - any decoder error is a bad file
            if self.bad_file is None:
                raise DataError(f"cannot decode {name}: {type(err).__name__}: {err}") from err
            self.bad_file(name, err)
            return None

    def __call__(self, batch: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        payloads, params, masks, names = batch
        images = self.decode(payloads, names)
        good = [k for k, img in enumerate(images) if img is not None]
        if not good:
            raise DataError(f"no decodable image in a batch of {len(images)} ({names[0]}, ...)")
        if len(good) < len(images):  # an undecodable file: reuse a good image of the batch with its draws
            fill = [k if images[k] is not None else good[0] for k in range(len(images))]
            images, params = [images[k] for k in fill], params[fill]
        boxes = params[:, 0, :4].long().tolist()
        prm = params.to(self.device, non_blocking=True)
        base = crop_resize_flip(images, boxes, prm[:, 0, FLIP] > 0.5, self.img_size)
        strong = self.photometric(base, prm[:, 0]) if self.strong else base
        weak = self.photometric(base, prm[:, 1]) if self.weak_strong else base
        return self.normalize(weak), self.normalize(strong), masks.to(self.device, non_blocking=True)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().div_(255).sub_(self.mean).div_(self.std)


def device_views(cfg: Config, device: torch.device, dataset: PretrainDataset) -> DeviceViews | None:
    """The device half of the data path when ``data.gpu_aug`` is set, else None (CPU path)."""
    d = cfg.data
    if not d.gpu_aug:
        return None
    return DeviceViews(
        cfg.model.img_size,
        d.mean,
        d.std,
        d.strong_aug,
        d.weak_aug_strong,
        device,
        compile=cfg.train.compile and device.type == "cuda",
        bad_file=dataset.bad_file,
    )


def device_batches(loader: Iterable, views: DeviceViews | None, device: torch.device) -> Iterator[Any]:
    """Endless (weak, strong, mask) batches on ``device`` from either data path."""
    for batch in loader:
        if views is None:
            yield tuple(x.to(device, non_blocking=True) for x in batch)
        else:
            yield views(batch)
