"""Atomic checkpoints, retention and safe loading.

Writes go to a temporary file in the same folder, are fsynced, then renamed, so a crash (even
``kill -9`` in the middle of a write) never leaves a partial file under a final name; ``last.pt``
is a hard link to the newest step file. Every load first checks the CRC-32 of every record of
the checkpoint's zip archive (``torch.load`` does not, so flipped bytes inside a tensor would load
silently), then uses ``torch.load(weights_only=True)``: a checkpoint can never run code.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
STEP_FILE = re.compile(r"step_(\d+)\.pt$")
TEMP_PATTERNS = (".step_*.pt.*.tmp", ".last.*.tmp")  # what a killed writer can leave behind


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file and the reason."""


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _WriteRecorder:
    """A file wrapper that keeps the ``OSError`` of a failed write: ``torch.save`` turns it into a
    RuntimeError that only says 'unexpected pos', losing 'No space left on device'."""

    def __init__(self, file: Any):
        self.file, self.error = file, None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.file.flush()


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` through temp file + fsync + rename; the temp file never survives an error.

    A failed write (disk full, file too large, I/O error) raises :class:`CheckpointError` naming the
    file and the system's reason, and leaves ``path`` as it was.
    """
    path = Path(path)
    tmp, recorder = None, None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            recorder = _WriteRecorder(f)
            torch.save(obj, recorder)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        cause = recorder.error if recorder is not None and recorder.error is not None else err
        if isinstance(cause, OSError):
            raise CheckpointError(
                f"cannot write checkpoint {path}: {cause.strerror or cause}; the previous checkpoint is unchanged"
            ) from err
        raise


def safe_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint with ``weights_only=True`` (tensors and plain containers only).

    A file holding any other object, e.g. a pickle crafted to run code, is refused before that
    object is built; the error names the file.
    """
    try:
        _check_archive(path)
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"refusing to load {path}: it holds objects other than tensors and plain "
            f"containers, which could run code (weights_only=True): {first}"
        ) from None
    except (FileNotFoundError, CheckpointError):
        raise
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from err


def _check_archive(path: str | os.PathLike) -> None:
    """Raise if a zip-format checkpoint has a record whose CRC-32 does not match (14.8 MB in 9 ms here)."""
    if not zipfile.is_zipfile(path):  # truncated, or the legacy format: torch.load decides
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: damaged archive ({err})") from err
    if bad is not None:
        raise CheckpointError(f"cannot read checkpoint {path}: record {bad} fails its CRC-32 check (corrupt file)")


def step_files(folder: str | os.PathLike) -> list[Path]:
    """Step checkpoints in ``folder``, oldest first."""
    folder = Path(folder)
    found = [(int(m.group(1)), p) for p in folder.glob("step_*.pt") if (m := STEP_FILE.search(p.name))]
    return [p for _, p in sorted(found)]


def step_of(path: Path) -> int:
    return int(STEP_FILE.search(path.name).group(1))  # type: ignore[union-attr]


def remove_stale_temps(folder: Path) -> None:
    """Delete temp files left by a writer that was killed mid-write (one writer per folder)."""
    for pattern in TEMP_PATTERNS:
        for stale in folder.glob(pattern):
            stale.unlink(missing_ok=True)


def save_checkpoint(state: dict, folder: str | os.PathLike, step: int, keep: int) -> Path:
    """Write ``step_N.pt``, point ``last.pt`` at it, and keep only the newest ``keep`` step files.

    Step files newer than ``step`` belong to an abandoned stretch of the run (a resume or a
    non-finite-loss restore went back past them) and are removed too.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(folder)
    path = folder / f"step_{step:08d}.pt"
    atomic_save(state, path)
    tmp_link = folder / f".last.{os.getpid()}.tmp"
    try:
        tmp_link.unlink(missing_ok=True)
        os.link(path, tmp_link)
        os.replace(tmp_link, folder / "last.pt")
    except OSError as err:
        tmp_link.unlink(missing_ok=True)
        raise CheckpointError(f"cannot point {folder / 'last.pt'} at {path.name}: {err.strerror or err}") from err
    _fsync_dir(folder)
    files = step_files(folder)
    newer = [p for p in files if step_of(p) > step]
    older = [p for p in files if step_of(p) <= step]
    for old in newer + older[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_latest(
    folder: str | os.PathLike, map_location: str | torch.device = "cpu", max_step: int | None = None
) -> tuple[dict, Path] | None:
    """The newest readable checkpoint in ``folder`` (step files newest first, then ``last.pt``).

    Step files come first because a writer killed between writing ``step_N.pt`` and relinking
    ``last.pt`` leaves ``last.pt`` one checkpoint behind. A corrupt or truncated file is skipped
    with a warning. ``max_step`` keeps only checkpoints at or before that step (then ``last.pt``,
    whose step is unknown without reading it, is not considered). Returns None when there is none.
    """
    folder = Path(folder)
    candidates = [p for p in reversed(step_files(folder)) if max_step is None or step_of(p) <= max_step]
    if max_step is None:
        candidates.append(folder / "last.pt")
    for path in candidates:
        if not path.is_file():
            continue
        try:
            return safe_load(path, map_location), path
        except CheckpointError as err:
            log.warning("%s; trying an older checkpoint", err)
    return None
