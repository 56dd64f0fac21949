"""Bad data (issue 5, item 2): a real image folder holding every kind of bad and odd file.

"Unreadable file": we run as root, for whom ``chmod 000`` changes nothing, so as root the file is a
symlink to ``/proc/self/mem`` (opening works, reading offset 0 fails with EIO, for root too);
otherwise it is a ``chmod 000`` file. A FIFO (which would block ``open`` forever) and a directory
named ``x.jpg`` (in a list file) are unreadable too.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reliability_utils import TINY, pretrain_cmd, run

from conmim.cli import main as cli_main
from conmim.config import MaskConfig
from conmim.data import DataError, FileSource, PretrainDataset, list_file, load_image
from conmim.masking import MaskGenerator
from conmim.views import PairedViews

BAD_REASONS = {  # file -> a piece of the reason the error must give
    "truncated.jpg": "truncated",
    "empty.jpg": "cannot identify image file",
    "text.jpg": "cannot identify image file",
    "bomb.png": "DecompressionBombWarning: Image size (100000000 pixels) exceeds limit",
    "fifo.jpg": "not a regular file",
    "loop.jpg": "Too many levels of symbolic links",
    "unreadable.jpg": "Input/output error" if os.geteuid() == 0 else "Permission denied",
}
ODD = ("cmyk.jpg", "gray16.png", "palette_alpha.png", "gray.png", "tiny.png")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_bomb(path: Path, side: int = 10_000) -> None:
    """A valid 1-bit PNG of side x side pixels (10,000^2 = 100 M > PIL's 89.5 M limit), ~12 kB on disk."""
    row = b"\x00" + bytes((side + 7) // 8)
    pixels = zlib.compress(row * side, 9)
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", pixels) + _png_chunk(b"IEND", b"")
    )


def build_folder(root: Path, good: int = 20) -> Path:
    """``good`` plain images, the odd-but-valid ones, the bad ones, and a directory symlink loop."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(good):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / f"good_{i:02d}.png")
    Image.new("CMYK", (24, 24), (0, 255, 255, 0)).save(root / "cmyk.jpg", quality=95)
    Image.fromarray(np.array([[0, 65535], [32896, 65535]], dtype=np.uint16).repeat(12, 0).repeat(12, 1)).save(
        root / "gray16.png"
    )
    palette = Image.new("P", (24, 24), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.paste(1, (12, 0, 24, 24))
    palette.save(root / "palette_alpha.png", transparency=0)
    Image.new("L", (24, 24), 77).save(root / "gray.png")
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "tiny.png")

    jpeg = root / "truncated.jpg"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("this is not an image\n")
    write_bomb(root / "bomb.png")
    os.mkfifo(root / "fifo.jpg")
    os.symlink("loop.jpg", root / "loop.jpg")
    if os.geteuid() == 0:
        os.symlink("/proc/self/mem", root / "unreadable.jpg")
    else:
        (root / "unreadable.jpg").write_bytes(b"\xff\xd8\xff")
        os.chmod(root / "unreadable.jpg", 0)
    (root / "sub").mkdir()
    os.symlink("..", root / "sub" / "up")  # a directory loop: the folder walk must not follow it
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return build_folder(tmp_path_factory.mktemp("data") / "images")


def test_odd_but_valid_formats_are_converted_not_skipped(folder):
    def rgb(name):
        img = load_image(folder / name)
        assert img.mode == "RGB"
        return np.asarray(img).astype(int)

    assert np.abs(rgb("cmyk.jpg") - [255, 0, 0]).max() <= 8  # CMYK (0, 255, 255, 0) is red
    gray16 = rgb("gray16.png")
    assert gray16[0, 0].tolist() == [0, 0, 0] and gray16[0, 23].tolist() == [255] * 3
    assert gray16[23, 0].tolist() == [128] * 3  # 32896 / 65535 * 255 = 128.0
    palette = rgb("palette_alpha.png")
    assert palette[0, 0].tolist() == [255, 255, 255]  # transparent index over white
    assert palette[0, 23].tolist() == [0, 255, 0]
    assert rgb("gray.png")[5, 5].tolist() == [77, 77, 77]
    tiny = load_image(folder / "tiny.png")
    weak, strong = PairedViews(16)(tiny, torch.Generator().manual_seed(0))
    assert tiny.size == (8, 8) and weak.shape == strong.shape == (3, 16, 16)


def _dataset(paths, on_error):
    masks = MaskGenerator.from_config(MaskConfig(), 16, 4)
    return PretrainDataset(
        FileSource([str(p) for p in paths], [-1] * len(paths)), PairedViews(16), masks, on_error=on_error
    )


@pytest.mark.parametrize("name", sorted(BAD_REASONS))
def test_each_bad_file_raises_with_its_path_and_reason(folder, name):
    with pytest.raises(DataError) as err:
        _dataset([folder / name], "raise")[(0, 0)]
    message = str(err.value)
    assert str(folder / name) in message and BAD_REASONS[name] in message, message
    assert "data.on_error=raise" in message


def test_list_source_directory_named_jpg_is_a_bad_file(tmp_path, folder):
    (tmp_path / "dir.jpg").mkdir()
    listing = tmp_path / "list.txt"
    listing.write_text(f"dir.jpg\n{folder / 'good_00.png'}\n")
    dataset = _dataset([], "skip")
    dataset.source = list_file(listing)
    dataset.skip_log = tmp_path / "skipped.txt"
    weak, _strong, _mask = dataset[(0, 0)]  # substitutes the next readable image
    assert weak.shape == (3, 16, 16)
    assert (tmp_path / "skipped.txt").read_text().startswith(f"{tmp_path / 'dir.jpg'}\t")
    assert "not a regular file" in (tmp_path / "skipped.txt").read_text()


def test_skip_policy_runs_lists_every_bad_file_once_and_warns_once(folder, tmp_path):
    """A real run with 2 data-loader workers: bad files are met inside the workers."""
    run_dir = tmp_path / "run"
    n = len(list(folder.glob("*.*")))
    assert n == 32  # 4 steps of 8 visit every file once
    done = run(
        pretrain_cmd(
            run_dir,
            "data.source=folder",
            f"data.path={folder}",
            "data.num_workers=2",
            "train.max_steps=4",
            "data.on_error=skip",
        )
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (run_dir / "skipped_files.txt").read_text().splitlines()
    listed = {Path(line.split("\t")[0]).name: line.split("\t")[1] for line in lines}
    assert set(listed) == set(BAD_REASONS) and len(lines) == len(BAD_REASONS)
    for name, reason in listed.items():
        assert BAD_REASONS[name] in reason, (name, reason)
    warnings = [ln for ln in done.stderr.splitlines() if "unreadable image file" in ln]
    assert len(warnings) == 1 and f"skipped {len(BAD_REASONS)} unreadable image file(s)" in warnings[0], warnings


def test_raise_policy_stops_with_the_path_and_reason(folder, tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = cli_main(
            [
                "pretrain",
                *TINY,
                f"output_dir={tmp_path / 'run'}",
                "data.source=folder",
                f"data.path={folder}",
                "data.num_workers=2",
                "train.max_steps=4",
                "data.on_error=raise",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert code == 2, err
    line = next(ln[ln.index("conmim: error:") :] for ln in err.splitlines() if "conmim: error:" in ln)  # after tqdm
    assert line.startswith("conmim: error: cannot read ") and line.endswith("(data.on_error=raise)"), line
    assert any(str(folder / name) in line and reason in line for name, reason in BAD_REASONS.items()), line
    assert "Traceback" not in err
