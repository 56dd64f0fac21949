"""The scripts of examples/, each run as a user runs it: a fresh Python process on tiny real files."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny import TINY_MODEL

ROOT = Path(__file__).resolve().parents[1]


def write_jpegs(folder: Path, count: int) -> Path:
    """``count`` real JPEG files of random pixels, not square, so the scripts resize and crop."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)).save(folder / f"img_{i:02d}.jpg")
    return folder


def run_example(name: str, *args: object) -> tuple[str, str]:
    """``python examples/NAME ARGS`` from the repository root; its (stdout, stderr) after exit code 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the 2-core test machine: one thread runs fastest
    proc = subprocess.run(
        [sys.executable, f"examples/{name}", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"{name} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc.stdout, proc.stderr


def losses(text: str) -> list[float]:
    return [float(v) for v in re.findall(r"loss (\S+)", text)]


def test_custom_loop(tmp_path):
    images = write_jpegs(tmp_path / "images", 8)
    out, _ = run_example("custom_loop.py", "--images", images, *"--steps 3 --batch-size 4 --img-size 16".split())
    found = losses(out)
    assert len(found) == 3 and all(math.isfinite(v) and v > 0 for v in found), out
    assert "done: 3 steps" in out


@pytest.fixture
def export(tmp_path, one_thread) -> Path:
    """An encoder exported as users do: `conmim pretrain` (2 tiny steps on a folder), then `conmim export`."""
    from conmim.cli import main

    run = tmp_path / "run"
    overrides = [
        *TINY_MODEL,
        "data.source=folder",
        f"data.path={write_jpegs(tmp_path / 'train', 8)}",
        "data.split=.",
        "data.num_workers=0",
        "train.batch_size=4",
        "train.epochs=1",
        "eval.final_knn=false",
        "eval.monitor_every=0",
        f"output_dir={run}",
    ]
    assert main(["pretrain", *overrides]) == 0
    out = tmp_path / "export" / "encoder.safetensors"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert out.with_suffix(".json").is_file()
    return out


def test_timm_features(tmp_path, export):
    images = write_jpegs(tmp_path / "images", 6)
    out, _ = run_example("timm_features.py", export, "--images", images, "--batch-size", 5)
    # 5 images, vit_tiny's 192 dimensions; 16 px / patch 4 = 16 patch tokens after [CLS]
    assert "features (5, 192)" in out, out
    assert "tokens (5, 17, 192)" in out, out
    assert "max |load_encoder - plain timm| = 0\n" in out, out


def test_continue_from_timm(tmp_path):
    images = write_jpegs(tmp_path / "images", 8)
    args = ["--images", images, "--out", tmp_path / "run", *"--steps 2 --batch-size 4 --img-size 16".split()]
    out, err = run_example("continue_from_timm.py", *args)
    for name in ("student", "teacher"):
        assert f"before training: {name} max |encoder - timm| = 0 (patch embedding 0)" in out, out
    assert "student and teacher initialised from" in err  # pretrain() itself loaded model.init
    found = losses(out)
    assert len(found) == 2 and all(math.isfinite(v) for v in found), out
    moved = re.search(r"after 2 steps: student max \|encoder - timm\| = (\S+)", out)
    assert moved and 0 < float(moved.group(1)) < 1, out  # trained, from those weights
    assert (tmp_path / "run" / "checkpoints").is_dir()


def test_the_readme_python_api_example_runs(tmp_path):
    """The README's Python API block, at a tiny size (the only edits: model, view and grid sizes)."""
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"## Python API\n\n```python\n(.*?)```", readme, re.S).group(1)
    tiny = {
        'conmim.ConMIM(arch="vit_small", img_size=224, patch_size=16)': 'conmim.ConMIM(arch="vit_tiny", img_size=32, '
        "patch_size=4, depth=2, proj_hidden_dim=64, proj_out_dim=32)",
        "PairedViews(img_size=224)": "PairedViews(img_size=32)",
        "MaskGenerator((14, 14)": "MaskGenerator((8, 8)",
    }
    for old, new in tiny.items():
        assert old in code, old
        code = code.replace(old, new)
    rng = np.random.default_rng(0)
    batches = [[Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(4)]] * 2
    scope = {"batches": batches}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own example
    assert scope["encoder"] is scope["model"].teacher.encoder and scope["loss"].isfinite()
