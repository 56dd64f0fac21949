"""The pre-training dataset and sampler.

The dataset turns a source (:mod:`conmim.data.sources`) into ``(weak, strong, mask)`` triples; all
randomness of one sample comes from a generator seeded by (seed, epoch, index), so results do not
depend on the number of data-loader workers and a resumed run sees exactly the samples it would
have seen.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from .channels import as_channels
from .files import DataError, Source
from .masking import MaskGenerator
from .seeded import sample_seed
from .views import PairedViews

log = logging.getLogger(__name__)


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator for one sample of one epoch, independent of workers and ranks."""
    return torch.Generator().manual_seed(sample_seed(seed, epoch, index))


def record_skipped(log_file: str | os.PathLike, name: str, reason: str) -> None:
    """Append ``name<TAB>reason`` to ``log_file`` with one ``O_APPEND`` write.

    Bad files are found inside data-loader worker processes (and on every rank), which share
    nothing but the file system: single appends of a short line from each keep the list whole.
    """
    line = f"{name}\t{' '.join(reason.split())}\n".encode()
    fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_skipped(log_file: str | os.PathLike) -> dict[str, str]:
    """Skipped files recorded by :func:`record_skipped`: ``{name: reason}``, each file once."""
    path = Path(log_file)
    if not path.is_file():
        return {}
    found: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        name, _tab, reason = line.partition("\t")
        if name:
            found.setdefault(name, reason)
    return found


class PretrainDataset(Dataset):
    """``(epoch, index) -> (weak, strong, mask)``; keys come from :class:`EpochSampler`.

    Unreadable files follow ``on_error``: ``raise`` stops with the path and reason, ``skip``
    substitutes the next readable sample and appends the file to ``skip_log`` (from whichever
    worker process met it; see :func:`record_skipped`). What a source itself dropped while indexing
    (``source.skipped``: the damaged part of a tar shard) joins the same list when the dataset is built.
    """

    def __init__(
        self,
        source: Source,
        views: PairedViews,
        masks: MaskGenerator,
        seed: int = 0,
        on_error: str = "skip",
        skip_log: str | os.PathLike | None = None,
    ):
        self.source, self.views, self.masks, self.seed, self.on_error = source, views, masks, seed, on_error
        self.skip_log = skip_log
        self._seen_bad: set[str] = set()  # per process: record each bad file once
        for name, reason in getattr(source, "skipped", ()):
            self.record(name, reason)

    def __len__(self) -> int:
        return len(self.source)

    def load(self, i: int) -> Image.Image | torch.Tensor:
        """Item ``i`` of the source at the model's channels (a photo or a uint8 array); subclasses read
        other forms (file bytes). A channel mismatch is an error of this item, so ``on_error`` applies."""
        return as_channels(self.source[i][0], self.views.in_chans)

    def read(self, index: int):
        """``load`` of ``index``, or per ``on_error`` of the next readable item."""
        for attempt in range(len(self.source)):
            i = (index + attempt) % len(self.source)
            try:
                return self.load(i)
            except Exception as err:  # noqa: BLE001 - any decoder error is a bad file
                self.bad_file(self.source.name(i), err)
        raise DataError("no readable image in the data source")

    def bad_file(self, name: str, err: Exception) -> None:
        """Raise (``on_error=raise``) or record ``name`` once in the skip log (``skip``)."""
        reason = f"{type(err).__name__}: {err}"
        if self.on_error == "raise":
            raise DataError(f"cannot read {name}: {reason} (data.on_error=raise)") from err
        self.record(name, reason)

    def record(self, name: str, reason: str) -> None:
        """Add ``name`` to the skip log, once per process."""
        if name not in self._seen_bad:
            self._seen_bad.add(name)
            log.debug("skipping unreadable image %s (%s)", name, reason)
            if self.skip_log is not None:
                record_skipped(self.skip_log, name, reason)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        epoch, index = key
        img = self.read(index)
        gen = sample_generator(self.seed, epoch, index)
        weak, strong = self.views(img, gen)
        return weak, strong, self.masks(gen)


class EpochSampler(Sampler):
    """Endless ``(epoch, index)`` keys for one rank, resumable at any sample.

    Each epoch is a permutation seeded by (seed, epoch), split across ranks; every rank yields
    ``steps_per_epoch * batch_size`` keys an epoch, so batches never straddle epochs.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        start_step: int = 0,
        shuffle: bool = True,
    ):
        self.size, self.batch_size, self.rank, self.world_size = size, batch_size, rank, world_size
        self.seed, self.start_step, self.shuffle = seed, start_step, shuffle
        self.steps_per_epoch = size // world_size // batch_size
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{size} images cannot fill one batch of {batch_size} on each of {world_size} "
                "process(es); lower train.batch_size or add images"
            )

    def __len__(self) -> int:  # endless; report one epoch for progress displays
        return self.steps_per_epoch * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        per_epoch = self.steps_per_epoch * self.batch_size
        epoch, offset = divmod(self.start_step, self.steps_per_epoch)
        offset *= self.batch_size
        while True:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                order = torch.randperm(self.size, generator=g)
            else:
                order = torch.arange(self.size)
            mine = order[self.rank :: self.world_size][:per_epoch].tolist()
            for index in mine[offset:]:
                yield epoch, index
            epoch, offset = epoch + 1, 0
