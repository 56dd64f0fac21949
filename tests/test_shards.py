"""Tar shards (``data.source=webdataset``): packing, reading by index, exact resume, ranks, damaged shards."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset

from conmim.cli import main
from conmim.config import load_config
from conmim.data.gpu_views import EncodedPretrainDataset
from conmim.data.masking import MaskGenerator
from conmim.data.pretrain import EpochSampler, PretrainDataset, read_skipped
from conmim.data.shards import ShardSource, shard_paths
from conmim.data.sources import DataError, build_source, image_folder
from conmim.data.views import PairedViews
from conmim.eval.common import eval_sources, num_classes_of
from conmim.train.engine import pretrain


@pytest.fixture
def labelled(tmp_path, natural_images) -> Path:
    """24 real images (PNG and JPEG) in two class folders, the layout of an ImageNet split."""
    files = sorted(natural_images.glob("*.png"))[:16] + sorted(natural_images.glob("*.jpg"))[:8]
    root = tmp_path / "images"
    for i, f in enumerate(files):
        cls = root / ("cat" if i % 2 else "dog")
        cls.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, cls / f.name)
    return root


def pack(src: Path, out: Path, *extra: str) -> list[Path]:
    assert main(["shards", str(src), str(out), "--shard-size", "5", *extra]) == 0
    return sorted(out.glob("*.tar"))


def image_member(shard: Path, sample: int) -> tarfile.TarInfo:
    """The tar member holding sample ``sample``'s image (each sample: KEY.cls, then KEY.png or KEY.jpg)."""
    with tarfile.open(shard) as tar:
        return next(m for m in tar.getmembers() if m.name.startswith(f"{sample:08d}.") and not m.name.endswith(".cls"))


def test_packed_shards_hold_the_folder_bytes_labels_and_classes(tmp_path, labelled, capsys):
    shards = pack(labelled, tmp_path / "shards")
    assert [s.name for s in shards] == [f"shard-00000{k}.tar" for k in range(5)]  # 24 images, 5 a shard
    assert "use: data.source=webdataset data.path=" in capsys.readouterr().out
    folder, source = image_folder(labelled), ShardSource(shard_paths(str(tmp_path / "shards")))
    assert len(source) == len(folder) == 24
    assert source.labels == folder.labels and source.classes == folder.classes == ["cat", "dog"]
    assert all(source.raw(i) == folder.raw(i) for i in range(24))
    assert source.name(7) == f"{shards[1]}:00000007{Path(folder.name(7)).suffix}"
    # the webdataset package's own streaming reader sees the same samples in the same order
    pattern = str(tmp_path / "shards" / "shard-{000000..000004}.tar")
    streamed = list(wds.WebDataset(pattern, shardshuffle=False))
    assert [s["__key__"] for s in streamed] == [f"{i:08d}" for i in range(24)]
    assert [s.get("png", s.get("jpg")) for s in streamed] == [source.raw(i) for i in range(24)]
    assert [int(s["cls"]) for s in streamed] == folder.labels
    # reproducible, and one plain ustar header per member (what the index scan reads)
    again = pack(labelled, tmp_path / "again")
    assert [s.read_bytes() for s in again] == [s.read_bytes() for s in shards]
    with tarfile.open(shards[0]) as tar:
        assert not any(m.pax_headers for m in tar.getmembers())


def test_pretraining_from_shards_equals_the_folder_run_and_resumes_exactly(tmp_path, tiny_overrides, labelled):
    """Same images, same order, same bytes: the shard run is the folder run, bitwise; a resumed shard run
    (with 2 data-loader workers) is the uninterrupted one."""
    pack(labelled, tmp_path / "shards")
    base = tiny_overrides + ["train.batch_size=4", "train.epochs=2", "model.drop_path=0.1", "data.split=."]
    shards = ["data.source=webdataset", f"data.path={tmp_path / 'shards'}"]
    folder = ["data.source=folder", f"data.path={labelled}"]

    def run(name: str, data: list[str], steps: int, *extra: str) -> dict:
        cfg = load_config(None, base + data + [f"train.max_steps={steps}", f"output_dir={tmp_path / name}", *extra])
        return pretrain(cfg)["model"].state_dict()

    full = run("full", shards, 7)
    from_folder = run("folder", folder, 7)
    run("split", shards, 3)
    resumed = run("split", shards, 7, "data.num_workers=2")
    for key in full:
        assert torch.equal(full[key], from_folder[key]), key
        assert torch.equal(full[key], resumed[key]), key

    def records(name: str) -> list[dict]:
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k != "img_per_s"} for x in lines]

    assert records("full") == records("folder")
    assert [r for r in records("split") if r["step"] != 3] == records("full")


class _Names(Dataset):
    """Which sample a key reads, and in which worker process."""

    def __init__(self, source):
        self.source = source

    def __getitem__(self, key):
        info = torch.utils.data.get_worker_info()
        return self.source.name(key[1]), info.id if info else -1


def test_ranks_and_workers_read_disjoint_samples(tmp_path, labelled):
    pack(labelled, tmp_path / "shards")
    source = ShardSource(shard_paths(str(tmp_path / "shards")))
    seen: dict[int, list[str]] = {}
    for rank in range(2):
        sampler = EpochSampler(len(source), batch_size=3, rank=rank, world_size=2, seed=5)
        loader = DataLoader(_Names(source), batch_size=3, sampler=sampler, num_workers=2, collate_fn=list)
        batches = [batch for batch, _ in zip(loader, range(sampler.steps_per_epoch), strict=False)]
        items = [item for batch in batches for item in batch]
        assert {worker for _, worker in items} == {0, 1}  # both workers read
        seen[rank] = [name for name, _ in items]
    assert len(seen[0]) == len(seen[1]) == 12
    assert len(set(seen[0]) | set(seen[1])) == 24  # every image once in the epoch, no rank repeats another's
    assert all(":" in name and name.split(":")[0].endswith(".tar") for name in seen[0])


def _dataset(source, on_error: str, skip_log: Path | None = None) -> PretrainDataset:
    return PretrainDataset(source, PairedViews(16), MaskGenerator((4, 4), "random", 0.5), 0, on_error, skip_log)


def test_a_corrupt_member_is_named_by_shard_and_member(tmp_path, labelled):
    shards = pack(labelled, tmp_path / "shards")
    bad = image_member(shards[1], 7)  # samples 5-9 are in the second shard
    with open(shards[1], "r+b") as f:
        f.seek(bad.offset_data)
        f.write(b"not an image at all" * (bad.size // 19))
    source = ShardSource(shard_paths(str(tmp_path / "shards")))
    assert source.name(7).startswith(f"{shards[1]}:00000007.")
    with pytest.raises(DataError, match=rf"cannot read {source.name(7)}: .*data.on_error=raise"):
        _dataset(source, "raise")[(0, 7)]
    log = tmp_path / "skipped.txt"
    weak, _, _ = _dataset(source, "skip", log)[(0, 7)]  # the next readable sample instead
    assert weak.shape == (3, 16, 16)
    assert list(read_skipped(log)) == [source.name(7)]


def test_a_corrupt_tar_header_or_truncated_shard_is_named_or_skipped_and_listed(
    tmp_path, labelled, tiny_overrides, capsys
):
    shards = pack(labelled, tmp_path / "shards")
    header = image_member(shards[2], 12)
    with open(shards[2], "r+b") as f:
        f.seek(header.offset + 148)  # the header checksum: tarfile alone would end the shard here silently
        f.write(b"9999999\0")
    cut = image_member(shards[4], 21)  # truncated mid-way
    with open(shards[4], "r+b") as f:
        f.truncate(cut.offset_data + cut.size // 2)
    where = str(tmp_path / "shards")
    with pytest.raises(DataError, match=rf"cannot read {shards[2]}:00000012.cls: corrupt tar header at byte"):
        ShardSource(shard_paths(where), on_error="raise")
    source = ShardSource(shard_paths(where), on_error="skip")
    assert len(source) == 24 - 3 - 3  # #12-#14 from the bad header on (#12's label is kept alone), #21-#23
    assert [name for name, _ in source.skipped] == [f"{shards[2]}:00000012.cls", f"{shards[4]}:{cut.name}"]
    assert "truncated" in source.skipped[1][1]
    log = tmp_path / "skipped.txt"
    _dataset(source, "skip", log)
    assert list(read_skipped(log)) == [name for name, _ in source.skipped]
    # the real command: one line naming shard and member under raise; a run and its list under skip
    data = ["data.source=webdataset", f"data.path={where}", "data.split=.", "train.max_steps=2"]
    assert main(["pretrain", *tiny_overrides, *data, "data.on_error=raise"]) == 2
    assert f"conmim: error: cannot read {shards[2]}:00000012.cls: corrupt tar header" in capsys.readouterr().err
    assert main(["pretrain", *tiny_overrides, *data]) == 0
    listed = read_skipped(Path(tiny_overrides[-1].split("=", 1)[1]) / "skipped_files.txt")
    assert sorted(listed) == sorted(name for name, _ in source.skipped)


def test_missing_shards_and_splits_are_clear_errors(tmp_path, labelled):
    pack(labelled, tmp_path / "shards")
    with pytest.raises(DataError, match=r"2 of 7 shard\(s\) not found, first .*shard-000005.tar"):
        shard_paths(str(tmp_path / "shards" / "shard-{000000..000006}.tar"))
    with pytest.raises(DataError, match="holds no .tar files"):
        shard_paths(str(labelled))
    with pytest.raises(DataError, match="reads local shard files"):
        shard_paths("https://example.org/shard-{000000..000004}.tar")
    cfg = load_config(None, ["data.source=webdataset", f"data.path={tmp_path}/shards/shard-{{000000..000004}}.tar"])
    source = build_source(cfg.data, 16)
    assert len(source) == 24  # a pattern without {split}: the training split
    assert build_source(cfg.data, 16) is source  # scanned once while the shards are unchanged
    with open(tmp_path / "shards" / "shard-000004.tar", "ab") as f:
        f.write(bytes(10240))  # more zero trailer: the same samples, a changed shard
    again = build_source(cfg.data, 16)
    assert again is not source and len(again) == 24
    with pytest.raises(DataError, match=r"names no shards of split 'test'.*\{split\}"):
        build_source(cfg.data, 16, "test")


def test_evaluation_reads_labelled_shard_splits(tmp_path, labelled):
    for split in ("train", "test"):
        pack(labelled, tmp_path / "root" / split)
    for path in (tmp_path / "root", f"{tmp_path}/root/{{split}}/shard-{{000000..000004}}.tar"):
        cfg = load_config(None, ["data.source=webdataset", f"data.path={path}", "data.train_limit=10"])
        train, test = eval_sources(cfg, 16)
        assert (len(train), len(test)) == (10, 24)
        assert num_classes_of(train, test) == 2 and test.classes == ["cat", "dog"]
        assert sorted(set(test.labels)) == [0, 1]


def test_device_data_path_reads_shards_like_the_folder(tmp_path, labelled):
    pack(labelled, tmp_path / "shards")
    args = (PairedViews(16), MaskGenerator((4, 4), "random", 0.5))
    from_shards = EncodedPretrainDataset(ShardSource(shard_paths(str(tmp_path / "shards"))), *args)
    from_folder = EncodedPretrainDataset(image_folder(labelled), *args)
    for index in (0, 17):
        a, b = from_shards[(1, index)], from_folder[(1, index)]
        assert all(torch.equal(x, y) for x, y in zip(a[:3], b[:3], strict=True))


def test_packing_refuses_a_non_image_or_lists_it(tmp_path, labelled, capsys):
    (labelled / "cat" / "notes.jpg").write_text("not an image")
    assert main(["shards", str(labelled), str(tmp_path / "a")]) == 2
    assert "cannot pack" in (err := capsys.readouterr().err) and "notes.jpg" in err and "--on-error skip" in err
    shards = pack(labelled, tmp_path / "b", "--on-error", "skip")
    assert "1 file(s) skipped" in capsys.readouterr().out
    assert len(ShardSource(shard_paths(str(tmp_path / "b")))) == 24 and len(shards) == 5
    assert "notes.jpg" in (tmp_path / "b" / "skipped_files.txt").read_text()
    assert main(["shards", str(labelled), str(tmp_path / "b")]) == 2
    assert "already holds shards" in capsys.readouterr().err


def test_packing_a_list_file_keeps_its_labels(tmp_path, labelled):
    files = sorted(labelled.rglob("*.png"))[:4]
    (tmp_path / "list.txt").write_text("".join(f"{f} {k % 3}\n" for k, f in enumerate(files)) + f"{files[0]}\n")
    pack(tmp_path / "list.txt", tmp_path / "shards")
    source = ShardSource(shard_paths(str(tmp_path / "shards")))
    assert source.labels == [0, 1, 2, 0, -1] and source.classes == []  # no label: no .cls member
    assert source.raw(2) == files[2].read_bytes()


def test_without_the_webdataset_package_the_error_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "webdataset", None)
    with pytest.raises(DataError, match=r"pip install 'conmim\[webdataset\]'"):
        shard_paths("shards/train-{000000..000009}.tar")


@pytest.mark.slow  # two torchrun processes
def test_two_ranks_from_shards_train_as_from_the_folder(tmp_path, labelled):
    """Under torchrun (2 gloo ranks, 2 workers each) the shard run splits the epoch as the folder run does:
    the same metrics and the same final weights, bitwise."""
    from reliability_utils import assert_same_state, final_state, records, run, torchrun_cmd

    pack(labelled, tmp_path / "shards")
    for name, data in (("shards", tmp_path / "shards"), ("folder", labelled)):
        source = "webdataset" if name == "shards" else "folder"
        overrides = [f"data.source={source}", f"data.path={data}", "data.split=.", "data.num_workers=2"]
        proc = run(torchrun_cmd(tmp_path / name, *overrides), timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert records(tmp_path / "shards") == records(tmp_path / "folder")
    assert len(records(tmp_path / "shards")) == 6  # 24 images, 4 per rank: 3 steps an epoch, 2 epochs
    assert_same_state(final_state(tmp_path / "shards"), final_state(tmp_path / "folder"))
