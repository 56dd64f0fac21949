"""Safe loading (issue 5, item 5): a crafted pickle that would run code is refused without running it."""

from __future__ import annotations

import json
import logging
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from reliability_utils import load_tiny, pretrain_in_process
from safetensors import safe_open

from conmim import checkpoint as ckpt
from conmim.checkpoint import CheckpointError
from conmim.cli import main as cli_main
from conmim.engine import pretrain
from conmim.export import encoder_state, load_encoder


class RunsCode:
    """Unpickling this runs ``touch MARKER``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def crafted(path: Path, marker: Path, zip_format: bool = True) -> Path:
    state = {"model": {"w": torch.zeros(2)}, "step": 99, "payload": RunsCode(marker)}
    if zip_format:
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state))
    return path


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("loading") / "run"
    pretrain_in_process(run_dir, "train.max_steps=2", "model.drop_path=0")
    return run_dir


@pytest.mark.parametrize("zip_format", [True, False], ids=["torch.save", "raw-pickle"])
def test_crafted_pickle_is_refused_without_running(tmp_path, zip_format):
    marker = tmp_path / "code_ran"
    path = crafted(tmp_path / "evil.pt", marker, zip_format)
    with pytest.raises(CheckpointError, match="refusing to load .*evil.pt.*could run code"):
        ckpt.safe_load(path)
    assert not marker.exists()
    if zip_format:  # the file really is malicious: an unsafe load runs it
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


def test_crafted_newest_checkpoint_is_skipped_with_a_warning(real_run, tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    good = ckpt.step_files(real_run / "checkpoints")[-1]
    os.link(good, folder / good.name)
    marker = tmp_path / "code_ran"
    crafted(folder / "step_00000099.pt", marker)
    with caplog.at_level(logging.WARNING, logger="conmim.checkpoint"):
        state, path = ckpt.load_latest(folder)
    assert path.name == good.name and not marker.exists()
    assert any("refusing to load" in r.getMessage() and "step_00000099.pt" in r.getMessage() for r in caplog.records)


def test_resume_and_export_refuse_a_crafted_file(tmp_path, capsys):
    marker = tmp_path / "code_ran"
    evil = crafted(tmp_path / "evil.pt", marker)
    with pytest.raises(CheckpointError, match="refusing to load"):
        pretrain(load_tiny(tmp_path / "run", f"resume={evil}"))
    assert cli_main(["export", str(evil), "--out", str(tmp_path / "enc.safetensors")]) == 2
    assert "conmim: error: refusing to load" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "enc.safetensors").exists()


def test_export_writes_safetensors_not_pickle(real_run, tmp_path):
    out = tmp_path / "enc.safetensors"
    assert cli_main(["export", str(real_run), "--out", str(out)]) == 0
    raw = out.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + header_len])  # safetensors: a JSON header, then raw tensor bytes
    expected = encoder_state(ckpt.load_latest(real_run / "checkpoints")[0], "teacher")
    assert set(header) - {"__metadata__"} == set(expected)
    with safe_open(str(out), "pt") as f:
        for key in expected:
            assert torch.equal(f.get_tensor(key), expected[key]), key
    load_encoder(out)  # strict load into the timm model


def test_every_torch_load_in_the_package_is_weights_only():
    offenders = []
    for source in sorted(Path(ckpt.__file__).parent.glob("*.py")):
        for number, line in enumerate(source.read_text().splitlines(), start=1):
            unsafe = ("torch.load(" in line and "weights_only=True" not in line) or "pickle.load" in line
            if unsafe or "weights_only=False" in line:
                offenders.append(f"{source.name}:{number}: {line.strip()}")
    assert offenders == []
