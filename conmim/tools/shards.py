"""``conmim shards SRC OUT``: pack an image folder or list file into tar shards for ``data.source=webdataset``.

The files' bytes go in unchanged (no re-encoding: the same pixels as the folder), one sample per
image under a running key (``00000000.jpg`` + ``00000000.cls`` with the label when it is known), in
the source's order, ``--shard-size`` samples per shard, written by ``webdataset.ShardWriter``. The
class names, when the source has them, go to ``OUT/classes.txt``. Each file's header is read before
it is packed, so a file that is not an image stops the packing with its path (or, with
``--on-error skip``, is left out and listed in ``OUT/skipped_files.txt``) instead of surfacing
mid-training.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from ..data.shards import CLASSES_FILE, IMAGE_EXTS, require_webdataset
from ..data.sources import DataError, FileSource, image_folder, list_file


@dataclass
class PackResult:
    """What ``pack_shards`` wrote."""

    shards: list[str]
    images: int
    skipped: list[tuple[str, str]]
    pattern: str  # the brace pattern naming every shard, for data.path


def read_packable(path: str) -> tuple[bytes, str]:
    """The file's bytes and its member extension (the file's own, else its format's); raises on a non-image."""
    raw = Path(path).read_bytes()
    with Image.open(BytesIO(raw)) as im:  # header only
        fmt = im.format or ""
    ext = Path(path).suffix.lower().lstrip(".")
    if ext not in IMAGE_EXTS:
        ext = "jpg" if fmt == "JPEG" else fmt.lower()
    if ext not in IMAGE_EXTS:
        raise DataError(f"{path}: {fmt} images are not read by conmim ({', '.join(sorted(IMAGE_EXTS))})")
    return raw, ext


def open_source(src: str) -> FileSource:
    """A folder (recursive; first-level sub-folders are classes) or a ``path [label]`` list file."""
    return image_folder(src) if os.path.isdir(src) else list_file(src)


def pack_shards(src: str, out: str, shard_size: int, on_error: str = "raise", prefix: str = "shard") -> PackResult:
    """Write ``OUT/{prefix}-000000.tar``, ... from the images of ``src``; see the module docstring."""
    if shard_size < 1:
        raise DataError(f"--shard-size={shard_size} is not allowed: a positive number of images per shard")
    source = open_source(src)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    if existing := sorted(folder.glob(f"{prefix}-*.tar")):
        raise DataError(
            f"{out!r} already holds shards ({existing[0].name}, ...): choose an empty folder "
            "(or remove the shards a stopped packing left there)"
        )
    wds = require_webdataset()
    written: list[str] = []
    skipped: list[tuple[str, str]] = []
    count = 0
    pattern = str(folder / f"{prefix}-%06d.tar")
    writer = None
    try:
        for i in tqdm(range(len(source)), desc="shards", unit="img", dynamic_ncols=True):
            path = source.name(i)
            try:
                raw, ext = read_packable(path)
            except Exception as err:  # noqa: BLE001 - any unreadable or non-image file
                reason = f"{type(err).__name__}: {err}"
                if on_error == "raise":
                    raise DataError(f"cannot pack {path}: {reason} (--on-error skip leaves it out)") from err
                skipped.append((path, reason))
                continue
            if writer is None:  # ShardWriter opens its first shard at once: only once there is an image
                # mtime 0, an int: the same images give the same bytes, and plain ustar headers (a float
                # mtime adds a pax header to every member, which doubles the reader's index scan)
                writer = wds.ShardWriter(pattern, maxcount=shard_size, maxsize=float("inf"), verbose=0, mtime=0)
            sample = {"__key__": f"{count:08d}", ext: raw}
            if source.labels[i] >= 0:
                sample["cls"] = str(source.labels[i]).encode()
            writer.write(sample)
            count += 1
    finally:
        if writer is not None:
            written = [pattern % k for k in range(writer.shard)]
            writer.close()
    if not count:
        raise DataError(f"{src!r}: no image could be packed")
    if source.classes:
        (folder / CLASSES_FILE).write_text("".join(f"{c}\n" for c in source.classes))
    if skipped:
        (folder / "skipped_files.txt").write_text("".join(f"{p}\t{' '.join(r.split())}\n" for p, r in skipped))
    last = len(written) - 1
    return PackResult(written, count, skipped, str(folder / f"{prefix}-{{000000..{last:06d}}}.tar"))
