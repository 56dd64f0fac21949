"""The data error every reader raises, in a module of its own so that readers can share it without
importing each other."""

from __future__ import annotations

import os
import stat


class DataError(ValueError):
    """A data source that cannot be used; the message names the path and the reason."""


def require_regular_file(path: str | os.PathLike) -> None:
    """Raise :class:`DataError` for a path that is not a regular file: a FIFO would block a reader
    forever and a directory cannot be decoded. ``os.stat`` follows links, so a loop raises ELOOP."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise DataError(f"{path}: not a regular file")
