"""Bad configuration: errors before any work starts, naming field, value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from reliability_utils import load_tiny

from conmim.cli import main as cli_main
from conmim.config import ConfigError, load_config
from conmim.runtime.distributed import DistInfo
from conmim.train.engine import preflight, pretrain


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.foo=1", ["unknown key 'train.foo'", "allowed keys under train:", "batch_size", "base_lr"]),
        ("modle.arch=vit_tiny", ["unknown key 'modle'", "allowed keys under the top level:", "model", "train"]),
        ("train.batch_size=abc", ["train.batch_size", "'abc'", "Integer"]),
        ("mask.ratio=0", ["mask.ratio=0", "strictly between 0 and 1"]),
        ("mask.ratio=1.0", ["mask.ratio=1.0", "strictly between 0 and 1"]),
        ("mask.ratio=-0.5", ["mask.ratio=-0.5", "strictly between 0 and 1"]),
        ("model.img_size=18", ["model.img_size=18", "a positive multiple of model.patch_size=4"]),
        ("mask.unit=3", ["mask.unit=3", "a divisor of the patch grid 4"]),
        ("model.arch=vit_huge", ["model.arch='vit_huge'", "vit_tiny, vit_small, vit_base, vit_large"]),
        ("train.base_lr=0", ["train.base_lr=0", "a positive number"]),
        ("train.base_lr=-1e-3", ["train.base_lr=-0.001", "a positive number"]),
        ("train.batch_size=0", ["train.batch_size=0", "a positive integer"]),
        ("train.batch_size=-8", ["train.batch_size=-8", "a positive integer"]),
        ("data.on_error=ignore", ["data.on_error='ignore'", "skip or raise"]),
        ("train.nan_policy=pray", ["train.nan_policy='pray'", "restore, stop"]),
        ("train.nan_lr_factor=1.5", ["train.nan_lr_factor=1.5", "strictly between 0 and 1"]),
        ("train.dist_timeout_s=0", ["train.dist_timeout_s=0", "a positive number of seconds"]),
        ("device=gpu", ["device='gpu'", "auto, cpu, cuda or cuda:N"]),
    ],
)
def test_bad_values_are_rejected_with_field_value_and_allowed(tmp_path, override, expected):
    with pytest.raises(ConfigError) as err:
        load_tiny(tmp_path / "run", override)
    for piece in expected:
        assert piece in str(err.value), (piece, str(err.value))


def test_batch_that_cannot_fill_every_rank_is_rejected_before_any_work(tmp_path):
    """train.batch_size is per process, so it can never be smaller than the number of ranks; what can
    fail is the data filling one batch on each rank. Checked before the output folder is created."""
    cfg = load_tiny(tmp_path / "run", "data.synthetic_size=12", "train.batch_size=8")
    with pytest.raises(ConfigError) as err:
        preflight(cfg, DistInfo(rank=0, world_size=2), torch.device("cpu"))
    assert "train.batch_size=8 is not allowed" in str(err.value) and "use at most 6" in str(err.value)
    assert "2 process(es)" in str(err.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("make_bad", ["file_in_the_way", "proc"])
def test_unwritable_output_dir_fails_before_any_work(tmp_path, make_bad):
    """As root, permissions do not stop writes: the folder is under a regular file, or in /proc."""
    if make_bad == "file_in_the_way":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "run"
    else:
        out = Path("/proc/conmim_cannot_write_here/run")
    with pytest.raises(ConfigError) as err:
        pretrain(load_tiny(out))
    assert f"output_dir={str(out)!r} is not writable" in str(err.value), str(err.value)


def test_missing_resume_file_fails_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match=r"resume=.*no such checkpoint file"):
        pretrain(load_tiny(tmp_path / "run", f"resume={tmp_path / 'nope.pt'}"))
    assert not (tmp_path / "run").exists()


def test_cli_reports_a_config_error_in_one_line_and_exit_code_2(tmp_path, capsys):
    assert cli_main(["pretrain", f"output_dir={tmp_path / 'run'}", "mask.ratio=1.5"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "conmim: error: mask.ratio=1.5 is not allowed: a number strictly between 0 and 1", err
    assert not (tmp_path / "run").exists()


def test_configurations_written_by_earlier_versions_still_load(tmp_path):
    """Run directories keep working when a key they recorded is retired (here a former test hook)."""
    from omegaconf import OmegaConf

    from conmim.config import to_yaml
    from conmim.export.encoders import config_of

    old = OmegaConf.to_container(OmegaConf.create(to_yaml(load_config(None))))
    old["train"]["inject_nan_steps"] = []
    path = tmp_path / "config.yaml"
    path.write_text(OmegaConf.to_yaml(old))
    assert load_config(str(path)).train.batch_size == old["train"]["batch_size"]
    assert config_of({"config": OmegaConf.to_yaml(old)}).train.batch_size == old["train"]["batch_size"]
