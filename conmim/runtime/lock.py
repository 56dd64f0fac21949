"""One run per output folder: an exclusive OS lock on ``OUTPUT_DIR/.lock`` for the run's lifetime.

``fcntl.flock`` locks belong to the open file: the kernel drops them when the process ends, however it
ends, so ``kill -9`` never leaves a stale lock behind. The file records the holder (pid, host, command),
which a second run on the same folder names in its error. Commands that only read a run (``knn``,
``export``, ``visualize``) take no lock and keep working on a folder a run holds.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
from pathlib import Path

LOCK_NAME = ".lock"


class FolderLockedError(RuntimeError):
    """Another live process holds the run folder; the message names it."""


class FolderLock:
    """Hold ``folder``'s lock until :meth:`release` (or process exit); raises :class:`FolderLockedError`."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            os.close(self._fd)
            self._fd = None
            raise FolderLockedError(
                f"{self.path.parent} is in use by another run ({holder}); stop it or choose another output_dir"
            ) from None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (json.dumps(me) + "\n").encode(), 0)

    def _holder(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            info = {}
        if not info:
            return "holder unknown"
        return f"pid {info.get('pid')} on {info.get('host')}: {info.get('command', '')}".rstrip(": ")

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock; the file stays, holding no lock
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
