"""Scheduler signals and shared folders: SIGTERM / SIGUSR1 at a random step make a run finish its step,
checkpoint and exit 75, and the rerun ends bitwise where an uninterrupted run ends (one process and two
gloo ranks); a second run on a folder that a live run holds stops at once naming the holder."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import threading
import time

import pytest
from reliability_utils import (
    PYTHON,
    ROOT,
    SEED,
    alive,
    assert_same_state,
    env,
    final_state,
    kill_group,
    last_step,
    pretrain_cmd,
    records,
    run,
    start,
    stop_started_runs,
    torchrun_cmd,
    wait_for,
    worker_pids,
)

from conmim.runtime import checkpoint as ckpt
from conmim.runtime.lock import FolderLock, FolderLockedError
from conmim.runtime.preemption import EXIT_PREEMPTED

STEPS = 40
# no periodic checkpoint before the end: the one a stopped run leaves is the signal's
OVERRIDES = ("train.epochs=5", f"train.max_steps={STEPS}", "train.checkpoint_every=1000")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    done = run(pretrain_cmd(run_dir, *OVERRIDES))
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def stopped_step(run_dir) -> int:
    steps = [ckpt.step_of(p) for p in ckpt.step_files(run_dir / "checkpoints")]
    assert len(steps) == 1, steps
    return steps[0]


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1"])
def test_a_stop_signal_at_a_random_step_checkpoints_there_and_the_rerun_is_exact(reference, tmp_path, name):
    rng = random.Random(SEED + len(name))
    at = rng.randint(3, STEPS - 15)
    run_dir, note = tmp_path / "run", f"(CONMIM_FAULT_SEED={SEED}, {name} after step {at})"
    cmd = pretrain_cmd(run_dir, *OVERRIDES)
    proc = start(cmd, tmp_path / "log1.txt")
    wait_for(lambda: last_step(run_dir) >= at, proc, timeout=120)
    proc.send_signal(getattr(signal, name))
    assert proc.wait(timeout=60) == EXIT_PREEMPTED, (tmp_path / "log1.txt").read_text()[-3000:]
    log = (tmp_path / "log1.txt").read_text()
    step = stopped_step(run_dir)
    assert at <= step < STEPS and last_step(run_dir) == step, note
    assert f"stopped by {name} after step {step}" in log and "run the same command again" in log, note
    done = run(cmd)  # the same command again
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_state(final_state(run_dir), final_state(reference))
    assert records(run_dir) == records(reference), note


def test_a_stop_signal_to_the_whole_process_group_is_left_to_the_main_process(reference, tmp_path):
    """SLURM's scancel, ``pkill -f`` and Ctrl-C signal the data-loader workers too: they must not die of it,
    so the run still finishes its step, checkpoints and exits 75, and the rerun ends where the reference ends."""
    at = random.Random(SEED + 1).randint(3, STEPS - 15)
    run_dir, note = tmp_path / "run", f"(CONMIM_FAULT_SEED={SEED}, SIGTERM to the group after step {at})"
    cmd = pretrain_cmd(run_dir, *OVERRIDES, "data.num_workers=1")
    proc = start(cmd, tmp_path / "log1.txt")
    wait_for(lambda: last_step(run_dir) >= at, proc, timeout=120)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == EXIT_PREEMPTED, (tmp_path / "log1.txt").read_text()[-3000:]
    assert at <= stopped_step(run_dir) < STEPS, note
    done = run(cmd)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_state(final_state(run_dir), final_state(reference))


def test_a_signal_during_a_checkpoint_write_and_a_second_one_while_stopping(reference, tmp_path):
    """The write in flight completes (the handler only sets a flag), a second signal changes nothing."""
    run_dir = tmp_path / "run"
    cmd = pretrain_cmd(run_dir, *OVERRIDES[:2], "train.checkpoint_every=1")
    proc = start(cmd, tmp_path / "log.txt")
    folder = run_dir / "checkpoints"
    end = time.monotonic() + 120
    while True:  # freeze the run while a checkpoint temp file exists, signal it twice, let it go on
        assert proc.poll() is None and time.monotonic() < end, "no checkpoint write caught"
        if folder.is_dir() and list(folder.glob(".step_*.tmp")):
            os.kill(proc.pid, signal.SIGSTOP)
            if list(folder.glob(".step_*.tmp")):
                break
            os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGTERM)
    os.kill(proc.pid, signal.SIGUSR1)
    os.kill(proc.pid, signal.SIGCONT)
    assert proc.wait(timeout=60) == EXIT_PREEMPTED
    assert not list(folder.glob(".step_*.tmp"))
    found = ckpt.load_latest(folder)
    assert found is not None and found[0]["step"] == last_step(run_dir)
    assert run(cmd).returncode == 0
    assert_same_state(final_state(run_dir), final_state(reference))


@pytest.mark.slow
@pytest.mark.parametrize("target", ["agent", "rank1"])
def test_two_ranks_stop_at_the_same_step_and_the_rerun_is_exact(tmp_path, target):
    """SIGTERM to torchrun's agent (which passes it to every worker, as Kubernetes and SLURM do), or
    SIGUSR1 to one worker only: both ranks stop after the same step, checkpoint and exit 75."""
    reference = tmp_path / "reference"
    assert run(torchrun_cmd(reference, *OVERRIDES)).returncode == 0
    run_dir = tmp_path / "run"
    at = random.Random(SEED + 7).randint(3, STEPS - 15)
    agent = start(torchrun_cmd(run_dir, *OVERRIDES), tmp_path / "log1.txt")
    wait_for(lambda: last_step(run_dir) >= at, agent, timeout=180)
    if target == "agent":
        agent.send_signal(signal.SIGTERM)
    else:
        os.kill(worker_pids(agent)[1], signal.SIGUSR1)
    agent.wait(timeout=120)
    log = (tmp_path / "log1.txt").read_text()
    step = stopped_step(run_dir)
    assert log.count(f"after step {step} with a checkpoint") == 2, log[-3000:]  # one line per rank
    assert at <= step < STEPS and last_step(run_dir) == step
    assert run(torchrun_cmd(run_dir, *OVERRIDES)).returncode == 0
    assert_same_state(final_state(run_dir), final_state(reference))
    assert records(run_dir) == records(reference)


def test_a_second_run_on_a_held_folder_stops_at_once_and_kill9_leaves_no_stale_lock(tmp_path):
    run_dir = tmp_path / "run"
    cmd = pretrain_cmd(run_dir, "train.epochs=100000", "train.checkpoint_every=2")
    holder = start(cmd, tmp_path / "holder.txt")
    wait_for(lambda: last_step(run_dir) >= 3, holder, timeout=120)
    t0 = time.monotonic()
    config_only = run([*cmd, "--print-config"])
    baseline = time.monotonic() - t0  # interpreter, torch import, configuration
    t0 = time.monotonic()
    second = run(cmd)
    took = time.monotonic() - t0
    assert second.returncode == 2 and config_only.returncode == 0
    assert f"{run_dir} is in use by another run (pid {holder.pid} on {socket.gethostname()}" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1, second.stderr
    # stopped before the model and data are built: no slower than printing the configuration, give or
    # take noise that grows with the machine's load (which the baseline's own length shows)
    assert took - baseline < max(1.0, 0.25 * baseline), (took, baseline)
    # read-only commands keep working on the held folder
    export = [PYTHON, "-m", "conmim.cli", "export", str(run_dir), "--out", str(tmp_path / "e.safetensors")]
    assert run(export).returncode == 0
    kill_group(holder)
    assert not alive(holder.pid)
    third = run(pretrain_cmd(run_dir, f"train.max_steps={last_step(run_dir) + 2}", "train.checkpoint_every=2"))
    assert third.returncode == 0, third.stderr[-2000:]
    assert json.loads((run_dir / ".lock").read_text())["pid"] != holder.pid


def test_a_run_left_behind_by_a_failing_test_is_stopped(tmp_path):
    """What the autouse fixture calls after every test: a started run and its process group are killed."""
    orphan = start([PYTHON, "-c", "import time; time.sleep(600)"], tmp_path / "orphan.txt")
    assert alive(orphan.pid)
    stop_started_runs()
    assert not alive(orphan.pid)


def test_the_lock_is_exclusive_and_released(tmp_path):
    with FolderLock(tmp_path / "run"):
        with pytest.raises(FolderLockedError, match=rf"pid {os.getpid()} on "):
            FolderLock(tmp_path / "run")
    FolderLock(tmp_path / "run").release()  # free again


@pytest.mark.slow
def test_the_slurm_example_stops_requeues_and_the_requeued_job_ends_exactly(tmp_path):
    """examples/slurm/pretrain.sbatch under bash with SLURM's two commands stood in for (srun runs its
    command, scontrol records the requeue), two gloo ranks: SIGUSR1 to the batch shell at a random step,
    as ``--signal=B:USR1@120`` sends it."""
    reference = tmp_path / "reference"
    assert run(torchrun_cmd(reference, *OVERRIDES)).returncode == 0
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/usr/bin/env bash\nexec "$@"\n')
    (fake / "scontrol").write_text(f'#!/usr/bin/env bash\necho "$@" >> {tmp_path / "scontrol.txt"}\n')
    for tool in fake.iterdir():
        tool.chmod(0o755)
    run_dir = tmp_path / "run"
    args = torchrun_cmd(run_dir, *OVERRIDES)[7:]  # pretrain's arguments: after "-m conmim.cli pretrain"
    script = ["bash", "examples/slurm/pretrain.sbatch", *args]
    path = f"{fake}:{os.path.dirname(PYTHON)}:{os.environ['PATH']}"
    job = dict(PATH=path, NPROC="2", SLURM_JOB_ID="4242")
    at = random.Random(SEED + 11).randint(3, STEPS - 15)
    shell = subprocess.Popen(
        script,
        cwd=ROOT,
        env=env(**job),
        stdout=(tmp_path / "job1.txt").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    wait_for(lambda: last_step(run_dir) >= at, shell, timeout=180)
    shell.send_signal(signal.SIGUSR1)
    assert shell.wait(timeout=120) == 0, (tmp_path / "job1.txt").read_text()[-3000:]
    assert (tmp_path / "scontrol.txt").read_text().split() == ["requeue", "4242"]
    step = stopped_step(run_dir)
    assert at <= step < STEPS
    again = subprocess.run(script, cwd=ROOT, env=env(**job), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:]
    assert (tmp_path / "scontrol.txt").read_text().split() == ["requeue", "4242"]  # finished: no requeue
    assert_same_state(final_state(run_dir), final_state(reference))
    assert records(run_dir) == records(reference)


def script(code: str) -> subprocess.Popen:
    """``python -c code`` in its own process group, with text pipes for stdin, stdout and stderr."""
    return subprocess.Popen(
        [PYTHON, "-c", code],
        cwd=ROOT,
        env=env(),
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


FAILING_LOOP = """
import os, sys
from conmim.runtime.preemption import StopSignalLoader

class WorkerPids:
    def __len__(self):
        return 1000
    def __getitem__(self, i):
        return os.getpid()

batches = iter(StopSignalLoader(WorkerPids(), batch_size=1, num_workers=1, stop_signals=["SIGTERM"]))
print(int(next(batches)), flush=True)
sys.stdin.readline()
raise RuntimeError("a training loop failing while its loader's worker is alive")
"""


def test_a_worker_drops_a_stop_signal_from_others_and_a_failing_run_still_exits():
    """A worker must survive a group's SIGTERM (the main process checkpoints) yet obey its parent's, which is how
    multiprocessing stops daemonic children at interpreter exit: a run ending by an exception must not hang there."""
    proc = script(FAILING_LOOP)
    try:
        worker = int(proc.stdout.readline())
        os.kill(worker, signal.SIGTERM)  # from this test, not from the worker's parent
        time.sleep(1.0)
        assert alive(worker), "a worker died of a stop signal that its parent did not send"
        proc.stdin.write("fail now\n")
        proc.stdin.flush()
        assert proc.wait(timeout=60) == 1
        assert "a training loop failing" in proc.stderr.read()
    finally:
        with contextlib.suppress(ProcessLookupError):  # nothing left of the group once the run exited
            kill_group(proc)


EPOCHS_UNDER_FIRE = """
import signal, sys, time
from conmim.runtime.preemption import StopSignalLoader

received = []
signal.signal(signal.SIGTERM, lambda number, frame: received.append(number))
loader = StopSignalLoader(range(8), batch_size=4, num_workers=2, stop_signals=["SIGTERM"])  # new workers every epoch
print("ready", flush=True)
end, epochs = time.monotonic() + 8, 0
while time.monotonic() < end:
    epochs += sum(1 for _ in loader) // 2
print(epochs, len(received), flush=True)
sys.stdin.readline()  # exit once the test has stopped signalling: a SIGTERM during interpreter shutdown is fatal
"""


def test_a_group_signal_while_workers_start_is_left_to_the_main_process():
    """Without persistent workers a loader starts new ones every epoch; a group signal in the moment between a
    worker's start and its watch on the signals would kill it, and the run would fail instead of stopping."""
    proc = script(EPOCHS_UNDER_FIRE)
    done = threading.Event()

    def fire() -> None:
        while not done.wait(0.01):
            os.killpg(proc.pid, signal.SIGTERM)

    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        threading.Thread(target=fire, daemon=True).start()
        result = proc.stdout.readline()
        done.set()
        time.sleep(0.1)
        _, err = proc.communicate("exit\n", timeout=60)
        assert proc.returncode == 0 and result, err[-3000:]
        epochs, received = map(int, result.split())
        assert epochs > 20 and received > 100, (epochs, received)
    finally:
        done.set()
        with contextlib.suppress(ProcessLookupError):
            kill_group(proc)
