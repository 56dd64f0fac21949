"""The device data path (data.gpu_aug) against the CPU reference path, run here on CPU tensors."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conmim.config import ConfigError, load_config
from conmim.data.gpu_views import DeviceViews, EncodedPretrainDataset, collate_encoded, pack_params, photometric_batch
from conmim.data.masking import MaskGenerator
from conmim.data.pretrain import PretrainDataset, read_skipped, sample_generator
from conmim.data.sources import DataError, fashion_mnist, image_folder
from conmim.data.views import PairedViews, apply_photometric, sample_view_params
from conmim.train.engine import pretrain

FOOLBOX = importlib.util.find_spec("foolbox")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """Real ImageNet JPEGs and a CIFAR PNG (foolbox's data), plus a gray and a CMYK JPEG."""
    if FOOLBOX is None:
        pytest.skip("foolbox (test images) is not installed")
    data = Path(FOOLBOX.submodule_search_locations[0]) / "data"
    folder = tmp_path_factory.mktemp("images")
    for f in sorted(data.glob("imagenet_*.jpg"))[:4] + sorted(data.glob("cifar10_*.png"))[:1]:
        shutil.copy(f, folder / f.name)
    rgb = Image.open(sorted(data.glob("imagenet_*.jpg"))[4]).convert("RGB")
    rgb.convert("L").save(folder / "gray.jpg", quality=90)
    rgb.resize((300, 200)).convert("CMYK").save(folder / "cmyk.jpg", quality=90)
    return folder


SIZE, GRID = 128, (8, 8)  # views of 128 px keep the test quick; nothing in the path depends on 224


def both_paths(folder: Path, weak_strong: bool = False, seed: int = 5):
    views = PairedViews(SIZE, weak_strong=weak_strong)
    masks = MaskGenerator(GRID)
    source = image_folder(folder)
    return (
        PretrainDataset(source, views, masks, seed),
        EncodedPretrainDataset(source, views, masks, seed),
        views,
        DeviceViews(SIZE, views.mean, views.std, True, weak_strong, torch.device("cpu")),
    )


@pytest.mark.parametrize("weak_strong", [False, True])
def test_device_path_reproduces_the_cpu_path(image_dir, weak_strong):
    cpu, encoded, views, device_views = both_paths(image_dir, weak_strong)
    keys = [(2, i) for i in range(len(cpu))]
    items = [encoded[k] for k in keys]
    kinds = {Path(name).name: payload.ndim for payload, _, _, name in items}
    assert kinds["imagenet_00_243.jpg"] == 1  # RGB JPEG: bytes, decoded on the device
    assert kinds["gray.jpg"] == kinds["cmyk.jpg"] == kinds[next(k for k in kinds if k.endswith(".png"))] == 3
    # The same generator draws the same parameters in the same order on both paths.
    for (epoch, index), (payload, params, mask, _name) in zip(keys, items, strict=True):
        gen = sample_generator(5, epoch, index)
        h, w = payload.shape[-2:] if payload.ndim == 3 else Image.open(cpu.source.paths[index]).size[::-1]
        p, q = views.sample(gen, h, w)
        assert params.tolist() == [pack_params(p), pack_params(q or p)]
        assert torch.equal(mask, MaskGenerator(GRID)(gen))
    weak, strong, mask = device_views(collate_encoded(items))
    for k, key in enumerate(keys):
        ref_weak, ref_strong, ref_mask = cpu[key]
        assert torch.equal(mask[k], ref_mask)
        for got, ref in ((weak[k], ref_weak), (strong[k], ref_strong)):
            levels = (got - ref).abs() * 0.229 * 255  # back to 8-bit levels (the smallest std)
            assert levels.mean() < 0.6 and levels.max() < 16, (key, float(levels.mean()), float(levels.max()))


def test_batched_photometric_ops_match_the_reference_op_by_op():
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 256, (48, 3, 24, 28), dtype=torch.uint8, generator=g)
    params = [sample_view_params(g, 24, 28) for _ in range(48)]
    for k, p in enumerate(params):  # make every op and every jitter order position occur often
        p.jitter = p.jitter or k % 2 == 0
        p.blur_sigma = 0.1 + 1.9 * k / 47 if k % 3 == 0 else p.blur_sigma
        p.grayscale, p.solarize = p.grayscale or k % 5 == 0, p.solarize or k % 7 == 0
    got = photometric_batch(base, torch.tensor([pack_params(p) for p in params], dtype=torch.float64))
    ref = torch.stack([apply_photometric(base[k], p) for k, p in enumerate(params)])
    diff = (got.int() - ref.int()).abs()
    assert diff.max() <= 2 and (diff > 0).float().mean() < 1e-3  # float rounding at truncation boundaries
    for p in params:  # and with no op drawn, the batch passes through unchanged
        p.jitter, p.grayscale, p.blur_sigma, p.solarize = False, False, 0.0, False
    assert torch.equal(
        photometric_batch(base, torch.tensor([pack_params(p) for p in params], dtype=torch.float64)), base
    )


def test_device_path_draws_the_spec_distributions(image_dir):
    """Frequencies and ranges of the packed draws over 1,000 samples (binomial 5-sigma bounds)."""
    _cpu, encoded, _views, _dv = both_paths(image_dir)
    name = encoded.source.paths[0]
    height, width = Image.open(name).size[::-1]
    rows = []
    for index in range(1000):
        p, _q = encoded.views.sample(sample_generator(0, 0, index), height, width)
        rows.append(pack_params(p))
    table = np.array(rows)
    for col, prob in ((4, 0.5), (5, 0.8), (14, 0.2), (16, 0.2), (15, 0.1)):
        freq = (table[:, col] > 0).mean()
        assert abs(freq - prob) < 5 * np.sqrt(prob * (1 - prob) / len(table)), (col, freq)
    for col, lo, hi in ((6, 0.6, 1.4), (7, 0.6, 1.4), (8, 0.8, 1.2), (9, -0.1, 0.1)):
        assert lo <= table[:, col].min() and table[:, col].max() <= hi and np.ptp(table[:, col]) > 0.8 * (hi - lo)
    area = table[:, 2] * table[:, 3] / (height * width)
    assert 0.08 * 0.9 <= area.min() and area.max() <= 1.0 and abs(area.mean() - 0.54) < 0.05


def test_an_undecodable_jpeg_is_skipped_or_raises(image_dir, tmp_path):
    for f in sorted(image_dir.glob("imagenet_*.jpg"))[:2]:
        shutil.copy(f, tmp_path / f.name)
    raw = (tmp_path / "imagenet_00_243.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(raw[: raw.index(b"\xff\xda") + 200])  # header fine, data cut
    _cpu, encoded, views, device_views = both_paths(tmp_path)
    skip_log = tmp_path / "skipped_files.txt"
    encoded.skip_log, device_views.bad_file = skip_log, encoded.bad_file
    batch = collate_encoded([encoded[(0, i)] for i in range(3)])
    weak, strong, mask = device_views(batch)
    assert weak.shape == (3, 3, SIZE, SIZE) and torch.isfinite(strong).all()
    assert [Path(p).name for p in read_skipped(skip_log)] == ["truncated.jpg"]
    encoded.on_error = "raise"
    with pytest.raises(DataError, match="truncated.jpg"):
        device_views(batch)


def test_gpu_aug_needs_files_or_images_in_memory():
    with pytest.raises(ConfigError, match="data.gpu_aug"):
        load_config(None, ["data.gpu_aug=true", "data.source=synthetic"], default_preset="fashion_mnist")
    assert load_config(None, ["data.gpu_aug=true"], default_preset="fashion_mnist").data.gpu_aug


def test_fashion_mnist_in_memory_takes_the_device_path(fashion_mnist_dir):
    """The built-in preset's views of Fashion-MNIST: the workers hand over pixels (grey replicated to
    RGB, as the CPU path converts them) and the device path draws and renders the same views."""
    cfg = load_config(None, ["data.gpu_aug=true"], default_preset="fashion_mnist")
    d, size = cfg.data, cfg.model.img_size
    source = fashion_mnist(fashion_mnist_dir, "test")
    views = PairedViews.from_config(cfg.model, d)
    masks = MaskGenerator((size // cfg.model.patch_size,) * 2)
    cpu, encoded = PretrainDataset(source, views, masks, 3), EncodedPretrainDataset(source, views, masks, 3)
    keys = [(1, i) for i in range(0, 10_000, 625)]
    items = [encoded[k] for k in keys]
    assert all(p.shape == (3, 28, 28) and torch.equal(p[0], p[2]) for p, *_ in items)
    device = DeviceViews(size, d.mean, d.std, d.strong_aug, d.weak_aug_strong, torch.device("cpu"))
    weak, strong, mask = device(collate_encoded(items))
    for k, key in enumerate(keys):
        ref_weak, ref_strong, ref_mask = cpu[key]
        assert torch.equal(mask[k], ref_mask)
        for got, ref in ((weak[k], ref_weak), (strong[k], ref_strong)):
            # 28 -> 32 px upsampling of hard garment edges: PIL's and torch's bicubic kernels round and
            # clip their overshoot differently at a few edge pixels (measured: mean 0.04-0.26 levels,
            # at most 1.5 % of pixels off by more than 2, the worst by 17)
            levels = (got - ref).abs() * min(d.std) * 255
            off = float((levels > 2).float().mean())
            assert levels.mean() < 0.6 and off < 0.03 and levels.max() < 32, (key, float(levels.mean()), off)


@pytest.mark.parametrize("source", ["folder", "fashion_mnist"])
def test_pretrain_runs_on_the_device_data_path(image_dir, fashion_mnist_dir, tmp_path, source):
    where = [f"data.path={image_dir}", "data.split=."] if source == "folder" else [f"data.path={fashion_mnist_dir}"]
    cfg = load_config(
        None,
        [
            "model.arch=vit_tiny",
            "model.depth=1",
            "model.img_size=32",
            "model.patch_size=8",
            "model.proj_hidden_dim=64",
            "model.proj_out_dim=32",
            f"data.source={source}",
            *where,
            "data.gpu_aug=true",
            "data.num_workers=1",
            "train.batch_size=3",
            "train.max_steps=2",
            "train.log_every=1",
            "train.warmup_epochs=0",
            "eval.final_knn=false",
            f"output_dir={tmp_path / 'run'}",
        ],
    )
    summary = pretrain(cfg)
    assert summary["steps"] == 2
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r["loss"]) for r in records)


def test_three_channel_arrays_take_the_device_path_decoded(tmp_path):
    yy, xx = np.mgrid[0:40, 0:48] / 8.0  # smooth, like photos: noise would only test resampling kernels
    arr = np.stack([127 + 100 * np.sin(xx + c) * np.cos(yy - c) for c in range(3)]).round().astype(np.uint8)
    np.save(tmp_path / "a.npy", arr)
    Image.fromarray(arr.transpose(1, 2, 0)).save(tmp_path / "b.png")
    cpu, encoded, _views, device_views = both_paths(tmp_path)
    payload, *_rest, name = encoded[(0, 0)]
    assert name.endswith("a.npy") and torch.equal(payload, torch.from_numpy(arr))
    weak, strong, _ = device_views(collate_encoded([encoded[(0, 0)]]))
    ref_weak, ref_strong, _ = cpu[(0, 0)]
    for got, ref in ((weak[0], ref_weak), (strong[0], ref_strong)):
        levels = (got - ref).abs() * 0.229 * 255
        assert levels.mean() < 0.6 and levels.max() < 16
