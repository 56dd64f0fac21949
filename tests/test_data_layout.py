"""Where images live, one rule for every command: ``data.path`` is the root, ``data.split`` and
``data.eval_split`` its sub-folders (ImageNet layout), ``data.split=.`` the root itself; a root without
a training split folder (flat images, class sub-folders) is the training images itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conmim.cli import main
from conmim.config import DataConfig
from conmim.data.sources import DataError, build_source, has_split, split_location, split_missing

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = {"n01440764": (200, 40, 40), "n01443537": (40, 40, 200)}


def imagenet_layout(root: Path, per_class: dict[str, int]) -> Path:
    """``root/<split>/<class>/*.jpg``: real JPEG files, each class its own dominant colour plus noise
    (split ``.``: ``root/<class>/*.jpg``, class folders without splits)."""
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
    data = ["data.source=folder", f"data.path={root}", "data.eval_split=val"]  # data.split: train by default
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


def test_a_split_folder_given_as_data_path(tmp_path):
    root = imagenet_layout(tmp_path / "imagenet", {"train": 1, "val": 1})
    # the old habit: data.path pointing at the split folder itself; it holds the training images
    cfg = DataConfig(source="folder", path=str(root / "train"), eval_split="val")
    assert split_location(cfg, "train") == str(root / "train") and len(build_source(cfg, 16)) == 2
    with pytest.raises(DataError, match="data.path looks like a split folder") as err:  # the held-out split
        split_location(cfg, "val")
    assert str(root / "train" / "val") in str(err.value) and f"data.path={str(root)!r}" in str(err.value)
    with pytest.raises(DataError, match=str(root / "test")):  # no held-out folder at the root either
        build_source(DataConfig(source="folder", path=str(root)), 16, "test")


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


def messages(caplog, part: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if part in r.getMessage()]


def test_pretrain_on_a_flat_folder_of_images(tmp_path, tiny_overrides, unlabelled_folder, caplog):
    """A user's first command on a folder of photos: no splits, no labels, no split to set."""
    run, folder = tmp_path / "run", unlabelled_folder
    data = ["data.source=folder", f"data.path={folder}"]
    evals = ["eval.final_knn=true", "eval.final_min_steps=0", "eval.monitor_every=1"]  # as the preset has them
    with caplog.at_level("INFO"):
        assert main(["pretrain", *tiny_overrides, *data, "train.max_steps=2", *evals]) == 0
    assert messages(caplog, "sub-folder: reading") == [
        f"data.path={folder} has no 'train' sub-folder: reading {folder} itself as the training images "
        "(no labels: no class sub-folders)"
    ]
    (skipped,) = messages(caplog, "final evaluation skipped")  # one warning, and the path looked for
    assert "no held-out split" in skipped and str(folder / "test") in skipped
    assert len(messages(caplog, "online k-NN monitor off")) == 1
    assert (run / "checkpoints" / "last.pt").is_file() and not (run / "final_eval.json").exists()


def test_pretrain_on_class_folders_without_splits(tmp_path, tiny_overrides, caplog, capsys):
    root = imagenet_layout(tmp_path / "classes", {".": 8})  # root/<class>/*.JPEG: 16 labelled images
    run = tmp_path / "run"
    data = ["data.source=folder", f"data.path={root}"]
    evals = ["eval.final_knn=true", "eval.final_min_steps=0", "eval.monitor_every=2"]
    monitor = ["eval.monitor_bank=8", "eval.monitor_queries=4", "eval.batch_size=8"]
    with caplog.at_level("INFO"):
        assert main(["pretrain", *tiny_overrides, *data, "train.max_steps=2", *evals, *monitor]) == 0
    # one line, though the online k-NN builds the source again
    assert messages(caplog, "sub-folder: reading") == [
        f"data.path={root} has no 'train' sub-folder: reading {root} itself as the training images "
        "(classes from its sub-folders)"
    ]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("knn_top1" in r for r in records)  # the class folders gave the online k-NN its labels
    (skipped,) = messages(caplog, "final evaluation skipped")
    assert "no held-out split" in skipped and str(root / "test") in skipped
    capsys.readouterr()
    # knn needs the held-out split: an error naming the folder it looked for
    assert main(["knn", str(run), f"output_dir={tmp_path / 'eval'}"]) == 2
    err = capsys.readouterr().err
    assert "held-out split folder" in err and str(root / "test") in err and "data.eval_split='test'" in err


def test_an_imagenet_root_still_reads_its_split_folders(tmp_path, caplog):
    root = imagenet_layout(tmp_path / "imagenet", {"train": 3, "val": 2})
    cfg = DataConfig(source="folder", path=str(root), eval_split="val")
    with caplog.at_level("INFO"):
        assert len(build_source(cfg, 16)) == 6 and len(build_source(cfg, 16, "val")) == 4
    assert build_source(cfg, 16).classes == sorted(CLASSES) and not messages(caplog, "sub-folder: reading")
    assert has_split(cfg, "train") and has_split(cfg, "val") and not has_split(cfg, "test")
    assert str(root / "test") in split_missing(cfg, "test")


def test_what_a_root_without_splits_cannot_be_is_an_error_naming_it(tmp_path, unlabelled_folder):
    folder = lambda path, **kw: DataConfig(source="folder", path=str(path), **kw)  # noqa: E731
    mixed = imagenet_layout(tmp_path / "mixed", {".": 1})  # class folders, and a loose image beside them
    (unlabelled_folder / "img_00.jpg").rename(mixed / "loose.jpg")
    with pytest.raises(DataError, match="holds both image files") as err:
        build_source(folder(mixed), 16)
    assert repr(str(mixed)) in str(err.value) and "loose.jpg" in str(err.value)
    assert len(build_source(folder(mixed, split="."), 16)) == 3  # asked for: every image, without labels
    (unlabelled_folder / "notes").mkdir()  # a sub-folder without images beside the loose ones: still flat
    (unlabelled_folder / "notes" / "readme.txt").write_text("camera trap, 2024\n")
    assert len(build_source(folder(unlabelled_folder), 16)) == 19
    partial = imagenet_layout(tmp_path / "partial", {"val": 1, "test": 1})  # split folders, but no train/
    with pytest.raises(DataError, match="has split folders test, val") as err:
        build_source(folder(partial), 16)
    assert repr(str(partial)) in str(err.value) and "data.split=test" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files") as err:
        build_source(folder(tmp_path / "empty"), 16)
    assert repr(str(tmp_path / "empty")) in str(err.value)
    with pytest.raises(DataError, match="no such folder") as err:
        build_source(folder(tmp_path / "missing"), 16)
    assert repr(str(tmp_path / "missing")) in str(err.value)
    assert not has_split(folder(tmp_path / "missing"), "test")


def test_lists_shards_and_built_in_sources_without_splits(tmp_path, fashion_mnist_dir, caplog):
    from conmim.tools.shards import pack_shards

    root = imagenet_layout(tmp_path / "classes", {".": 2})
    (tmp_path / "names.txt").write_text("".join(f"{p} 0\n" for p in sorted(root.rglob("*.JPEG"))))
    lists = DataConfig(source="list", path=str(tmp_path / "names.txt"))
    with caplog.at_level("INFO"):
        assert len(build_source(lists, 16)) == 4 and not has_split(lists, "test")
        pack_shards(str(root), str(tmp_path / "shards"), 2)  # shard-000000.tar, ... straight in the folder
        shards = DataConfig(source="webdataset", path=str(tmp_path / "shards"))
        assert len(build_source(shards, 16)) == 4 and not has_split(shards, "test")
    assert len(messages(caplog, "reading")) == 2 and "names_train.txt" in messages(caplog, "reading")[0]
    assert str(tmp_path / "names_test.txt") in split_missing(lists, "test")
    fashion = DataConfig(source="fashion_mnist", path=fashion_mnist_dir)
    assert has_split(fashion, "test") and not has_split(fashion, "val")
    assert has_split(DataConfig(source="synthetic"), "test")
