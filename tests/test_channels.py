"""Inputs that are not 3-channel photos: array files and their dtype rule, gray photos kept as one
channel, per-channel photometric ops, clear errors naming the file, and ``conmim stats``."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import tifffile
import torch
from channel_data import channel_overrides, write_channel_dataset
from PIL import Image
from tiny import TINY
from torchvision.transforms.v2 import functional as TF

from conmim.cli import main
from conmim.config import ConfigError, MaskConfig, load_config
from conmim.data.channels import ChannelError, as_channels, read_array_file
from conmim.data.masking import MaskGenerator
from conmim.data.pretrain import PretrainDataset
from conmim.data.sources import FileSource, image_folder, list_file
from conmim.data.views import PairedViews, apply_photometric, sample_view_params
from conmim.eval.common import EvalTransform, LabeledDataset
from conmim.tools.stats import channel_stats


def test_npy_layouts_and_dtypes_become_uint8_channels_first(tmp_path):
    x = np.arange(5 * 4 * 6, dtype=np.uint8).reshape(5, 4, 6)
    np.save(tmp_path / "chw.npy", x)
    np.save(tmp_path / "hwc.npy", x.transpose(1, 2, 0))
    np.save(tmp_path / "u16.npy", x.astype(np.uint16) * 257)
    np.save(tmp_path / "u16be.npy", (x.astype(np.uint16) * 257).astype(">u2"))  # big-endian on disk
    np.save(tmp_path / "f32.npy", x.astype(np.float32) / 255)
    for name in ("chw", "hwc", "u16", "u16be", "f32"):
        out = read_array_file(tmp_path / f"{name}.npy", 5)
        assert out.dtype == torch.uint8 and torch.equal(out, torch.from_numpy(x)), name
    np.save(tmp_path / "gray.npy", x[0])
    assert torch.equal(read_array_file(tmp_path / "gray.npy", 1), torch.from_numpy(x[:1]))


@pytest.mark.parametrize(
    "name, array, message",
    [
        ("three.npy", np.zeros((3, 8, 8), np.uint8), "shape (3, 8, 8) has not model.in_chans=5 channels"),
        ("int16.npy", np.zeros((5, 8, 8), np.int16), "dtype int16 is not supported"),
        ("big.npy", np.full((5, 8, 8), 2.0, np.float32), "values span [2, 2]; float arrays must lie in [0, 1]"),
        ("nan.npy", np.full((5, 8, 8), np.nan, np.float64), "float arrays must lie in [0, 1]"),
    ],
)
def test_bad_arrays_are_errors_naming_the_file(tmp_path, name, array, message):
    np.save(tmp_path / name, array)
    with pytest.raises(ChannelError) as err:
        read_array_file(tmp_path / name, 5)
    assert str(tmp_path / name) in str(err.value) and message in str(err.value)


def test_multiband_tiff_and_unsupported_tiff_dtype(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (5, 6, 7), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "planar.tif", x)  # (C, H, W)
    tifffile.imwrite(tmp_path / "contig.tiff", x.transpose(1, 2, 0))  # (H, W, C)
    for name in ("planar.tif", "contig.tiff"):
        assert torch.equal(read_array_file(tmp_path / name, 5), torch.from_numpy(x))
    tifffile.imwrite(tmp_path / "int32.tif", x.astype(np.int32))
    with pytest.raises(ChannelError, match=r"int32\.tif: dtype int32 is not supported"):
        read_array_file(tmp_path / "int32.tif", 5)


def test_tiff_arrays_without_tifffile_say_what_to_install(tmp_path, monkeypatch):
    tifffile.imwrite(tmp_path / "x.tif", np.zeros((5, 4, 4), np.uint8))
    monkeypatch.setitem(sys.modules, "tifffile", None)  # import tifffile now raises ImportError
    with pytest.raises(ChannelError, match=r"x\.tif: TIFF arrays need tifffile: pip install 'conmim\[arrays\]'"):
        read_array_file(tmp_path / "x.tif", 5)


def test_gray_photos_keep_one_channel_and_photos_cannot_feed_five(tmp_path):
    gray = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 20), dtype=np.uint8), "L")
    weak, strong = PairedViews(16, mean=[0.5], std=[0.25])(gray, torch.Generator().manual_seed(0))
    assert weak.shape == strong.shape == (1, 16, 16)
    assert EvalTransform(16, [0.5], [0.25])(gray).shape == (1, 16, 16)
    assert as_channels(gray, 3).mode == "RGB"  # the 3-channel path converts as it always did
    gray.save(tmp_path / "gray.png")
    with pytest.raises(ChannelError, match=r"gray\.png: a RGB photo cannot feed model\.in_chans=5"):
        LabeledDataset(FileSource([str(tmp_path / "gray.png")], [0]), EvalTransform(16, [0.5] * 5, [0.2] * 5))[0]


def test_folder_source_reads_npy_and_tiff_in_classes(tmp_path):
    root = write_channel_dataset(tmp_path / "d", 5, per_class=3, test_per_class=1)
    source = image_folder(root / "train", in_chans=5)
    assert source.classes == ["dark", "light"] and len(source) == 6
    names = {source.name(i).rsplit(".", 1)[1] for i in range(len(source))}
    assert names == {"npy", "tif"}
    for i in range(len(source)):
        img, label = source[i]
        assert img.shape == (5, 20, 20) and img.dtype == torch.uint8 and label == i // 3


def test_pretraining_skips_or_names_an_array_with_the_wrong_channels(tmp_path):
    good, bad = tmp_path / "good.npy", tmp_path / "bad.npy"
    np.save(good, np.zeros((5, 20, 20), np.uint8))
    np.save(bad, np.zeros((20, 20, 3), np.uint8))
    views, masks = PairedViews(16, mean=[0.5] * 5, std=[0.25] * 5), MaskGenerator.from_config(MaskConfig(), 16, 4)
    source = FileSource([str(bad), str(good)], [-1, -1], in_chans=5)
    log = tmp_path / "skipped.txt"
    weak, strong, _ = PretrainDataset(source, views, masks, on_error="skip", skip_log=log)[(0, 0)]
    assert weak.shape == strong.shape == (5, 16, 16)
    name, reason = log.read_text().strip().split("\t")
    assert name == str(bad) and "has not model.in_chans=5 channels" in reason
    with pytest.raises(ValueError, match=rf"cannot read {bad}: ChannelError"):
        PretrainDataset(source, views, masks, on_error="raise")[(0, 0)]


def _params(**changes):
    p = sample_view_params(torch.Generator().manual_seed(0), 16, 16)
    base = dict(jitter=False, brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0, grayscale=False)
    base.update(blur_sigma=0.0, solarize=False, jitter_order=(0, 1, 2, 3))
    for key, value in {**base, **changes}.items():
        setattr(p, key, value)
    return p


@pytest.mark.parametrize(
    "changes",
    [
        dict(jitter=True, brightness=1.3),
        dict(jitter=True, contrast=0.7),
        dict(jitter=True, brightness=0.8, contrast=1.3, jitter_order=(1, 3, 0, 2)),
        dict(blur_sigma=1.2),
        dict(solarize=True),
    ],
)
def test_photometric_ops_act_on_each_channel_as_a_gray_image(changes):
    x = torch.randint(0, 256, (2, 5, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    p = _params(**changes)
    out = apply_photometric(x, p)
    assert out.shape == x.shape and out.dtype == torch.uint8 and not torch.equal(out, x)
    for c in range(5):  # channel c alone, as a 1-channel image, gives the same pixels
        assert torch.equal(out[:, c : c + 1], apply_photometric(x[:, c : c + 1], p))
    if "contrast" in changes and len(changes) == 2:  # blended with the channel's own mean, not a shared one
        mean = x[0, 1].float().mean()
        expected = (0.7 * x[0, 1].float() + 0.3 * mean).clamp(0, 255)
        assert (out[0, 1].float() - expected).abs().max() <= 1.0


def test_one_channel_ops_are_torchvisions_gray_ops_and_rgb_only_ops_are_skipped():
    x = torch.randint(0, 256, (1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    p = _params(jitter=True, brightness=1.2, contrast=0.8, jitter_order=(0, 1, 2, 3), blur_sigma=0.5, solarize=True)
    k = 2 * 2 + 1
    expected = TF.solarize(TF.gaussian_blur(TF.adjust_contrast(TF.adjust_brightness(x, 1.2), 0.8), [k, k], [0.5]), 128)
    assert torch.equal(apply_photometric(x, p), expected)
    y = torch.randint(0, 256, (5, 16, 16), dtype=torch.uint8)
    rgb_only = _params(jitter=True, saturation=1.2, hue=0.1, grayscale=True)
    assert torch.equal(apply_photometric(y, rgb_only), y)  # saturation, hue and grayscale: RGB only
    assert not torch.equal(apply_photometric(y[:3], rgb_only), y[:3])


def test_gpu_aug_refuses_other_channel_counts():
    with pytest.raises(ConfigError, match=r"data.gpu_aug=True is not allowed: false with model.in_chans=5"):
        load_config(None, ["data.source=folder", "data.gpu_aug=true", "model.in_chans=5"] + _norm(5))


def _norm(c: int) -> list[str]:
    return [f"data.mean=[{','.join(['0.5'] * c)}]", f"data.std=[{','.join(['0.25'] * c)}]"]


def _numpy_stats(root, in_chans):
    arrays = []
    for path in sorted(root.rglob("*")):
        if path.suffix == ".npy":
            arrays.append(np.load(path).astype(np.float64) / 255)
        elif path.suffix == ".tif":
            x = tifffile.imread(path).astype(np.float64) / 65535  # uint16: x * 257 exactly
            arrays.append(x[None] if in_chans == 1 else x.transpose(2, 0, 1))
    pixels = np.concatenate([a.reshape(in_chans, -1) for a in arrays], axis=1)
    return pixels.mean(1), pixels.std(1)


@pytest.mark.parametrize("in_chans", [1, 5])
def test_stats_match_numpy(tmp_path, in_chans):
    root = write_channel_dataset(tmp_path / "d", in_chans, per_class=4, test_per_class=1)
    mean, std = _numpy_stats(root / "train", in_chans)
    stats = channel_stats(image_folder(root / "train", in_chans), in_chans)
    np.testing.assert_allclose(stats["mean"], mean, rtol=0, atol=1e-12)
    np.testing.assert_allclose(stats["std"], std, rtol=0, atol=1e-12)
    assert stats["images"] == 8 and stats["pixels"] == 8 * 20 * 20 and stats["skipped"] == {}


def test_stats_command_prints_overrides_and_lists_skipped_files(tmp_path, capsys):
    root = write_channel_dataset(tmp_path / "d", 5, per_class=2, test_per_class=1)
    np.save(root / "train" / "dark" / "wrong.npy", np.zeros((3, 4, 4), np.uint8))
    folder = ["data.source=folder", f"data.path={root}", "model.in_chans=5", "data.num_workers=0"]
    out = tmp_path / "stats.json"
    assert main(["stats", *folder, "data.on_error=skip", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    stats = json.loads(out.read_text())
    assert stats["images"] == 4 and list(stats["skipped"]) == [str(root / "train" / "dark" / "wrong.npy")]
    line = printed.out.strip().splitlines()[-1]
    assert line == "data.mean=[{}] data.std=[{}]".format(
        ",".join(f"{v:.4f}" for v in stats["mean"]), ",".join(f"{v:.4f}" for v in stats["std"])
    )
    assert load_config(None, folder + line.split()).data.mean == [round(v, 4) for v in stats["mean"]]
    assert main(["stats", *folder, "data.on_error=raise"]) == 2
    assert "wrong.npy" in capsys.readouterr().err
    assert main(["stats", *folder, "--split", "test", "--limit", "1", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["images"] == 1 and json.loads(out.read_text())["split"] == "test"


def test_channel_overrides_are_a_valid_configuration(tmp_path):
    cfg = load_config(None, channel_overrides(tmp_path, 5))
    assert cfg.model.in_chans == 5 and cfg.data.mean == [0.5] * 5


def test_list_source_reads_arrays_with_labels(tmp_path):
    root = write_channel_dataset(tmp_path / "d", 5, per_class=2, test_per_class=1)
    files = sorted((root / "train").rglob("img_*"))
    lines = [f"{f.relative_to(root)} {i % 2}\n" for i, f in enumerate(files)]
    (root / "files.txt").write_text("".join(lines))
    source = list_file(root / "files.txt", in_chans=5)
    assert [source[i][1] for i in range(len(source))] == [0, 1, 0, 1]
    assert all(source[i][0].shape == (5, 20, 20) for i in range(len(source)))


@pytest.mark.parametrize("in_chans", [1, 5])
def test_finetuning_transform_for_other_channel_counts(in_chans):
    from conmim.eval.augment import train_transform

    cfg = load_config(None, ["finetune.reprob=1.0"] + _norm(in_chans) + [f"model.in_chans={in_chans}"])
    gray = Image.fromarray(np.random.default_rng(2).integers(0, 256, (24, 24), dtype=np.uint8), "L")
    image = gray if in_chans == 1 else torch.randint(0, 256, (5, 24, 24), dtype=torch.uint8)
    torch.manual_seed(0)
    out = train_transform(16, cfg)(image)
    assert out.shape == (in_chans, 16, 16) and out.dtype == torch.float32
    erased = train_transform(16, cfg).ops.transforms[-1]
    assert type(erased).__name__ == "RandomErasing"  # timm's erasing kept; RandAugment replaced


def test_pretraining_stops_at_once_when_in_chans_does_not_fit_the_data(tmp_path, capsys):
    norm = ["model.in_chans=5", "data.mean=[0.5,0.5,0.5,0.5,0.5]", "data.std=[0.3,0.3,0.3,0.3,0.3]"]
    assert main(["pretrain", *TINY, *norm, f"output_dir={tmp_path / 'run'}"]) == 2  # Fashion-MNIST: gray photos
    err = capsys.readouterr().err
    assert "model.in_chans=5 does not fit the data: the first 8 image(s) all fail, e.g. #0: a L photo" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_one_channel_pretraining_on_the_built_in_data_needs_no_normalisation_arguments(tmp_path):
    assert main(["pretrain", *TINY, "model.in_chans=1", "train.max_steps=2", f"output_dir={tmp_path / 'run'}"]) == 0
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
