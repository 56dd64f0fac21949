"""Where images live, one rule for every command: ``data.path`` is the root, ``data.split`` and
``data.eval_split`` its sub-folders (ImageNet layout), ``data.split=.`` the root itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conmim.cli import main
from conmim.config import DataConfig
from conmim.data.sources import DataError, build_source, split_location

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = {"n01440764": (200, 40, 40), "n01443537": (40, 40, 200)}


def imagenet_layout(root: Path, per_class: dict[str, int]) -> Path:
    """``root/<split>/<class>/*.jpg``: real JPEG files, each class its own dominant colour plus noise."""
    rng = np.random.default_rng(0)
    for split, count in per_class.items():
        for name, colour in CLASSES.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 40, (20, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{name}_{k}.JPEG", format="JPEG", quality=90)
    return root


def test_pretrain_then_knn_on_an_imagenet_style_folder(tmp_path, tiny_overrides, capsys):
    root = imagenet_layout(tmp_path / "imagenet", {"train": 8, "val": 3})
    run = tmp_path / "run"  # tiny_overrides: output_dir
    data = ["data.source=folder", f"data.path={root}", "data.split=train", "data.eval_split=val"]
    assert (
        main(
            [
                "pretrain",
                *tiny_overrides,
                *data,
                "train.max_steps=2",
                "eval.final_knn=true",
                "eval.final_min_steps=0",
                "linprobe.epochs=2",
            ]
        )
        == 0
    )
    final = json.loads((run / "final_eval.json").read_text())  # after pre-training: train/ and val/ found
    assert final["steps"] == 2 and (final["train_images"], final["test_images"]) == (16, 6)
    assert 0 <= final["knn_top1_teacher"] <= 100
    capsys.readouterr()

    # the run's config.yaml carries the data root: knn finds train/ and val/ without any override
    assert main(["knn", str(run), f"output_dir={tmp_path / 'eval'}"]) == 0
    result = json.loads((tmp_path / "eval" / "knn" / "results.json").read_text())
    assert result["train_images"] == 16 and result["test_images"] == 6
    assert 0 <= result["top1"] <= 100


def test_a_missing_split_folder_is_named(tmp_path, tiny_overrides, capsys):
    root = imagenet_layout(tmp_path / "imagenet", {"train": 1})
    # the old habit: data.path pointing at the split folder itself
    code = main(["pretrain", *tiny_overrides, "data.source=folder", f"data.path={root / 'train'}", "data.split=train"])
    err = capsys.readouterr().err
    assert code == 2 and str(root / "train" / "train") in err and f"data.path={str(root)!r}" in err
    with pytest.raises(DataError, match=str(root / "val")):  # no held-out folder
        build_source(DataConfig(source="folder", path=str(root), eval_split="val"), 16, "val")


def test_split_location_rule(tmp_path):
    root = imagenet_layout(tmp_path / "imagenet", {"train": 1, "val": 1})
    cfg = DataConfig(source="folder", path=str(root))
    assert split_location(cfg, "val") == str(root / "val")
    assert split_location(cfg, ".") == str(root)
    assert len(build_source(cfg, 16)) == 2 and len(build_source(cfg, 16, ".")) == 4  # default: data.split=train
    (tmp_path / "names_train.txt").write_text("a.jpg 0\n")
    lists = DataConfig(source="list", path=str(tmp_path / "names.txt"))
    assert split_location(lists, "train") == str(tmp_path / "names_train.txt")
    assert split_location(lists, ".") == str(tmp_path / "names.txt")
    with pytest.raises(DataError, match="names_test.txt"):
        split_location(lists, "test")


def test_every_source_kind_meets_the_source_protocol(tmp_path, fashion_mnist_dir):
    from PIL import Image

    from conmim.data.shards import ShardSource, shard_paths
    from conmim.data.sources import Source, SyntheticSource, fashion_mnist, image_folder, list_file
    from conmim.eval.common import limit_source
    from conmim.tools.shards import pack_shards

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / c / "x.png")
    (tmp_path / "list.txt").write_text("a/x.png 0\nb/x.png 1\n")
    sources = [
        image_folder(tmp_path),
        list_file(tmp_path / "list.txt"),
        fashion_mnist(fashion_mnist_dir, "test"),
        SyntheticSource(4, 8),
    ]
    sources.append(limit_source(sources[2], 5))
    sources.append(ShardSource(shard_paths(pack_shards(str(tmp_path), str(tmp_path / "shards"), 1).pattern)))
    for source in sources:
        assert isinstance(source, Source), type(source)
        image, label = source[len(source) - 1]
        assert isinstance(image, Image.Image) and isinstance(label, int) and isinstance(source.name(0), str)
    assert sources[0].classes == ["a", "b"] == sources[5].classes and sources[4].classes == sources[2].classes
