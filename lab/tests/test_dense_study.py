"""The dense study harness end to end on tiny scenes: real `conmim pretrain`, `conmim segment` and
`conmim detect` subprocesses, records, the summary, the side-by-side picture, and skip on rerun."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import FASHION_MNIST
from PIL import Image
from tiny import TINY

from lab.dense_study import main

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

SEGMENT = ["segment.crop_size=32", "segment.base_size=32", "segment.channels=16", "segment.batch_size=4",
           "segment.warmup_iters=1", "segment.log_every=1", "segment.checkpoint_every=2", "precision=fp32",
           "data.num_workers=0", "segment.pictures=2"]  # fmt: skip
DETECT = ["detect.masks=false", "detect.img_size=32", "detect.out_channels=16", "detect.batch_size=2",
          "detect.iters=1", "detect.warmup_iters=1", "precision=fp32", "data.num_workers=0"]  # fmt: skip


def _study(tmp_path) -> str:
    scenes = [f"scenes.dir={tmp_path / 'scenes'}", "scenes.train=24", "scenes.val=4", "scenes.size=32"]
    study = {
        "study": {
            "output_dir": str(tmp_path / "runs"),
            "records_dir": str(tmp_path / "records"),
            "pretrain_overrides": [*TINY, f"data.path={FASHION_MNIST}", *scenes, "train.max_steps=2"],
            "variants": [{"name": "conmim", "overrides": []}],
            "seeds": [0],
            "labelled": [8],
            "recipe": [*SEGMENT, "segment.iters=2"],
            "linear": [*SEGMENT, "segment.iters=2", "segment.head=linear"],
            "sweep": {
                "labelled": 8,
                "holdout": [20, 24],
                "recipes": [[*SEGMENT, "segment.iters=1"]],
                "curve": [*SEGMENT, "segment.iters=2", "segment.eval_every=1"],
            },
            "detect": {"labelled": 8, "recipe": DETECT, "sweep": [DETECT], "pretrained": [DETECT]},
        }
    }
    path = tmp_path / "study.yaml"
    path.write_text(json.dumps(study))  # JSON is YAML
    return str(path)


def test_dense_study_runs_reports_and_skips_finished_commands(tmp_path):
    config = _study(tmp_path)
    assert main([config, "--sweep"]) == 0
    sweep = [json.loads(line) for line in (tmp_path / "records" / "sweep.jsonl").read_text().splitlines()]
    assert len(sweep) == 1 and sweep[0]["start"] == "scratch" and 0 <= sweep[0]["mIoU"] <= 100
    # the sweep scores on held-out training scenes 20-23, never on the validation scenes
    assert (
        "runs/data/holdout/images" in sweep[0]["command"]
        and len(list((tmp_path / "runs/data/holdout/images").iterdir())) == 4
    )

    assert main([config]) == 0
    records = tmp_path / "records"
    rows = [json.loads(line) for line in (records / "runs.jsonl").read_text().splitlines()]
    assert [r.get("stage", r.get("tag")) for r in rows] == [
        "pretrain",
        "upernet_8",
        "linear_8",
        "upernet_8",
        "linear_8",
    ]
    assert [r.get("start") for r in rows[1:]] == ["scratch", "scratch", "conmim", "conmim"]
    assert all(r["command"].startswith("conmim ") and r["commit"] for r in rows)
    summary = json.loads((records / "dense_summary.json").read_text())
    assert set(summary["segment_miou"]) == {"scratch", "conmim"}
    assert len(summary["segment_miou"]["conmim"]["8"]) == 1 and set(summary["segment_linear_miou"]) == {
        "scratch",
        "conmim",
    }
    # the picture: image, truth, then scratch's and ConMIM's predictions, one column each
    one = Image.open(tmp_path / "runs/segment/scratch_s0_upernet_8/segment/predictions.png")
    both = Image.open(records / "predictions_upernet_8.png")
    assert both.size == (one.width // 3 * 4, one.height)
    assert (records / "pretrain" / "conmim_s0" / "metrics.jsonl").is_file()

    before = (records / "runs.jsonl").read_text()
    assert main([config]) == 0  # everything recorded: nothing runs again
    assert (records / "runs.jsonl").read_text() == before

    assert main([config, "--curve"]) == 0  # every start, evaluated along the way on the held-out scenes
    curve = [json.loads(line) for line in (records / "curve.jsonl").read_text().splitlines()]
    assert [r["start"] for r in curve] == ["scratch", "conmim"]
    assert all([h["step"] for h in r["history"]] == [1] and "holdout" in r["command"] for r in curve)

    assert main([config, "--detect-sweep"]) == 0  # the detection recipes, scored on held-out scenes 20-23
    sweep = [json.loads(line) for line in (records / "detect_sweep.jsonl").read_text().splitlines()]
    assert [r["start"] for r in sweep] == ["scratch", "conmim"] and all(0 <= r["bbox_AP50"] <= 100 for r in sweep)
    holdout = json.loads((tmp_path / "runs/data/coco_holdout.json").read_text())
    assert [i["file_name"] for i in holdout["images"]] == [f"training/scene_{i:05d}.png" for i in range(20, 24)]
    assert {a["image_id"] for a in holdout["annotations"]} <= {i["id"] for i in holdout["images"]}

    shutil.rmtree(tmp_path / "runs" / "conmim_s0")  # a new machine: the records, not the run folders
    assert main([config, "--detect"]) == 0  # every start with the recipe, on the validation scenes
    assert (tmp_path / "runs/conmim_s0/pretrain/checkpoints/last.pt").is_file()  # made again from its seed
    rows = [json.loads(line) for line in (records / "runs.jsonl").read_text().splitlines()]
    assert [r.get("stage") for r in rows].count("pretrain") == 1
    detections = [r for r in rows if r.get("tag") == "detect"]
    assert [r["start"] for r in detections] == ["scratch", "conmim"]
    assert all("coco_validation.json" in r["command"] and "coco_train_8.json" in r["command"] for r in detections)
    summary = json.loads((records / "dense_summary.json").read_text())
    assert set(summary["detect_box_ap50"]) == {"scratch", "conmim"} and len(summary["detect_box_ap"]["conmim"]) == 1
