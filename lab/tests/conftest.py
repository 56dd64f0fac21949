"""The lab's tests use the product suite's fixtures (tests/fixtures.py)."""

from pathlib import Path

import pytest
from fixtures import *  # noqa: F403


@pytest.fixture
def tiny_sweep(tmp_path):
    """Writes a lab.sweep preset of a 2-block, 16-px model (3 validation images a class) and returns its
    path; ``fraction`` is its one fraction entry, ``extra`` more lines of the ``sweep`` section."""

    def write(fraction: str, extra: str = "") -> Path:
        config = tmp_path / "sweep.yaml"
        config.write_text(
            f"""
sweep:
  output_dir: {tmp_path}/runs
  records: {tmp_path}/trials.jsonl
  val_per_class: 3
  base: [model.depth=2, model.img_size=16, model.patch_size=4, model.pos_embed=none, model.rel_pos_init=zero,
         precision=fp32, data.num_workers=0, finetune.probe_head_epochs=0, finetune.warmup_epochs=1]
  fractions: [{fraction}]
  recipes: [[finetune.base_lr=1.0e-3], [finetune.base_lr=4.0e-3]]
{extra}"""
        )
        return config

    return write
