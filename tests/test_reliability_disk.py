"""Disk full (issue 5, item 7): a clear error, and no partial file ever becomes ``last.pt``.

Two real write failures: a small tmpfs that fills up (ENOSPC; needs root or CAP_SYS_ADMIN to
mount, else skipped), and ``RLIMIT_FSIZE`` on a CLI subprocess (EFBIG; works for any user).
Unwritable output folders are in test_reliability_config.py.
"""

from __future__ import annotations

import resource
import signal
import subprocess

import pytest
from reliability_utils import ROOT, assert_same_state, env, final_state, pretrain_cmd, pretrain_in_process, records

from conmim import checkpoint as ckpt
from conmim.checkpoint import CheckpointError

CHECKPOINT_MB = 15  # one checkpoint of the tiny model (14.8 MB)


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    size = f"size={int(CHECKPOINT_MB * 1.6)}m"  # room for one checkpoint, not two
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", size, "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _no_partial_files(folder) -> None:
    assert not list(folder.glob(".*")), "a temp file was left behind"


def test_disk_full_keeps_the_last_checkpoint_and_resumes_exactly_after_space_is_freed(small_disk, tmp_path):
    run_dir = small_disk / "run"
    with pytest.raises(CheckpointError) as err:
        pretrain_in_process(run_dir, "train.max_steps=4", "model.drop_path=0")
    message = str(err.value)
    assert f"cannot write checkpoint {run_dir / 'checkpoints' / 'step_00000002.pt'}: No space left" in message
    assert "the previous checkpoint is unchanged" in message
    folder = run_dir / "checkpoints"
    _no_partial_files(folder)
    assert [p.name for p in ckpt.step_files(folder)] == ["step_00000001.pt"]
    assert ckpt.safe_load(folder / "last.pt")["step"] == 1  # whole: its CRC-32s check out

    subprocess.run(["mount", "-o", f"remount,size={CHECKPOINT_MB * 5}m", str(small_disk)], check=True)
    pretrain_in_process(run_dir, "train.max_steps=4", "model.drop_path=0")
    pretrain_in_process(tmp_path / "reference", "train.max_steps=4", "model.drop_path=0")
    assert records(run_dir) == records(tmp_path / "reference")
    assert_same_state(final_state(run_dir), final_state(tmp_path / "reference"))
    _no_partial_files(folder)


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write returns EFBIG instead of killing
    limit = 4 * 2**20
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_file_size_limit_gives_a_one_line_error_and_no_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    done = subprocess.run(
        pretrain_cmd(run_dir, "train.max_steps=3"),
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=180,
        preexec_fn=_limit_file_size,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [ln[ln.index("conmim: error:") :] for ln in done.stderr.splitlines() if "conmim: error:" in ln]
    assert errors == [
        f"conmim: error: cannot write checkpoint {run_dir / 'checkpoints' / 'step_00000001.pt'}: "
        "File too large; the previous checkpoint is unchanged"
    ], done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    folder = run_dir / "checkpoints"
    _no_partial_files(folder)
    assert not (folder / "last.pt").exists() and ckpt.step_files(folder) == []
