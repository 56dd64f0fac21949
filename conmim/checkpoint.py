"""Atomic checkpoints, retention and safe loading.

Writes go to a temporary file in the same folder, are fsynced, then renamed, so a crash never
leaves a partial file under a final name; ``last.pt`` is a hard link to the newest step file.
Every load uses ``torch.load(weights_only=True)``: a checkpoint can never run code.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
STEP_FILE = re.compile(r"step_(\d+)\.pt$")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` through temp file + fsync + rename; the temp file never survives."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def safe_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint with ``weights_only=True`` (tensors and plain containers only)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def step_files(folder: str | os.PathLike) -> list[Path]:
    """Step checkpoints in ``folder``, oldest first."""
    folder = Path(folder)
    found = [(int(m.group(1)), p) for p in folder.glob("step_*.pt") if (m := STEP_FILE.search(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(state: dict, folder: str | os.PathLike, step: int, keep: int) -> Path:
    """Write ``step_N.pt``, point ``last.pt`` at it, and keep only the newest ``keep`` step files."""
    folder = Path(folder)
    path = folder / f"step_{step:08d}.pt"
    atomic_save(state, path)
    tmp_link = folder / f".last.{os.getpid()}.tmp"
    tmp_link.unlink(missing_ok=True)
    os.link(path, tmp_link)
    os.replace(tmp_link, folder / "last.pt")
    _fsync_dir(folder)
    for old in step_files(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_latest(folder: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[dict, Path] | None:
    """The newest readable checkpoint in ``folder`` (``last.pt``, then step files newest first).

    A corrupt or truncated file is skipped with a warning. Returns None when there is none.
    """
    folder = Path(folder)
    candidates = [folder / "last.pt"] + list(reversed(step_files(folder)))
    for path in candidates:
        if not path.is_file():
            continue
        try:
            return safe_load(path, map_location), path
        except Exception as err:  # noqa: BLE001 - any failure to read means unusable
            log.warning("checkpoint %s is unreadable (%s: %s); trying an older one", path, type(err).__name__, err)
    return None
