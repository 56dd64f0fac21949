import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from conmim.data.sources import DataError, build_source, fashion_mnist, image_folder, list_file
from conmim.data.views import PairedViews, sample_view_params


def test_views_are_pixel_aligned_without_photometric_ops(natural_images):
    img = Image.open(sorted(natural_images.glob("imagenet_*"))[0])
    views = PairedViews(64, strong=False)
    for seed in range(5):
        weak, strong = views(img, torch.Generator().manual_seed(seed))
        assert weak.shape == (3, 64, 64) and torch.equal(weak, strong)


def test_strong_view_differs_only_photometrically(natural_images):
    img = Image.open(sorted(natural_images.glob("imagenet_*"))[0])
    gen = torch.Generator().manual_seed(3)
    params = sample_view_params(torch.Generator().manual_seed(3), img.height, img.width)
    weak, strong = PairedViews(64)(img, gen)
    changed = params.jitter or params.grayscale or params.blur_sigma > 0 or params.solarize
    assert changed == (not torch.equal(weak, strong))
    # same crop: the views' spatial structure agrees (high correlation of the gray images)
    corr = torch.corrcoef(torch.stack([weak.mean(0).flatten(), strong.mean(0).flatten()]))[0, 1]
    assert corr.abs() > 0.3


def test_view_parameter_distributions():
    g = torch.Generator().manual_seed(0)
    draws = [sample_view_params(g, 300, 400) for _ in range(4000)]
    frac = lambda f: sum(map(f, draws)) / len(draws)  # noqa: E731
    assert frac(lambda p: p.flip) == pytest.approx(0.5, abs=0.03)
    assert frac(lambda p: p.jitter) == pytest.approx(0.8, abs=0.03)
    assert frac(lambda p: p.grayscale) == pytest.approx(0.2, abs=0.03)
    assert frac(lambda p: p.blur_sigma > 0) == pytest.approx(0.1, abs=0.02)
    assert frac(lambda p: p.solarize) == pytest.approx(0.2, abs=0.03)
    areas = np.array([p.height * p.width / (300 * 400) for p in draws])
    assert areas.min() >= 0.07 and areas.max() <= 1.0
    assert all(0.1 <= p.blur_sigma <= 2.0 for p in draws if p.blur_sigma)


def test_gray_images_become_three_channels(fashion_mnist_dir):
    src = fashion_mnist(fashion_mnist_dir, "test")
    img, label = src[0]
    assert img.mode == "L" and 0 <= label < 10
    weak, strong = PairedViews(32)(img, torch.Generator().manual_seed(0))
    assert weak.shape == strong.shape == (3, 32, 32)


def test_fashion_mnist_reads_both_splits(fashion_mnist_dir):
    train, test = fashion_mnist(fashion_mnist_dir, "train"), fashion_mnist(fashion_mnist_dir, "test")
    assert len(train) == 60000 and len(test) == 10000
    assert sorted(set(train.labels.tolist())) == list(range(10))


def test_fashion_mnist_missing_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        fashion_mnist(tmp_path)


def test_fashion_mnist_reads_uncompressed_idx(tmp_path):
    images = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(struct.pack(">HBB3I", 0, 8, 3, 2, 3, 3) + images.tobytes())
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">HBBI", 0, 8, 1, 2) + bytes([4, 7]))
    src = fashion_mnist(tmp_path, "test")
    assert np.array_equal(np.asarray(src[1][0]), images[1]) and src[1][1] == 7


def test_image_folder_recursive_with_classes(tmp_path):
    for cls, n in (("cat", 2), ("dog", 3)):
        (tmp_path / cls / "deep").mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (20, 10), (i * 40, 0, 0)).save(tmp_path / cls / "deep" / f"{i}.PNG")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    src = image_folder(tmp_path)
    assert len(src) == 5 and src.classes == ["cat", "dog"] and src.labels == [0, 0, 1, 1, 1]
    assert src[0][0].mode == "RGB"


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no image files"):
        image_folder(tmp_path)
    with pytest.raises(DataError, match="no such folder"):
        image_folder(tmp_path / "nope")


def test_list_file(tmp_path, natural_images):
    files = sorted(natural_images.glob("cifar10_*"))[:3]
    (tmp_path / "rel.png").write_bytes(files[0].read_bytes())
    lst = tmp_path / "train.txt"
    lst.write_text(f"# comment\nrel.png 3\n{files[1]} 5\n{files[2]}\n")
    src = list_file(lst)
    assert len(src) == 3 and src.labels == [3, 5, -1]
    assert src[0][0].size == (32, 32)
    with pytest.raises(DataError, match="no such list file"):
        list_file(tmp_path / "missing.txt")


def test_build_source_synthetic():
    from conmim.config import DataConfig

    src = build_source(DataConfig(source="synthetic", synthetic_size=5), 24)
    assert len(src) == 5 and src[4][0].size == (24, 24)
