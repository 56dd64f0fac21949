"""What the evaluations share: evaluation transforms, labelled datasets, subsets and the evaluation splits."""

from __future__ import annotations

import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ..config import ConfigError
from ..data.channels import ChannelError, as_channels, to_uint8_tensor
from ..data.sources import DataError, Source, build_source


class EvalTransform:
    """Resize the shorter side to ``img_size / crop_pct`` (bicubic), centre-crop, normalise.

    Takes photos and uint8 (C, H, W) arrays; the channel count is ``len(mean)`` (``data.mean`` has
    ``model.in_chans`` values), see :func:`conmim.data.channels.as_channels`.
    """

    def __init__(self, img_size: int, mean, std, crop_pct: float = 1.0):
        self.img_size, self.resize = img_size, int(round(img_size / crop_pct))
        self.mean, self.std = list(mean), list(std)

    def __call__(self, img: Image.Image | torch.Tensor) -> torch.Tensor:
        img = as_channels(img, len(self.mean))
        img = TF.resize(img, [self.resize], interpolation=InterpolationMode.BICUBIC, antialias=True)
        img = TF.center_crop(img, [self.img_size, self.img_size])
        return TF.normalize(to_uint8_tensor(img).float().div_(255), self.mean, self.std)


class LabeledDataset(Dataset):
    """A source of ``(PIL image, label)`` seen through a deterministic transform."""

    def __init__(self, source: Source, transform, indices: list[int] | None = None):
        self.source, self.transform = source, transform
        self.indices = list(range(len(source))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img, label = self.source[self.indices[i]]
        try:
            return self.transform(img), label
        except ChannelError as err:  # a photo that cannot give model.in_chans channels: name it
            raise ChannelError(f"{self.source.name(self.indices[i])}: {err}") from None


class ChannelTransform:
    """Any image transform, applied after bringing the image to ``in_chans`` channels (photos to RGB
    or L, arrays checked; Fashion-MNIST's photos are gray, so RGB models need the conversion)."""

    def __init__(self, ops, in_chans: int = 3):
        self.ops, self.in_chans = ops, in_chans

    def __call__(self, img):
        return self.ops(as_channels(img, self.in_chans))


class UnlabelledError(DataError):
    """A labelled source was needed."""


class SourceSubset:
    """Some images of a source, by index, with their labels (a source itself)."""

    def __init__(self, source: Source, indices: list[int]):
        self.source, self.indices = source, list(indices)
        self.classes = source.classes
        labels = getattr(source, "labels", None)
        self.labels = [int(labels[i]) for i in self.indices] if labels is not None else None

    def __len__(self) -> int:
        return len(self.indices)

    def name(self, index: int) -> str:
        return self.source.name(self.indices[index])

    def __getitem__(self, index: int) -> tuple[Image.Image | torch.Tensor, int]:
        return self.source[self.indices[index]]


def limit_source(source: Source, limit: int, seed: int = 0) -> Source:
    """``limit`` images of ``source`` drawn without replacement with ``seed`` (all of it when 0 or larger)."""
    if not 0 < limit < len(source):
        return source
    order = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))
    return SourceSubset(source, sorted(order[:limit].tolist()))


def num_classes_of(*sources: Source) -> int:
    """Number of classes of labelled sources: their class names, else the largest label + 1."""
    found = max(len(s.classes) for s in sources)
    for s in sources:
        labels = getattr(s, "labels", None)
        if labels is not None and len(labels):
            found = max(found, int(max(labels)) + 1)
    if found < 2:
        raise DataError("the data source has no labels (need class sub-folders, list-file labels or Fashion-MNIST)")
    return found


def check_channels(encoder: nn.Module, mean) -> None:
    """Stop with a :class:`ConfigError` when the encoder's input channels and ``data.mean`` disagree,
    before any image is read (else the first batch fails inside the patch embedding)."""
    channels = int(encoder.patch_embed.proj.in_channels)
    if len(mean) != channels:
        raise ConfigError(
            f"the encoder takes {channels} input channel(s) but data.mean/data.std have {len(mean)} values: "
            f"set model.in_chans={channels} and {channels} values each for data.mean and data.std "
            "(or --config the pre-training run's config.yaml)"
        )


def img_size_of(encoder: nn.Module) -> int:
    size = encoder.patch_embed.img_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def eval_sources(cfg, img_size: int):
    """The labelled (train, test) sources of knn / linprobe / finetune, cut to data.train_limit / test_limit."""
    d, seed, chans = cfg.data, cfg.seed, cfg.model.in_chans
    return (
        limit_source(build_source(d, img_size, cfg.data.split, chans), d.train_limit, seed),
        limit_source(build_source(d, img_size, cfg.data.eval_split, chans), d.test_limit, seed),
    )
