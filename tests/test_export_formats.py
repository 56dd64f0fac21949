"""Deployment formats of ``conmim export``: ONNX checked in onnxruntime, and timm's Hub folder layout
loaded by timm offline, both from a real tiny pre-training run written to disk and read back."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from conmim.cli import main
from conmim.config import load_config
from conmim.export import onnx as onnx_export
from conmim.export.encoders import read_source
from conmim.train.engine import pretrain

try:
    import onnxruntime as ort
except ImportError as err:  # scripts/setup.sh installs the extra; without it these tests cannot run
    raise ImportError("onnxruntime missing: pip install -e '.[onnx]' (scripts/setup.sh does)") from err
RECORDED_RUN = Path(__file__).resolve().parents[1] / "lab" / "records" / "default_run"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """Two real optimizer steps of the tiny configuration; its checkpoint and metrics on disk."""
    from conftest import TINY

    out = tmp_path_factory.mktemp("export") / "run"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        overrides = ["data.source=synthetic", "data.synthetic_size=32", "train.max_steps=2", f"output_dir={out}"]
        summary = pretrain(load_config(None, TINY + overrides))
    finally:
        torch.set_num_threads(before)
    return out, summary["model"].eval()


def test_onnx_matches_pytorch_at_any_batch(tiny_run, tmp_path, capsys):
    run, model = tiny_run
    out = tmp_path / "encoder.onnx"
    assert main(["export", str(run), "--format", "onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "max abs diff" in printed and out.is_file()
    diff = float(printed.split("max abs diff ")[1].split()[0])
    assert 0 <= diff <= 1e-4

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["tokens", "features"]
    encoder = model.teacher.encoder
    for batch in (1, 5):  # neither is the batch of 2 the graph was traced with
        x = torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(batch))
        tokens, features = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            want = encoder.forward_features(x)
        assert tokens.shape == (batch, 1 + 16, 192)
        np.testing.assert_allclose(tokens, want.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(features, want[:, 1:].mean(1).numpy(), atol=1e-4, rtol=0)


def test_onnx_check_detects_a_different_model_and_removes_the_file(tiny_run, tmp_path, monkeypatch, capsys):
    run, _model = tiny_run
    source = read_source(run)
    out, _diff = onnx_export.export_onnx(source.weights, source.spec, tmp_path / "a.onnx")
    other = {k: v + 0.01 if k.endswith("weight") else v for k, v in source.weights.items()}
    changed = onnx_export.TokensAndFeatures(onnx_export.build_encoder(other, source.spec)).eval()
    assert onnx_export.max_abs_diff(out, changed, torch.randn(2, 3, 16, 16)) > 1e-3

    # the same check inside the export: a mismatch fails the command and leaves no file behind
    monkeypatch.setattr(onnx_export, "max_abs_diff", lambda *a: 0.5)
    bad = tmp_path / "bad.onnx"
    assert main(["export", str(run), "--format", "onnx", "--out", str(bad), "--atol", "1e-3"]) == 2
    err = capsys.readouterr().err
    assert "differ from PyTorch's by up to 0.5" in err and "--atol 0.001" in err
    assert not bad.exists()


def test_onnx_without_the_extra_says_what_to_install(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now raises ImportError
    assert main(["export", str(tiny_run[0]), "--format", "onnx", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "pip install 'conmim[onnx]'" in capsys.readouterr().err


def test_hub_folder_loads_in_timm_offline_with_the_same_outputs(tiny_run, tmp_path, monkeypatch):
    run, model = tiny_run
    shutil.copy(RECORDED_RUN / "final_eval.json", run / "final_eval.json")  # a real run's summary, read into the card
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "hub"
    assert main(["export", str(run), "--format", "hub", "--out", str(folder)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]

    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "beit_base_patch16_224"
    assert config["model_args"]["embed_dim"] == 192 and config["model_args"]["depth"] == 2
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()  # timm loads strictly
    strict = timm.create_model(f"local-dir:{folder}", pretrained=False)
    strict.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        want = model.teacher.encoder.forward_features(x)
        torch.testing.assert_close(loaded.forward_features(x), want)
        torch.testing.assert_close(strict.eval().forward_features(x), want)
    data = timm.data.resolve_data_config({}, model=loaded)
    assert data["input_size"] == (3, 16, 16) and data["crop_pct"] == 1.0

    card = (folder / "README.md").read_text()
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in line][-1]
    assert f"| loss | {last['loss']} |" in card
    assert "| knn_top1_teacher | 68.56 |" in card  # from final_eval.json
    assert "model.depth" not in card and "depth: 2" in card  # the resolved configuration, as YAML
    assert "data.source=synthetic" in card and "after 2 optimizer steps" in card


def test_hub_export_refuses_a_file_as_folder(tiny_run, tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("")
    assert main(["export", str(tiny_run[0]), "--format", "hub", "--out", str(target)]) == 2
    assert "writes a folder" in capsys.readouterr().err


def test_hub_from_an_exported_file_says_it_has_no_training_record(tiny_run, tmp_path):
    exported = tmp_path / "enc.safetensors"
    assert main(["export", str(tiny_run[0]), "--out", str(exported)]) == 0
    assert main(["export", str(exported), "--format", "hub", "--out", str(tmp_path / "hub")]) == 0
    card = (tmp_path / "hub" / "README.md").read_text()
    assert "No training record came with these weights" in card and "not recorded with these weights" in card
    model = timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True)
    assert model.patch_embed.grid_size == (4, 4)
