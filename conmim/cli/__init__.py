"""The ``conmim`` command line: ``conmim pretrain|export|knn|linprobe|finetune|segment|detect|scenes|...``.

(also ``convert``, ``shards``, ``stats``, ``bench`` and ``visualize``; one sub-command each)."""

from __future__ import annotations

import logging
import sys

from ..config import ConfigError
from ..data.sources import DataError
from ..export.onnx import ExportError
from ..runtime.checkpoint import CheckpointError
from ..runtime.lock import FolderLockedError
from ..runtime.preemption import EXIT_PREEMPTED, Preempted
from ..train.guard import NonFiniteError
from .parser import build_parser, parse_args

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(build_parser(), argv)
    try:
        return args.func(args)
    except Preempted as stopped:
        print(f"conmim: {stopped}", file=sys.stderr)
        return EXIT_PREEMPTED
    except (ConfigError, DataError, OSError, CheckpointError, NonFiniteError, ExportError, FolderLockedError) as err:
        print(f"conmim: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:
        from ..runtime.distributed import describe_failure

        if (message := describe_failure(err)) is None:
            raise
        print(f"conmim: error: {message}", file=sys.stderr)
        return 3


def _one_line(err: BaseException) -> str:
    """The message of ``err``; for an error re-raised from a data-loader worker, the original one."""
    text = str(err).strip()
    if "Original Traceback" in text:  # DataLoader wraps a worker's exception in its traceback
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text
