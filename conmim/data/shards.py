"""Tar shards in the webdataset layout, read by index (``data.source=webdataset``).

A shard is an uncompressed tar whose members are grouped into samples by key, as the
``webdataset`` package groups them (``webdataset.tariterators.base_plus_ext``: ``000123.jpg`` and
``000123.cls`` are one sample, consecutive in the tar). Each sample has one image member and
optionally a ``.cls`` member with its integer label.

Why not ``webdataset.WebDataset`` for reading: it is a stream (an ``IterableDataset``), so a
sample's position depends on shard order, worker count and how far a stream got, and a resumed run
cannot ask for "sample 7 of epoch 3". Pre-training draws ``(epoch, index)`` keys from
:class:`conmim.data.pretrain.EpochSampler` and derives every random choice from them; here an index
of ``(shard, offset, size)`` per sample, built once per process by scanning the tar headers, makes
the shards indexable like a folder, so ranks and workers split them without duplicates and a
resumed run is exact. The ``webdataset`` package still expands the brace patterns, defines the
key/extension rule and writes the shards (:mod:`conmim.tools.shards`).

The scan checks what ``tarfile`` would let pass silently: a member whose data runs past the end of
the shard (a truncated copy) and bytes after the last readable header that are not the tar's zero
trailer (a corrupt header ends ``tarfile``'s listing without an error). Under ``data.on_error=skip``
such a shard keeps the samples before the damage and the loss is listed in :attr:`ShardSource.skipped`;
under ``raise`` it is a :class:`DataError` naming the shard and the member.
"""

from __future__ import annotations

import functools
import logging
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

from .files import IMAGE_EXTENSIONS, DataError, load_image

log = logging.getLogger(__name__)

INSTALL_HINT = "data.source=webdataset needs the webdataset package: pip install 'conmim[webdataset]'"
IMAGE_EXTS = frozenset(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
LABEL_EXT = "cls"
CLASSES_FILE = "classes.txt"  # beside the shards: class names by label, one a line (written by conmim shards)


def require_webdataset():
    """The optional ``webdataset`` module, or a :class:`DataError` saying how to install it."""
    try:
        import webdataset
    except ImportError:
        raise DataError(INSTALL_HINT) from None
    return webdataset


def is_shard_location(location: str) -> bool:
    """A ``.tar`` file or pattern, or a folder holding ``.tar`` files (``conmim bench`` picks the source by it)."""
    return location.endswith(".tar") or (os.path.isdir(location) and any(Path(location).glob("*.tar")))


def shard_paths(location: str) -> list[str]:
    """The shard files of ``location``: a folder (its ``*.tar``, sorted), one ``.tar``, a brace pattern
    (``train-{000000..000009}.tar``) or several joined by ``::``. Every file must exist."""
    if os.path.isdir(location):
        found = sorted(str(p) for p in Path(location).glob("*.tar"))
        if not found:
            raise DataError(f"shard folder {location!r} holds no .tar files")
        return found
    if "://" in location or location.startswith("pipe:"):
        raise DataError(f"data.path={location!r}: conmim reads local shard files by offset; copy the shards to a disk")
    paths = require_webdataset().shardlists.expand_urls(location)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(
            f"data.path={location!r}: {len(missing)} of {len(paths)} shard(s) not found, first {missing[0]!r} "
            "(a folder of .tar files, a .tar file or a brace pattern such as shards/train-{000000..000009}.tar)"
        )
    compressed = [p for p in paths if not p.endswith(".tar")]
    if compressed:
        raise DataError(f"shard {compressed[0]!r}: not a .tar file; conmim reads uncompressed tar shards by offset")
    return paths


@dataclass
class ShardIndex:
    """Where one shard's samples are: image member offsets and sizes, labels, names; and what was lost."""

    offsets: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    members: list[str] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (shard:member, reason)


def _label(tar: tarfile.TarFile, member: tarfile.TarInfo) -> int:
    text = tar.extractfile(member).read().decode("ascii", errors="replace").strip()
    if not text.lstrip("-").isdigit():
        raise ValueError(f"label {text[:20]!r} is not an integer")
    return int(text)


def _trailer_damage(path: str, start: int) -> int | None:
    """Offset of the first non-zero byte from ``start`` on (a corrupt header), None for a clean trailer."""
    with open(path, "rb") as f:
        f.seek(start)
        pos = start
        while chunk := f.read(1 << 16):
            nonzero = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8))
            if nonzero.size:
                return pos + int(nonzero[0])
            pos += len(chunk)
    return None


def scan_shard(path: str) -> ShardIndex:
    """Index one shard by reading its tar headers (member data is skipped, except the small labels)."""
    base_plus_ext = require_webdataset().tariterators.base_plus_ext
    index, size = ShardIndex(), os.path.getsize(path)
    samples: list[dict] = []  # per key, in tar order: {"key", "image": TarInfo | None, "label", "error"}
    last = "(its first member)"
    try:
        tar = tarfile.open(path, mode="r:")
    except tarfile.TarError as err:
        raise DataError(f"shard {path!r}: not a readable tar file ({err})") from None
    with tar:
        while True:
            try:
                member = tar.next()
            except tarfile.TarError as err:
                index.problems.append((f"{path}:{last}", f"corrupt tar header after this member ({err})"))
                break
            if member is None:
                break
            if not member.isfile():
                continue
            if member.offset_data + member.size > size:
                index.problems.append((f"{path}:{member.name}", f"truncated: the shard ends at byte {size}"))
                break
            last = member.name
            key, ext = base_plus_ext(member.name)
            if key is None:
                continue
            if not samples or samples[-1]["key"] != key:
                samples.append({"key": key, "image": None, "label": -1, "error": None})
            sample, ext = samples[-1], ext.lower()
            if ext in IMAGE_EXTS and sample["image"] is None:
                sample["image"] = member
            elif ext == LABEL_EXT:
                try:
                    sample["label"] = _label(tar, member)
                except ValueError as err:
                    sample["error"] = (f"{path}:{member.name}", str(err))
        if not index.problems and (bad := _trailer_damage(path, tar.offset)) is not None:
            index.problems.append((f"{path}:{last}", f"corrupt tar header at byte {bad}, after this member"))
    if index.problems and samples:
        samples.pop()  # the sample the damage interrupts: its other members (a label?) may be lost
    for sample in samples:
        if sample["error"]:
            index.problems.append(sample["error"])
        elif sample["image"] is None:
            exts = ", ".join(sorted(IMAGE_EXTS))
            index.problems.append((f"{path}:{sample['key']}", f"sample without an image member ({exts})"))
        else:
            index.offsets.append(sample["image"].offset_data)
            index.sizes.append(sample["image"].size)
            index.labels.append(sample["label"])
            index.members.append(sample["image"].name)
    return index


def read_classes(paths: Sequence[str]) -> list[str]:
    """Class names from ``classes.txt`` beside the first shard, if there is one."""
    found = Path(paths[0]).parent / CLASSES_FILE
    return found.read_text().splitlines() if found.is_file() else []


class ShardSource:
    """Images in tar shards, addressable by index like a folder (the :class:`conmim.data.files.Source`
    protocol). ``skipped`` lists ``(shard:member, reason)`` for what the scan could not index."""

    def __init__(self, paths: Sequence[str], on_error: str = "skip"):
        self.paths = list(paths)
        shard, offsets, sizes, labels, members, self.skipped = [], [], [], [], [], []
        for k, path in enumerate(self.paths):
            part = scan_shard(path)
            if part.problems and on_error == "raise":
                name, reason = part.problems[0]
                raise DataError(f"cannot read {name}: {reason} (data.on_error=raise)")
            for name, reason in part.problems:
                log.warning("shard data skipped: %s: %s (data.on_error=skip)", name, reason)
            self.skipped += part.problems
            shard += [k] * len(part.offsets)
            offsets += part.offsets
            sizes += part.sizes
            labels += part.labels
            members += part.members
        if not offsets:
            raise DataError(f"shards {self.paths[0]!r}...: no readable image sample in {len(self.paths)} shard(s)")
        # numpy arrays: compact, and shared copy-on-write with forked data-loader workers
        self.shard, self.offsets, self.sizes = np.array(shard, np.int32), np.array(offsets), np.array(sizes)
        self.labels = labels
        self.members = np.array(members)
        self.classes = read_classes(self.paths)

    def __len__(self) -> int:
        return len(self.offsets)

    def name(self, index: int) -> str:
        return f"{self.paths[self.shard[index]]}:{self.members[index]}"

    def raw(self, index: int) -> bytes:
        """The encoded image bytes of sample ``index`` (one seek and read; safe in any process)."""
        size = int(self.sizes[index])
        with open(self.paths[self.shard[index]], "rb", buffering=0) as f:
            f.seek(int(self.offsets[index]))
            data = f.read(size)
        if len(data) != size:
            raise DataError(f"{self.name(index)}: shard shorter than when it was indexed (changed since?)")
        return data

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return load_image(BytesIO(self.raw(index))), self.labels[index]


@functools.lru_cache(maxsize=4)
def _indexed(paths: tuple[str, ...], stamps: tuple[tuple[int, int], ...], on_error: str) -> ShardSource:
    return ShardSource(paths, on_error)


def open_shards(location: str, on_error: str = "skip") -> ShardSource:
    """The shards of ``location`` (see :func:`shard_paths`), scanned once per process while they stay
    unchanged (same sizes and modification times): pre-training, its online k-NN and the final
    evaluation build the same source, and each scan reads every tar header."""
    paths = shard_paths(location)
    stamps = tuple((st.st_size, st.st_mtime_ns) for st in map(os.stat, paths))
    return _indexed(tuple(paths), stamps, on_error)
