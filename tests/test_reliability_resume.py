"""Exact resume under kill -9: random steps, in the middle of a checkpoint write,
with 0 and 2 data-loader workers; plus retention and corrupt-checkpoint fallback."""

from __future__ import annotations

import logging
import os
import random
import shutil
import time

import pytest
import torch
from reliability_utils import (
    SEED,
    assert_same_state,
    final_state,
    kill_during_checkpoint_write,
    kill_group,
    last_step,
    pretrain_cmd,
    records,
    run,
    start,
    wait_for,
)

from conmim.runtime import checkpoint as ckpt

STEPS = 12


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run, 0 workers."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    done = run(pretrain_cmd(run_dir, f"train.max_steps={STEPS}"))
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


@pytest.mark.parametrize("workers", [0, 2])
def test_kill9_at_random_steps_and_mid_write_resumes_exactly(reference, tmp_path, workers):
    rng = random.Random(SEED + workers)
    run_dir = tmp_path / "run"
    cmd = pretrain_cmd(run_dir, f"train.max_steps={STEPS}", f"data.num_workers={workers}")
    note = f"(CONMIM_FAULT_SEED={SEED}, workers={workers})"

    # 1: kill -9 at a random point after a random step
    kill_at = rng.randint(2, STEPS // 2)
    proc = start(cmd, tmp_path / "log1.txt")
    wait_for(lambda: last_step(run_dir) >= kill_at, proc, timeout=120)
    time.sleep(rng.uniform(0.0, 0.2))
    kill_group(proc)
    # 2: resume, then kill -9 while a checkpoint is being written
    proc = start(cmd, tmp_path / "log2.txt")
    temp = kill_during_checkpoint_write(proc, run_dir / "checkpoints")
    assert (run_dir / "checkpoints" / temp).exists(), note
    found = ckpt.load_latest(run_dir / "checkpoints")
    assert found is not None and not found[1].name.startswith("."), note
    # 3: resume to the end
    proc = start(cmd, tmp_path / "log3.txt")
    assert proc.wait(timeout=180) == 0, (tmp_path / "log3.txt").read_text()[-3000:]
    log3 = (tmp_path / "log3.txt").read_text()
    assert "resumed from" in log3, note

    assert records(run_dir) == records(reference), f"metrics differ from the uninterrupted run {note}"
    assert_same_state(final_state(run_dir), final_state(reference))
    assert not list((run_dir / "checkpoints").glob(".*")), "a temp file survived the next checkpoint write"


def _copy_run(src, dst):
    shutil.copytree(src, dst)  # copies hard links as separate files; relink last.pt as the engine does
    last = dst / "checkpoints" / "last.pt"
    last.unlink()
    os.link(ckpt.step_files(dst / "checkpoints")[-1], last)
    return dst


def test_keep_last_k_checkpoints(reference):
    folder = reference / "checkpoints"
    assert [p.name for p in ckpt.step_files(folder)] == [f"step_{s:08d}.pt" for s in (STEPS - 2, STEPS - 1, STEPS)]
    assert os.path.samefile(folder / "last.pt", folder / f"step_{STEPS:08d}.pt")


def test_newest_step_file_wins_over_a_stale_last_link(reference, tmp_path):
    """A writer killed between renaming step_N.pt and relinking last.pt leaves last.pt one behind."""
    run_dir = _copy_run(reference, tmp_path / "run")
    folder = run_dir / "checkpoints"
    (folder / "last.pt").unlink()
    os.link(folder / f"step_{STEPS - 1:08d}.pt", folder / "last.pt")
    state, path = ckpt.load_latest(folder)
    assert path.name == f"step_{STEPS:08d}.pt" and state["step"] == STEPS


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_last_checkpoint_falls_back_with_a_warning(reference, tmp_path, caplog, damage):
    run_dir = _copy_run(reference, tmp_path / "run")
    folder = run_dir / "checkpoints"
    last = folder / "last.pt"
    size = last.stat().st_size
    with open(last, "r+b") as f:  # last.pt and step_N.pt are one file (hard link): both are damaged
        if damage == "truncate":
            f.truncate(size // 2)
        else:
            f.seek(size // 3)
            f.write(os.urandom(4096))
    with caplog.at_level(logging.WARNING, logger="conmim.runtime.checkpoint"):
        state, path = ckpt.load_latest(folder)
    assert path.name == f"step_{STEPS - 1:08d}.pt" and state["step"] == STEPS - 1
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"step_{STEPS:08d}.pt" in m and "trying an older checkpoint" in m for m in warned), warned


def test_resume_over_a_truncated_last_checkpoint_redoes_the_step_exactly(reference, tmp_path):
    run_dir = _copy_run(reference, tmp_path / "run")
    last = run_dir / "checkpoints" / "last.pt"
    with open(last, "r+b") as f:
        f.truncate(last.stat().st_size - 100)
    done = run(pretrain_cmd(run_dir, f"train.max_steps={STEPS}"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "cannot read checkpoint" in done.stderr and "trying an older checkpoint" in done.stderr
    assert f"step_{STEPS - 1:08d}.pt at step {STEPS - 1}" in done.stderr
    assert records(run_dir) == records(reference)
    assert_same_state(final_state(run_dir), final_state(reference))
    loaded = torch.load(last, weights_only=True)
    assert loaded["step"] == STEPS
