"""``data.source=scenes``: pre-training (and ``conmim stats``) read the built-in scenes' training
images, generated on first use, and the commands that need image labels refuse them by name."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import FASHION_MNIST, TINY
from PIL import Image

from conmim.cli import main
from conmim.config import load_config
from conmim.data.scenes import SceneParams, scene, source_for
from conmim.data.sources import fashion_mnist

pytestmark = pytest.mark.usefixtures("one_thread")


def _scenes(tmp_path, train: int = 16) -> list[str]:
    return [
        "data.source=scenes",
        f"data.path={FASHION_MNIST}",
        f"scenes.dir={tmp_path / 'scenes'}",
        f"scenes.train={train}",
        "scenes.val=4",
        "scenes.size=32",
        "scenes.seed=5",
    ]


def test_pretraining_generates_and_reads_the_scenes(tmp_path):
    run = tmp_path / "run"
    assert main(["pretrain", *TINY, *_scenes(tmp_path), "train.max_steps=2", f"output_dir={run}"]) == 0
    meta = json.loads((tmp_path / "scenes" / "scenes.json").read_text())
    assert meta["params"] == {**meta["params"], "train": 16, "val": 4, "size": 32, "seed": 5}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2] and np.isfinite(rows[-1]["loss"])
    assert (run / "checkpoints" / "last.pt").is_file()
    # The images it trained on are the training scenes, unlabelled, in scene order.
    source = source_for(load_config(None, [*TINY, *_scenes(tmp_path)], command="pretrain"))
    assert len(source) == 16 and {source[i][1] for i in range(16)} == {-1}
    params = SceneParams(16, 4, 32, seed=5)
    expected = scene(params, "training", 3, fashion_mnist(FASHION_MNIST, "train")).image
    assert np.array_equal(np.asarray(source[3][0]), expected)


def test_stats_of_the_scenes_match_their_pixels(tmp_path, capsys):
    assert main(["stats", *_scenes(tmp_path, train=8), "--split", "test"]) == 0
    shown = json.loads(capsys.readouterr().out.split("\ndata.mean")[0])
    pixels = np.stack(
        [np.asarray(Image.open(p)) for p in sorted((tmp_path / "scenes" / "images" / "validation").glob("*.png"))]
    )
    assert shown["images"] == 4
    assert np.allclose(shown["mean"], pixels.reshape(-1, 3).mean(0) / 255, atol=1e-4)


def test_commands_that_need_labels_refuse_the_scenes(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", *TINY, "train.max_steps=1", f"output_dir={run}"]) == 0
    capsys.readouterr()
    assert main(["knn", str(run), *_scenes(tmp_path)]) == 2
    assert "data.source=scenes: the built-in scenes' images carry no image labels" in capsys.readouterr().err
    assert main(["pretrain", *TINY, *_scenes(tmp_path), "model.in_chans=1", f"output_dir={tmp_path / 'b'}"]) == 2
    err = capsys.readouterr().err
    assert "model.in_chans" in err and "data.source=scenes" in err
    assert main(["pretrain", *TINY, *_scenes(tmp_path), "data.split=holdout", f"output_dir={tmp_path / 'c'}"]) == 2
    assert "data.split='holdout': the scenes have the splits" in capsys.readouterr().err
