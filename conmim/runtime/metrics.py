"""The metrics writer of every training command: ``metrics.jsonl`` plus TensorBoard events."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _step_of_record(line: str) -> int | None:
    """The step of one ``metrics.jsonl`` line, or None for a line cut short by a crash."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class MetricsWriter:
    """``metrics.jsonl`` plus TensorBoard events (scalars named ``tag/key``), rank 0 only."""

    def __init__(self, out: Path, resume_step: int, tag: str = "pretrain"):
        self.tag = tag
        self.out, self.path, self.tb = out, out / "metrics.jsonl", None
        self.rewind(resume_step)

    def rewind(self, step: int) -> None:
        """Drop records after ``step`` (the checkpoint a run resumes from) and lines cut short by a crash."""
        if self.path.exists():
            lines = self.path.read_text().splitlines()
            kept = [ln for ln in lines if (s := _step_of_record(ln)) is not None and s <= step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        from torch.utils.tensorboard import SummaryWriter

        if self.tb is not None:
            self.tb.close()
        self.tb = SummaryWriter(str(self.out / "tensorboard"), purge_step=step + 1 if step else None)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(f"{self.tag}/{key}", value, record["step"])

    def close(self) -> None:
        self.tb.close()
