"""1- and 5-channel data sets of ``.npy`` and TIFF files through every command: pre-training a few
steps, export (safetensors, timm Hub folder, ONNX), k-NN, linear probe and fine-tuning."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from channel_data import channel_overrides, write_channel_dataset
from PIL import Image
from tiny import TINY

from conmim.cli import main
from conmim.export.encoders import load_encoder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=[1, 5], ids=["1ch", "5ch"])
def channel_run(request, tmp_path_factory):
    """A 3-step pre-training run on a generated ``in_chans``-channel folder: (run dir, in_chans, data root)."""
    in_chans, tmp = request.param, tmp_path_factory.mktemp(f"ch{request.param}")
    root = write_channel_dataset(tmp / "data", in_chans)
    run = tmp / "run"
    args = ["pretrain", *TINY, *channel_overrides(root, in_chans), "train.max_steps=3", f"output_dir={run}"]
    assert main(args) == 0
    return run, in_chans, root


def test_pretraining_records_finite_steps(channel_run):
    run, in_chans, _ = channel_run
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records if "loss" in r)
    assert not (run / "skipped_files.txt").exists()
    encoder = load_encoder(run)
    assert encoder.patch_embed.proj.in_channels == in_chans


def test_exports_take_the_channels(channel_run, tmp_path, capsys):
    run, in_chans, _ = channel_run
    x = torch.rand(2, in_chans, 16, 16)
    assert main(["export", str(run), "--out", str(tmp_path / "enc.safetensors")]) == 0
    reference = load_encoder(run).eval()
    with torch.no_grad():
        expected = reference.forward_features(x)
        assert torch.equal(load_encoder(tmp_path / "enc.safetensors").eval().forward_features(x), expected)
    assert main(["export", str(run), "--format", "hub", "--out", str(tmp_path / "hub")]) == 0
    config = json.loads((tmp_path / "hub" / "config.json").read_text())["pretrained_cfg"]
    assert config["input_size"] == [in_chans, 16, 16] and config["mean"] == [0.5] * in_chans
    hub = timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(hub.forward_features(x), expected)
    # a bare weights file of N channels has no mean/std to write: a clear error, not ImageNet's 3 values
    assert main(["export", str(tmp_path / "enc.safetensors"), "--format", "hub", "--out", str(tmp_path / "h2")]) == 2
    assert "export from the pre-training run directory" in capsys.readouterr().err
    if in_chans == 5:
        assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "enc.onnx")]) == 0


def test_knn_linear_probe_and_finetuning(channel_run, capsys):
    run, in_chans, _ = channel_run
    assert main(["knn", str(run), "eval.knn_k=5"]) == 0
    knn = json.loads((run / "knn" / "results.json").read_text())
    assert 0.0 <= knn["top1"] <= 100.0 and (knn["train_images"], knn["test_images"]) == (24, 8)
    cache = "true" if in_chans == 5 else "false"  # the uncached probe crops arrays / gray photos on the fly
    assert main(["linprobe", str(run), "linprobe.epochs=2", f"linprobe.cache_features={cache}"]) == 0
    probe = json.loads((run / "linprobe" / "results.json").read_text())
    assert probe["epochs"] == 2 and 0.0 <= probe["top1"] <= 100.0
    finetune = ["finetune", str(run), "finetune.epochs=1", "finetune.batch_size=8", "finetune.warmup_epochs=0"]
    assert main(finetune) == 0  # RandAugment replaced by per-channel photometric ops, mixup and erasing kept
    result = json.loads((run / "finetune" / "results.json").read_text())
    assert result["train_images"] == 24 and (run / "finetune" / "best.safetensors").is_file()
    capsys.readouterr()


def test_an_encoder_and_a_configuration_of_other_channels_are_refused(channel_run, tmp_path, capsys):
    run, in_chans, root = channel_run
    assert main(["export", str(run), "--out", str(tmp_path / "enc.safetensors")]) == 0
    capsys.readouterr()
    data = ["data.source=folder", f"data.path={root}", "data.eval_split=test"]  # the preset's 3 channels
    assert main(["knn", str(tmp_path / "enc.safetensors"), *data]) == 2
    err = capsys.readouterr().err
    assert f"the encoder takes {in_chans} input channel(s) but data.mean/data.std have 3 values" in err


def test_visualize_draws_gray_runs_and_refuses_other_channel_counts(channel_run, tmp_path, capsys):
    run, in_chans, _ = channel_run
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 20), dtype=np.uint8), "L").save(tmp_path / "g.png")
    code = main(["visualize", str(run), str(tmp_path / "g.png"), "--out", str(tmp_path / "vis")])
    if in_chans == 1:
        assert code == 0 and Image.open(tmp_path / "vis" / "g_retrieval.png").mode == "RGB"
    else:
        assert code == 2 and "a 5-channel encoder is not supported (1 or 3)" in capsys.readouterr().err


def test_continued_pretraining_from_weights_of_other_channels_says_so(channel_run, tmp_path, capsys):
    run, in_chans, _ = channel_run
    assert main(["pretrain", *TINY, f"model.init={run}", f"output_dir={tmp_path / 'rgb'}"]) == 2
    err = capsys.readouterr().err
    assert f"encoder.patch_embed.proj.weight (192, {in_chans}, 4, 4) vs (192, 3, 4, 4)" in err
    assert "model.in_chans as the source was trained" in err
