"""Where the images of a split live for a folder, list or webdataset source: the one rule of every command.

``data.path`` is the data root. A folder source reads ``data.path/<split>`` (ImageNet layout:
``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``); a list source reads
``<data.path without .txt>_<split>.txt``; a webdataset source whose ``data.path`` is a folder reads
``data.path/<split>/*.tar``, and a shard file or brace pattern has ``{split}`` replaced by the split
(without ``{split}`` it holds the training images only). ``split=.`` (or empty) is ``data.path`` itself.

Data without splits: when the training split (``data.split``) has no folder or list file of its own,
``data.path`` itself holds the training images, said in one log line: a flat folder of images, a
folder of class sub-folders, a folder of ``.tar`` shards, a list file. What cannot be read that way
stays an error naming the path: a folder with split-like sub-folders (``val/``, ``test/``, ...) but
none of the requested name, or loose images beside sub-folders of images (are those classes, splits
or more images?). Another split (``data.eval_split``) is never guessed: :func:`find_split` answers
None when it is absent, after a few ``stat`` calls, so pre-training's optional final evaluation can
skip it, while knn / linprobe / finetune stop with :func:`split_location`'s error.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .files import FILE_EXTENSIONS, DataError

log = logging.getLogger(__name__)

ROOT_SPLIT = "."  # data.split / data.eval_split: the images directly under data.path (no split folders)
# Sub-folder names that mark a data root split into parts, not a folder of classes.
SPLIT_NAMES = frozenset(
    {"train", "training", "val", "valid", "validation", "test", "testing", "eval", "dev", "holdout", "trainval"}
)
_announced: set[tuple[str, str, str]] = set()  # (source, path, split) already logged: once per process


def find_split(data_cfg, split: str) -> str | None:
    """Where the images of ``split`` live (module docstring: the rule), or None when the data has no
    such split. Raises :class:`DataError` for data that is there but cannot be read as that split."""
    path, source = data_cfg.path, data_cfg.source
    if source == "webdataset" and not os.path.isdir(path):
        return _shard_pattern(path, split, data_cfg.split)
    if split in ("", ROOT_SPLIT):
        return path
    if source == "list":
        found = f"{path.rsplit('.', 1)[0]}_{split}.txt"
        if os.path.isfile(found):
            return found
        if split == data_cfg.split and os.path.isfile(path):
            _announce(
                data_cfg,
                split,
                f"data.path={path} has no list file {found}: reading {path} itself as the training images",
            )
            return path
        return None
    found = os.path.join(path, split)
    if os.path.isdir(found):
        return found
    if split == data_cfg.split and os.path.isdir(path):
        return _root_as_training(data_cfg, split)
    return None


def split_location(data_cfg, split: str) -> str:
    """:func:`find_split`, or a :class:`DataError` naming what was looked for when the split is absent.

    Pre-training reads ``data.split``; knn / linprobe / finetune read ``data.split`` as their training
    set and ``data.eval_split`` as the held-out one."""
    found = find_split(data_cfg, split)
    if found is None:
        raise DataError(describe_missing(data_cfg, split))
    return found


def describe_missing(data_cfg, split: str) -> str:
    """Why :func:`find_split` found no ``split``: the path it looked for and what to set instead."""
    path, source = data_cfg.path, data_cfg.source
    held_out = split == data_cfg.eval_split and split != data_cfg.split
    key = "data.eval_split" if held_out else "data.split"
    # data.split=. reads data.path itself; for the held-out split that would be the training images
    root = "" if held_out else f"; {key}=. reads data.path itself"
    if source == "webdataset" and not os.path.isdir(path):
        return (
            f"data.path={path!r} names no shards of split {split!r} (only the training shards, data.split="
            f"{data_cfg.split!r}): write {{split}} where the split's name goes, e.g. "
            "shards/{split}-{000000..000009}.tar, or give a folder with one sub-folder of .tar files per split"
        )
    if source == "list":
        found = f"{path.rsplit('.', 1)[0]}_{split}.txt"
        return (
            f"list file {found!r} of split {split!r} ({key}) not found (data.path={path!r}: list sources "
            f"read <data.path without .txt>_<split>.txt{root})"
        )
    found = os.path.join(path, split)
    if not os.path.isdir(path):
        return f"data.path={path!r}: no such folder (looked for its split {split!r} in {found!r})"
    parent = Path(path).parent
    hint = ""
    if Path(path).name == data_cfg.split or (parent / split).is_dir():
        hint = f"; data.path looks like a split folder itself: use data.path={str(parent)!r}"
    if held_out:
        return (
            f"held-out split folder {found!r} not found (data.path={path!r}, data.eval_split={split!r}: "
            f"{source} sources read data.path/<eval_split>, with class sub-folders like the training images); "
            f"{path!r} holds {_listing(_sub_folders(path))}{hint}"
        )
    return (
        f"split folder {found!r} not found: {source} sources read data.path/<split> (data.path={path!r}, "
        f"{key}={split!r}){root}; {path!r} holds {_listing(_sub_folders(path))}{hint}"
    )


def _root_as_training(data_cfg, split: str) -> str | None:
    """``data.path`` itself as the training images, when no ``data.path/<split>`` exists and nothing
    suggests another layout (module docstring); else a :class:`DataError` naming the path."""
    path, source = data_cfg.path, data_cfg.source
    subs = _sub_folders(path)
    wanted = {split.lower(), data_cfg.eval_split.lower()} - {"", ROOT_SPLIT}
    splits = [s for s in subs if s.lower() in SPLIT_NAMES | wanted]
    if splits:
        raise DataError(
            f"data.path={path!r} has no {split!r} sub-folder but has split folders {_listing(splits)}: set "
            f"data.split to the one with the training images (e.g. data.split={splits[0]}), or data.split=. "
            "to read every image under data.path"
        )
    here = f"data.path={path} has no {split!r} sub-folder: reading"
    if source == "webdataset":
        if not any(e.name.endswith(".tar") and e.is_file() for e in os.scandir(path)):
            return None  # neither shards nor a split folder
        _announce(data_cfg, split, f"{here} the .tar shards directly in {path} as the training images")
        return path
    loose = [e.name for e in os.scandir(path) if e.name.lower().endswith(FILE_EXTENSIONS) and e.is_file()]
    if loose:
        with_images = [s for s in subs if _holds_images(os.path.join(path, s))]
        if with_images:
            raise DataError(
                f"data.path={path!r} has no {split!r} sub-folder and holds both image files (e.g. {loose[0]!r}) "
                f"and sub-folders of images ({_listing(with_images)}): are those classes, splits or more "
                "images? Put the loose images in a sub-folder of their own (then every sub-folder is a "
                "class), or set data.split=. to read every image under data.path without labels, or "
                "data.split=<sub-folder> to read one"
            )
        _announce(data_cfg, split, f"{here} {path} itself as the training images (no labels: no class sub-folders)")
    elif subs:  # neither images nor folders: image_folder names the empty folder
        _announce(data_cfg, split, f"{here} {path} itself as the training images (classes from its sub-folders)")
    return path


def _announce(data_cfg, split: str, message: str) -> None:
    """Log ``message`` once per process for this source, path and split (the online k-NN and the
    final evaluation build the training source again)."""
    key = (data_cfg.source, data_cfg.path, split)
    if key not in _announced:
        _announced.add(key)
        log.info("%s", message)


def _sub_folders(path: str) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir())


def _holds_images(folder: str) -> bool:
    """Whether an image file lies anywhere under ``folder`` (stops at the first)."""
    for _dirpath, _dirs, names in os.walk(folder, followlinks=False):
        if any(n.lower().endswith(FILE_EXTENSIONS) for n in names):
            return True
    return False


def _listing(names: list[str], most: int = 6) -> str:
    if not names:
        return "no sub-folders"
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _shard_pattern(pattern: str, split: str, train_split: str) -> str | None:
    """The shard pattern of ``split`` (see :func:`find_split`), None when the pattern has none."""
    if "{split}" in pattern:
        if split in ("", ROOT_SPLIT):
            raise DataError(f"data.path={pattern!r} has a {{split}} placeholder: data.split=. names no split")
        return pattern.replace("{split}", split)
    if split not in ("", ROOT_SPLIT, train_split):
        return None
    return pattern
