"""End-to-end pre-training through the real CLI and engine, on real images and real files."""

import json
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file

from conmim.cli import main
from conmim.config import ConfigError, load_config
from conmim.export.encoders import export, load_encoder
from conmim.train.engine import pretrain


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "conmim.cli", *args], capture_output=True, text=True, timeout=600)


def test_print_config_shows_overrides(tiny_overrides):
    proc = cli("pretrain", "--print-config", *tiny_overrides, "model.arch=vit_small")
    assert proc.returncode == 0, proc.stderr
    assert "arch: vit_small" in proc.stdout and "batch_size: 8" in proc.stdout


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.nope=1", "nope"),
        ("mask.ratio=1.5", "mask.ratio=1.5 is not allowed: a number strictly between 0 and 1"),
        ("model.arch=vit_huge", "model.arch='vit_huge' is not allowed: one of vit_tiny, vit_small"),
        ("model.img_size=30", "model.img_size=30 is not allowed: a positive multiple of model.patch_size=4"),
        ("mask.unit=3", "mask.unit=3 is not allowed: a divisor of the patch grid 4"),
        ("train.base_lr=0", "train.base_lr=0.0 is not allowed"),
        ("train.batch_size=-2", "train.batch_size=-2 is not allowed"),
    ],
)
def test_bad_configuration_names_field_value_and_allowed(tiny_overrides, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(None, tiny_overrides + [override])
    assert main(["pretrain", *tiny_overrides, override]) == 2


def test_pretrain_fashion_mnist_cli_writes_a_complete_run(tmp_path, tiny_overrides, fashion_mnist_dir):
    out = tmp_path / "fm"
    proc = cli(
        "pretrain",
        *tiny_overrides,
        "model.img_size=32",
        f"data.path={fashion_mnist_dir}",
        "train.max_steps=4",
        f"output_dir={out}",
        "eval.final_knn=true",
        "eval.final_min_steps=0",
        "data.train_limit=300",
        "data.test_limit=100",
        "linprobe.epochs=5",
        "eval.monitor_every=3",
        "eval.monitor_bank=200",
        "eval.monitor_queries=100",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in lines if "loss" in r]
    assert [r["step"] for r in records] == [2, 4]
    monitor = [r for r in lines if "knn_top1" in r]  # online k-NN: its own record at 3, in the last at 4
    assert [r["step"] for r in monitor] == [3, 4] and "loss" not in monitor[0] and "loss" in monitor[1]
    assert all(10 <= r["knn_top1"] <= 100 for r in monitor)
    for key in ("epoch", "loss", "lr", "momentum", "grad_norm", "img_per_s", "retrieval_acc", "mask_ratio"):
        assert key in records[0]
    assert records[0]["mask_ratio"] == pytest.approx(0.75)  # 8x8 grid, 16 units, 12 masked
    assert 0 < records[0]["loss"] < 10 and records[1]["momentum"] > records[0]["momentum"]
    assert (out / "config.yaml").is_file() and list((out / "tensorboard").glob("events.*"))
    assert (out / "checkpoints" / "last.pt").is_file() and (out / "checkpoints" / "step_00000003.pt").is_file()
    assert "pretrain" in proc.stderr  # the progress bar
    report = json.loads((out / "final_eval.json").read_text())
    for key in ("knn_top1_teacher", "knn_top1_random_init", "linprobe_top1_teacher", "linprobe_top1_random_init"):
        assert 10 < report[key] <= 100, key  # ten classes: chance is 10 %
    assert report["retrieval_acc"] == records[-1]["retrieval_acc"] and report["retrieval_chance"] == 1 / 64
    assert "masked-patch retrieval" in proc.stdout and "linear probe top-1" in proc.stdout


@pytest.mark.parametrize(
    "extra, reason",
    [
        (["eval.final_min_steps=100"], "fewer than eval.final_min_steps=100"),
        (["eval.final_min_steps=0", "data.source=folder"], "final evaluation skipped: it needs labelled"),
    ],
)
def test_final_evaluation_is_skipped_without_failing_the_run(
    tmp_path, tiny_overrides, unlabelled_folder, extra, reason, caplog
):
    """A short run, or unlabelled images with no held-out split: pre-training still ends with status 0."""
    out = tmp_path / "skip"
    args = [
        "pretrain",
        *tiny_overrides,
        "data.source=folder",
        f"data.path={unlabelled_folder}",
        "data.split=.",
        "train.max_steps=2",
        f"output_dir={out}",
        "eval.final_knn=true",
        *extra,
    ]
    with caplog.at_level("WARNING"):
        assert main(args) == 0
    assert reason in caplog.text and (out / "checkpoints" / "last.pt").is_file()
    assert not (out / "final_eval.json").exists()


def test_pretrain_on_natural_images_at_224(tmp_path, natural_images):
    cfg = load_config(
        None,
        [
            "model.arch=vit_tiny",
            "model.depth=2",
            "model.img_size=224",
            "model.patch_size=16",
            "model.proj_hidden_dim=128",
            "model.proj_out_dim=64",
            "data.source=folder",
            f"data.path={natural_images}",
            "data.split=.",
            "data.num_workers=2",
            "train.batch_size=4",
            "train.max_steps=3",
            "train.log_every=1",
            "precision=fp32",
            f"output_dir={tmp_path / 'nat'}",
        ],
    )
    summary = pretrain(cfg)
    records = [json.loads(x) for x in (tmp_path / "nat" / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 3 and len(records) == 3
    assert records[0]["mask_ratio"] == pytest.approx(148 / 196)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)


@pytest.mark.parametrize("accum_steps", [1, 2])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, tiny_overrides, accum_steps):
    """Also with gradient accumulation: a resumed run continues at the right micro-batch."""
    base = tiny_overrides + [
        "data.source=synthetic",
        "data.synthetic_size=64",
        "train.epochs=2",
        "model.drop_path=0.1",
        "train.checkpoint_every=3",
        f"train.accum_steps={accum_steps}",
    ]
    full = pretrain(load_config(None, base + ["train.max_steps=7", f"output_dir={tmp_path / 'full'}"]))
    pretrain(load_config(None, base + ["train.max_steps=3", f"output_dir={tmp_path / 'split'}"]))
    resumed = pretrain(load_config(None, base + ["train.max_steps=7", f"output_dir={tmp_path / 'split'}"]))
    assert resumed["steps"] == 7
    a, b = full["model"].state_dict(), resumed["model"].state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log_full = (tmp_path / "full" / "metrics.jsonl").read_text()
    log_split = (tmp_path / "split" / "metrics.jsonl").read_text()

    def strip(text: str) -> list[dict]:  # the split run also logged at its own end, step 3
        records = [json.loads(x) for x in text.splitlines()]
        return [{k: v for k, v in r.items() if k != "img_per_s"} for r in records if r["step"] != 3]

    assert strip(log_full) == strip(log_split)
    assert [json.loads(x)["step"] for x in log_split.splitlines()] == [2, 3, 4, 6, 7]


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_export_loads_in_timm_strictly_with_the_same_features(tmp_path, tiny_overrides, which):
    summary = pretrain(
        load_config(None, tiny_overrides + ["data.source=synthetic", "data.synthetic_size=32", "train.max_steps=2"])
    )
    out = tmp_path / "enc.safetensors"
    assert main(["export", str(tmp_path / "run"), "--out", str(out), "--which", which]) == 0
    spec = json.loads(out.with_suffix(".json").read_text())
    encoder = timm.create_model(spec["model_name"], pretrained=False, **spec["kwargs"])
    encoder.load_state_dict(load_file(str(out)), strict=True)
    encoder.eval()
    branch = getattr(summary["model"], which).eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(encoder.forward_features(x), branch.encoder.forward_features(x))
    torch.testing.assert_close(load_encoder(out).eval()(x), encoder(x))
    if which == "teacher":  # the default
        assert export(tmp_path / "run", tmp_path / "default.safetensors")[0].is_file()


def test_every_shipped_preset_loads_and_validates():
    from importlib import resources

    names = sorted(p.name[:-5] for p in (resources.files("conmim") / "configs").iterdir() if p.name.endswith(".yaml"))
    assert {"fashion_mnist", "vit_small_in1k", "vit_base_in1k", "vit_large_in1k"} <= set(names)
    for name in names:
        load_config(name)
