"""Bad configuration: errors before any work starts, naming field, value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from reliability_utils import load_tiny

from conmim.cli import main as cli_main
from conmim.config import ConfigError, load_config
from conmim.runtime.distributed import DistInfo
from conmim.train.engine import pretrain
from conmim.train.setup import preflight


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
        ("dist_timeout_s=0", ["dist_timeout_s=0", "a positive number of seconds"]),
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


def test_keys_that_moved_load_from_old_run_folders_and_from_the_command_line(tmp_path, caplog):
    """train.seed / train.precision / train.dist_timeout_s went to the top level, eval.*_limit to data:
    an old config.yaml maps them silently, an old name on the command line with one warning."""
    from omegaconf import OmegaConf

    old = OmegaConf.to_container(OmegaConf.create(to_yaml_of_defaults()))
    for key in ("seed", "precision", "dist_timeout_s"):
        old.pop(key)
    old["train"].update(seed=7, precision="bf16", dist_timeout_s=30.0)
    old["data"].pop("train_limit")
    old["eval"]["train_limit"] = 11
    path = tmp_path / "config.yaml"
    path.write_text(OmegaConf.to_yaml(old))
    cfg = load_config(str(path))
    assert (cfg.seed, cfg.precision, cfg.dist_timeout_s, cfg.data.train_limit) == (7, "bf16", 30.0, 11)
    with caplog.at_level("WARNING"):
        cfg = load_config(None, ["train.seed=3", "eval.test_limit=5"])
    assert (cfg.seed, cfg.data.test_limit) == (3, 5)
    assert "train.seed is now seed" in caplog.text and "eval.test_limit is now data.test_limit" in caplog.text


def to_yaml_of_defaults() -> str:
    from conmim.config import to_yaml

    return to_yaml(load_config(None))


@pytest.mark.parametrize(
    "command, present, absent",
    [
        ("pretrain", ["seed:", "model:", "mask:", "train:", "monitor_every:"], ["finetune:", "segment:", "detect:"]),
        ("knn", ["seed:", "data:", "knn_k:", "which:"], ["train:", "mask:", "finetune:", "segment:", "monitor_every"]),
        ("finetune", ["seed:", "data:", "finetune:", "img_size:"], ["train:", "eval:", "mask:", "segment:"]),
        ("segment", ["seed:", "scenes:", "segment:"], ["train:", "eval:", "finetune:", "detect:", "model:"]),
    ],
)
def test_print_config_shows_only_what_the_command_reads(capsys, command, present, absent):
    argv = [command] + (["runs/none"] if command != "pretrain" else []) + ["--print-config"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert all(key in out for key in present), out
    assert not any(f"\n{key}" in out or out.startswith(key) for key in absent if key.endswith(":")), out
    assert not any(key in out for key in absent if not key.endswith(":")), out


def test_a_check_of_another_command_does_not_stop_this_one():
    """finetune reads no mask section: a mask value only pretrain rejects passes here, not there."""
    assert load_config(None, ["mask.ratio=0"], command="finetune").mask.ratio == 0
    with pytest.raises(ConfigError, match="mask.ratio=0"):
        load_config(None, ["mask.ratio=0"], command="pretrain")


def test_other_channel_counts_get_per_channel_normalisation_without_extra_arguments(caplog):
    grey = load_config(None, ["model.in_chans=1"], command="pretrain")
    assert (grey.data.mean, grey.data.std) == ([0.2860], [0.3530])  # Fashion-MNIST's own statistics
    with caplog.at_level("WARNING"):
        bands = load_config(None, ["model.in_chans=4", "data.source=synthetic"], command="pretrain")
    assert (bands.data.mean, bands.data.std) == ([0.5] * 4, [0.25] * 4)
    assert "conmim stats" in caplog.text
    given = ["model.in_chans=2", "data.mean=[0.1,0.2]", "data.std=[0.3,0.4]"]
    assert load_config(None, given).data.mean == [0.1, 0.2]
    with pytest.raises(ConfigError, match="data.mean/data.std"):  # given, but for 3 channels: an error
        load_config(None, ["model.in_chans=2", "data.mean=[0.1,0.2,0.3]", "data.std=[0.3,0.4,0.5]"])


@pytest.mark.parametrize("native", [True, False])
def test_precision_auto_picks_bf16_only_where_the_cpu_computes_it(monkeypatch, caplog, native):
    """A CPU without AVX512-BF16/AMX emulates bf16 (6x the CPU time of fp32 on an AVX2-only EPYC):
    ``auto`` then means fp32, and an explicit bf16 is kept but warned about."""
    from conmim.runtime import device as device_module

    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert device_module.resolve_precision("auto", cpu) == (torch.bfloat16 if native else None)
    assert device_module.resolve_precision("fp32", cpu) is None
    with caplog.at_level("WARNING", logger="conmim.runtime.device"):
        assert device_module.resolve_precision("bf16", cpu) == torch.bfloat16
    assert ("emulated" in caplog.text) is not native
