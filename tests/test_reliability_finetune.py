"""Fine-tuning keeps the run contract of pre-training: ``kill -9`` or a stop signal at a random step
(one process, and two gloo ranks), then the same command again, ends bitwise where an uninterrupted
run ends, with the same metrics lines. Checkpoints come every ``finetune.checkpoint_every`` steps and
at epoch ends, so the resumed run re-trains a few steps from the middle of an epoch: the same
batches, augmentations, drop-path and mixup draws and the same loss window."""

from __future__ import annotations

import os
import random
import signal

import pytest
import torch
from reliability_utils import (
    PYTHON,
    SEED,
    TINY,
    assert_same_state,
    kill_group,
    last_step,
    records,
    run,
    start,
    wait_for,
)

from conmim.runtime.preemption import EXIT_PREEMPTED

STEPS = 36  # 3 epochs of 12 batches of 8 (96 images); the random faults land after steps 3 to 28
FINETUNE = [
    "data.source=fashion_mnist",
    "data.path=/usr/share/datasets/fashion-mnist",
    "data.train_limit=96",
    "data.test_limit=16",
    "finetune.epochs=3",
    "finetune.batch_size=8",
    "finetune.warmup_epochs=0.5",
    "finetune.drop_path=0.1",  # the torch RNG state matters
    "finetune.mixup=0.8",  # NumPy's and torch's
    "finetune.cutmix=1.0",
    "finetune.auto_augment=rand-m9-mstd0.5-inc1",  # random and NumPy in the transform
    "finetune.reprob=0.25",
    "finetune.log_every=3",  # resumes land inside a loss window
    "finetune.checkpoint_every=2",
]


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory):
    """A tiny pre-training to fine-tune from (2 steps)."""
    run_dir = tmp_path_factory.mktemp("pretrain") / "run"
    cmd = [PYTHON, "-m", "conmim.cli", "pretrain", *TINY, f"output_dir={run_dir}", "train.max_steps=2"]
    done = run(cmd)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def finetune_cmd(source, out, *extra: str, torchrun: bool = False) -> list[str]:
    launcher = (
        [str(PYTHON.rsplit("/", 1)[0] + "/torchrun"), "--standalone", "--nproc_per_node=2"] if torchrun else [PYTHON]
    )
    overrides = [*FINETUNE, f"output_dir={out}", *extra] + (["finetune.batch_size=4"] if torchrun else [])
    return [*launcher, "-m", "conmim.cli", "finetune", str(source), *overrides]


def final(out) -> dict:
    return torch.load(out / "finetune" / "checkpoints" / "last.pt", weights_only=True)


@pytest.fixture(scope="module")
def reference(encoder_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    done = run(finetune_cmd(encoder_run, out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert final(out)["step"] == STEPS
    return out


def test_kill9_twice_at_random_steps_resumes_bitwise(encoder_run, reference, tmp_path, workers=2):
    """With data-loader workers (as the group-signal case below)."""
    rng = random.Random(SEED + workers)
    out, cmd = tmp_path / "run", finetune_cmd(encoder_run, tmp_path / "run", f"data.num_workers={workers}")
    note = f"(CONMIM_FAULT_SEED={SEED}, workers={workers})"
    for attempt, at in enumerate(sorted(rng.sample(range(3, STEPS - 8), 2))):
        proc = start(cmd, tmp_path / f"log{attempt}.txt")
        wait_for(lambda at=at: last_step(out / "finetune") >= at, proc, timeout=120)
        kill_group(proc)
    done = run(cmd)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed fine-tuning from" in done.stderr, note
    assert_same_state(final(out), final(reference))
    assert records(out / "finetune") == records(reference / "finetune"), note
    assert (out / "finetune" / "best.safetensors").is_file()


@pytest.mark.parametrize(("name", "workers"), [("SIGTERM", 0), ("SIGUSR1", 0), ("SIGTERM", 2)])
def test_a_stop_signal_checkpoints_the_step_and_the_rerun_is_bitwise(encoder_run, reference, tmp_path, name, workers):
    """With data-loader workers the signal goes to the whole process group, as SLURM's scancel and
    ``pkill -f`` send it: the workers must leave the stop to the main process."""
    at = random.Random(SEED + len(name) + workers).randint(3, STEPS - 8)
    out = tmp_path / "run"
    cmd = finetune_cmd(encoder_run, out, "finetune.checkpoint_every=1000", f"data.num_workers={workers}")
    proc = start(cmd, tmp_path / "log.txt")
    wait_for(lambda: last_step(out / "finetune") >= at, proc, timeout=120)
    if workers:
        os.killpg(proc.pid, getattr(signal, name))
    else:
        proc.send_signal(getattr(signal, name))
    assert proc.wait(timeout=60) == EXIT_PREEMPTED, (tmp_path / "log.txt").read_text()[-3000:]
    step = final(out)["step"]
    assert at <= step < STEPS, f"(CONMIM_FAULT_SEED={SEED}) stopped at {step}"
    assert f"stopped by {name} after step {step}" in (tmp_path / "log.txt").read_text()
    done = run(cmd)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_state(final(out), final(reference))
    assert records(out / "finetune") == records(reference / "finetune")


@pytest.mark.slow
def test_two_ranks_stopped_by_sigterm_resume_bitwise(encoder_run, tmp_path):
    """torchrun passes SIGTERM to both workers; they agree on the step, checkpoint every rank's RNG
    states and loss window, and the rerun ends where an uninterrupted two-rank run ends."""
    reference = tmp_path / "reference"
    assert run(finetune_cmd(encoder_run, reference, torchrun=True)).returncode == 0
    out = tmp_path / "run"
    cmd = finetune_cmd(encoder_run, out, "finetune.checkpoint_every=1000", torchrun=True)
    at = random.Random(SEED + 2).randint(3, STEPS - 8)
    agent = start(cmd, tmp_path / "log.txt")
    wait_for(lambda: last_step(out / "finetune") >= at, agent, timeout=180)
    agent.send_signal(signal.SIGTERM)
    agent.wait(timeout=120)
    step = final(out)["step"]
    assert at <= step < STEPS and len(final(out)["rng"]) == 2
    assert run(cmd).returncode == 0
    assert_same_state(final(out), final(reference))
    assert records(out / "finetune") == records(reference / "finetune")


def test_a_second_fine_tuning_on_a_held_folder_reads_and_writes_nothing_there(encoder_run, tmp_path):
    """The folder's lock comes first: a second run neither resumes from the holder's checkpoint nor
    rewrites its configuration before it stops."""
    out = tmp_path / "held"
    holder = start(finetune_cmd(encoder_run, out, "finetune.epochs=100000"), tmp_path / "holder.txt")
    wait_for(lambda: last_step(out / "finetune") >= 3, holder, timeout=120)
    config = (out / "finetune" / "config.yaml").read_text()
    second = run(finetune_cmd(encoder_run, out, "finetune.epochs=100000", "finetune.base_lr=1.0e-4"))
    assert second.returncode == 2
    assert f"is in use by another run (pid {holder.pid} on " in second.stderr
    assert "resumed fine-tuning" not in second.stderr
    assert (out / "finetune" / "config.yaml").read_text() == config
    kill_group(holder)
