"""Distributed faults with real ``torchrun --nproc_per_node=2`` gloo runs on the CPU."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
from reliability_utils import (
    SEED,
    alive,
    assert_same_state,
    final_state,
    last_step,
    records,
    start,
    torchrun_cmd,
    wait_for,
    worker_pids,
)

STEPS = 10

pytestmark = pytest.mark.slow  # multi-process: pytest -m "not slow" leaves these out


def _workers(agent, timeout: float = 60) -> dict[int, int]:
    wait_for(lambda: len(worker_pids(agent)) == 2, agent, timeout)
    return worker_pids(agent)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted two-rank run."""
    run_dir = tmp_path_factory.mktemp("ddp_reference") / "run"
    log = run_dir.parent / "log.txt"
    agent = start(torchrun_cmd(run_dir, f"train.max_steps={STEPS}"), log)
    assert agent.wait(timeout=180) == 0, log.read_text()[-3000:]
    return run_dir


def test_dead_rank_tears_down_the_group_and_max_restarts_resumes_exactly(reference, tmp_path):
    """kill -9 of rank 1 at a random step: rank 0 is gone within seconds (torchrun's agent stops it);
    with --max-restarts=1 both ranks restart from the last checkpoint and end as the uninterrupted run."""
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    agent = start(torchrun_cmd(run_dir, f"train.max_steps={STEPS}", max_restarts=1), log)
    kill_at = random.Random(SEED).randint(2, STEPS - 3)
    wait_for(lambda: last_step(run_dir) >= kill_at, agent, timeout=120)
    pids = _workers(agent)
    killed = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    wait_for(lambda: not alive(pids[0]), agent, timeout=30, poll=0.05)
    assert time.monotonic() - killed < 30
    assert agent.wait(timeout=180) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "resumed from" in text, text[-3000:]
    assert records(run_dir) == records(reference), f"CONMIM_FAULT_SEED={SEED}, killed after step {kill_at}"
    assert_same_state(final_state(run_dir), final_state(reference))
    assert len(final_state(run_dir)["rng"]) == 2  # every rank's RNG state is saved


def test_hung_rank_makes_the_others_fail_clearly_within_the_timeout(tmp_path):
    """SIGSTOP of rank 1 (hung, not dead: torchrun cannot notice): rank 0 gives up after
    dist_timeout_s with an error that says what happened."""
    timeout_s = 4
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    agent = start(torchrun_cmd(run_dir, "train.max_steps=1000", f"dist_timeout_s={timeout_s}"), log)
    wait_for(lambda: last_step(run_dir) >= 2, agent, timeout=120)
    pids = _workers(agent)
    stopped = time.monotonic()
    os.kill(pids[1], signal.SIGSTOP)
    try:
        wait_for(lambda: not alive(pids[0]), agent, timeout=timeout_s + 30, poll=0.05)
        waited = time.monotonic() - stopped
    finally:
        if alive(pids[1]):
            os.kill(pids[1], signal.SIGKILL)
    assert agent.wait(timeout=60) != 0
    text = log.read_text()
    assert "conmim: error: rank 0 lost the process group" in text, text[-3000:]
    assert "another rank probably died or hung" in text
    assert waited < timeout_s + 20, f"rank 0 took {waited:.1f} s with dist_timeout_s={timeout_s}"
