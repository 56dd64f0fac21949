"""conmim study end to end on a tiny protocol: real Fashion-MNIST subsets, real runs, report files, skip on rerun."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from conmim.cli import main
from conmim.config import ConfigError
from conmim.tools.study import load_study, plan

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_STUDY = """
study:
  output_dir: {out}/runs
  docs_dir: {out}/docs
  seeds: [0]
  train_images: 128
  test_images: 64
  variants:
    - {{name: conmim, seeds: [0, 1], finetune: false}}
    - {{name: pixel, overrides: [model.objective=pixel], finetune: false}}
    - {{name: scratch, pretrain: false}}
base:
  model: {{arch: vit_tiny, encoder: vit, depth: 2, img_size: 32, patch_size: 4, proj_hidden_dim: 64, proj_out_dim: 32}}
  data: {{num_workers: 0, crop_scale_min: 0.25}}
  train: {{batch_size: 32, epochs: 1, precision: fp32, log_every: 1, checkpoint_every: 2, warmup_epochs: 0.25}}
  eval: {{pool: mean}}
  linprobe: {{epochs: 2, warmup_epochs: 0}}
  finetune: {{epochs: 1, batch_size: 32, mixup: 0.0, cutmix: 0.0, auto_augment: "", reprob: 0.0, crop_pct: 1.0}}
"""


def test_tiny_study_runs_reports_and_skips_finished_stages(tmp_path):
    config = tmp_path / "study.yaml"
    config.write_text(TINY_STUDY.format(out=tmp_path))
    study, _base = load_study(config)
    assert [(v.name, s) for v, s in plan(study)] == [("conmim", 0), ("pixel", 0), ("scratch", 0), ("conmim", 1)]
    assert main(["study", "--config", str(config)]) == 0

    results = json.loads((tmp_path / "docs" / "results.json").read_text())
    runs = {(r["variant"], r["seed"]): r for r in results["runs"]}
    assert set(runs) == {("conmim", 0), ("conmim", 1), ("pixel", 0), ("scratch", 0)}
    assert "finetune_top1" not in runs[("conmim", 0)] and 0 <= runs[("scratch", 0)]["finetune_top1"] <= 100
    # scratch fine-tunes for its own epoch plus the pre-training's 4 steps (one 4-step epoch)
    assert runs[("scratch", 0)]["finetune_epochs"] == 2
    assert all(0 <= r["knn_top1"] <= 100 and 0 <= r["linprobe_top1"] <= 100 for r in runs.values())
    conmim = next(row for row in results["aggregate"] if row["variant"] == "conmim")
    assert len(conmim["knn_top1"]["values"]) == 2 and conmim["knn_top1"]["std"] is not None
    assert "| conmim | 2 |" in (tmp_path / "docs" / "table.md").read_text()
    for png in ("pretrain_curves.png", "accuracy_bars.png"):
        with Image.open(tmp_path / "docs" / png) as im:
            assert im.width > 400 and im.height > 200

    stages = tmp_path / "runs" / "conmim_s0" / "stages.json"
    before = stages.read_text()
    assert main(["study", "--config", str(config)]) == 0  # everything finished: nothing reruns
    assert stages.read_text() == before
    again = json.loads((tmp_path / "docs" / "results.json").read_text())
    assert again["runs"] == results["runs"]


def test_bad_variant_override_fails_before_any_work(tmp_path):
    config = tmp_path / "study.yaml"
    config.write_text(TINY_STUDY.format(out=tmp_path).replace("model.objective=pixel", "model.objectiv=pixel"))
    with pytest.raises(ConfigError, match="pixel"):
        load_study(config)
    assert not (tmp_path / "runs").exists()
