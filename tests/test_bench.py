"""``conmim bench``: analytic FLOPs, configuration checks, and real runs of both data modes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conmim.config import BenchRunConfig, ConfigError, ModelConfig, load_config
from conmim.runtime.device import cpu_has_native_bf16
from conmim.tools.bench import flops_per_image, run_bench, write_jpeg_folder

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.arch=vit_tiny",
    "model.depth=1",
    "model.img_size=32",
    "model.patch_size=8",
    "model.proj_hidden_dim=64",
    "model.proj_out_dim=32",
    "train.batch_size=4",
    "bench.steps=2",
    "bench.repeats=2",
    "bench.warmup=1",
]


@pytest.mark.parametrize("arch, gflop", [("vit_small", 67), ("vit_base", 173), ("vit_large", 526)])
def test_flops_per_image_match_the_spec_estimates(arch, gflop):
    """docs/method.md §12: 4 x (backbone + projector forward) per 224 px image."""
    assert flops_per_image(ModelConfig(arch=arch)) / 1e9 == pytest.approx(gflop, rel=0.01)


def test_bench_settings_are_checked():
    with pytest.raises(ConfigError, match="bench.data"):
        load_config(None, ["bench.data=/no/such/folder"], schema_cls=BenchRunConfig)
    with pytest.raises(ConfigError, match="bench.steps"):
        load_config(None, ["bench.steps=2", "bench.repeats=3"], schema_cls=BenchRunConfig)
    with pytest.raises(ConfigError, match="bench"):  # pretrain does not take bench settings
        load_config(None, ["bench.steps=2"])


def test_cli_bench_jpeg_mode_prints_one_json_line_per_variant():
    """A real ``conmim bench`` process over generated JPEG files: device data path vs CPU path."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    args = [
        *TINY,
        "precision=bf16",
        "bench.data=jpeg",
        "bench.jpeg_images=8",
        "data.gpu_aug=true",
        "data.num_workers=0",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "conmim.cli", "bench", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    fast, plain = (json.loads(ln) for ln in proc.stdout.splitlines())
    assert (fast["variant"], plain["variant"]) == ("fast", "plain")
    assert (fast["precision"], fast["attention"], plain["precision"], plain["attention"]) == (
        "bf16",
        "sdpa",
        "fp32",
        "math",
    )
    assert (fast["data"], fast["data_path"], plain["data_path"]) == ("jpeg", "device", "cpu")
    assert plain["config"]["precision"] == "fp32" and fast["config"]["precision"] == "bf16"
    for line in (fast, plain):
        assert line["img_per_s"] > 0 and line["step_ms"] > 0 and len(line["img_per_s_chunks"]) == 2
        assert line["peak_mem_gb"] >= 0 and line["mfu"] is None
        assert line["gflop_per_img"] == pytest.approx(
            flops_per_image(
                ModelConfig(arch="vit_tiny", depth=1, img_size=32, patch_size=8, proj_hidden_dim=64, proj_out_dim=32)
            )
            / 1e9,
            abs=0.01,
        )
    assert fast["speedup_vs_plain"] == pytest.approx(fast["img_per_s"] / plain["img_per_s"], rel=1e-2)
    assert fast["cpu_ms_per_step"] > 0 and fast["speedup_vs_plain_cpu_time"] == pytest.approx(
        plain["cpu_ms_per_step"] / fast["cpu_ms_per_step"], rel=1e-2
    )
    assert "vs plain eager fp32" in proc.stderr


def test_synthetic_mode_alternates_the_variants():
    cfg = load_config(None, [*TINY, "bench.steps=3", "bench.repeats=3"], schema_cls=BenchRunConfig)
    fast, plain = run_bench(cfg)
    auto = "bf16" if cpu_has_native_bf16() else "fp32"  # precision=auto: bf16 only where the CPU computes it
    assert (fast["data_path"], fast["precision"], plain["precision"]) == ("synthetic", auto, "fp32")
    assert (fast["optimizer"], plain["optimizer"]) == ("fused", "for-loop")
    assert len(fast["img_per_s_chunks"]) == len(plain["img_per_s_chunks"]) == 3


def test_jpeg_writer_makes_imagenet_sized_rgb_jpegs(tmp_path):
    paths = write_jpeg_folder(tmp_path, 6, seed=1)
    sizes = [Image.open(p).size for p in paths]
    assert all(Image.open(p).format == "JPEG" and Image.open(p).mode == "RGB" for p in paths)
    assert all(300 <= min(s) and max(s) <= 860 for s in sizes) and len(set(sizes)) > 1


def test_bench_baseline_times_one_setting_against_the_same_fast_path():
    """``bench.baseline`` overrides: gradient checkpointing on, timed beside the same step without it."""
    cfg = load_config(
        None,
        [*TINY, "model.depth=2", "train.grad_checkpointing=true", "bench.baseline=[train.grad_checkpointing=false]"],
        schema_cls=BenchRunConfig,
    )
    fast, baseline = run_bench(cfg)
    assert (fast["variant"], baseline["variant"]) == ("fast", "baseline")
    assert (fast["grad_checkpointing"], baseline["grad_checkpointing"]) == (True, False)
    assert fast["precision"] == baseline["precision"] and fast["attention"] == baseline["attention"] == "sdpa"
    assert fast["speedup_vs_baseline"] == pytest.approx(fast["img_per_s"] / baseline["img_per_s"], rel=1e-2)


def test_shard_folder_runs_the_webdataset_source(tmp_path):
    """``bench.data`` naming tar shards times the same step reading them (data.source=webdataset)."""
    from conmim.tools.shards import pack_shards

    write_jpeg_folder(tmp_path / "images", 8, seed=2)
    pattern = pack_shards(str(tmp_path / "images"), str(tmp_path / "shards"), 3).pattern
    for data in (str(tmp_path / "shards"), pattern):
        cfg = load_config(None, [*TINY, f"bench.data={data}", "data.num_workers=0"], schema_cls=BenchRunConfig)
        fast, plain = run_bench(cfg)
        assert fast["data"] == plain["data"] == "webdataset" and fast["data_path"] == "cpu"
        assert fast["config"]["data"]["source"] == "webdataset" and fast["img_per_s"] > 0
