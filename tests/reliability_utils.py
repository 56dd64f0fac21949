"""Shared pieces of the fault-injection suite (tests/test_reliability_*.py).

Runs are real: ``python -m conmim.cli pretrain`` (or ``torchrun``) subprocesses on a tiny ViT, with
real checkpoints on disk. Each subprocess uses one intra-op thread: on a small, shared CPU, OpenMP
threads that spin while another process holds the cores make a step 50x slower.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tiny import TINY_MODEL

from conmim.runtime import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
# Fault positions are random; a failure names the seed, and CONMIM_FAULT_SEED=N replays it.
SEED = int(os.environ.get("CONMIM_FAULT_SEED", random.randrange(10**6)))

# 16-px images, 4-px patches, 2 blocks, a narrow projector, synthetic data, fp32, drop path on
# (so the torch RNG state matters), a log record and a checkpoint every step.
TINY = [
    *TINY_MODEL,
    "model.drop_path=0.1",
    "data.source=synthetic",
    "data.synthetic_size=64",
    "data.num_workers=0",
    "train.batch_size=8",
    "train.epochs=2",
    "train.warmup_epochs=0.5",
    "train.base_lr=1e-3",
    "precision=fp32",
    "train.log_every=1",
    "train.checkpoint_every=1",
    "train.keep_checkpoints=3",
    "eval.final_knn=false",
    "eval.monitor_every=0",
]


def env(**extra: str) -> dict[str, str]:
    out = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out.update(extra)
    return out


def pretrain_cmd(run_dir: Path, *overrides: str) -> list[str]:
    return [PYTHON, "-m", "conmim.cli", "pretrain", *TINY, f"output_dir={run_dir}", *overrides]


def run(cmd: list[str], timeout: float = 180, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout, **kw)


STARTED: list[subprocess.Popen] = []  # every run start() made, for stop_started_runs()


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """A run in its own process group (its data-loader workers die with it), output to ``log``."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env(), stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    STARTED.append(proc)
    return proc


def stop_started_runs() -> None:
    """``kill -9`` every run start() made that is still going: a test that fails before its own kill
    must not leave a run behind that takes the cores of every later test."""
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            kill_group(proc)


def records(run_dir: Path, drop: tuple[str, ...] = ("img_per_s",)) -> list[dict]:
    """``metrics.jsonl`` without the wall-clock fields, which no two runs share."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(ln).items() if k not in drop} for ln in lines]


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(ln)["step"] for ln in path.read_text().splitlines() if ln.endswith("}")]
    return steps[-1] if steps else 0


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, timeout: float, poll: float = 0.02) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"run exited (rc {proc.returncode}) before the fault could be injected")
        if time.monotonic() > end:
            raise AssertionError("timed out waiting to inject the fault")
        time.sleep(poll)


def kill_group(proc: subprocess.Popen) -> None:
    """``kill -9`` the run and its data-loader workers, as a node failure would."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def kill_during_checkpoint_write(proc: subprocess.Popen, folder: Path, timeout: float = 120) -> str:
    """Freeze the run while a checkpoint temp file exists, confirm it still does, then ``kill -9``.

    SIGSTOP makes the check race-free: a temp file present while the process is stopped proves the
    kill lands between ``mkstemp`` and ``os.replace``, i.e. in the middle of writing. Returns the
    temp file's name.
    """
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"run exited (rc {proc.returncode}) before a checkpoint write was caught")
        temps = list(folder.glob(".step_*.tmp")) if folder.is_dir() else []
        if temps:
            os.killpg(proc.pid, signal.SIGSTOP)
            still = [p for p in folder.glob(".step_*.tmp") if p.exists()]
            if still:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
                return still[0].name
            os.killpg(proc.pid, signal.SIGCONT)
        time.sleep(0.001)
    raise AssertionError("no checkpoint write caught in time")


def final_state(run_dir: Path) -> dict:
    found = ckpt.load_latest(run_dir / "checkpoints")
    assert found is not None, f"{run_dir}: no checkpoint"
    return found[0]


def assert_same_state(a: dict, b: dict, same_step: bool = True) -> None:
    """Model (student, teacher, BatchNorm statistics) and optimizer state bitwise equal."""
    if same_step:
        assert a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), f"model weight {key} differs"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for pid in sa:
        for name in sa[pid]:
            assert torch.equal(sa[pid][name], sb[pid][name]), f"optimizer state {pid}/{name} differs"


def torchrun_cmd(run_dir: Path, *overrides: str, max_restarts: int = 0) -> list[str]:
    """Two gloo ranks on the CPU; ``--standalone`` picks a free port."""
    torchrun = str(Path(PYTHON).parent / "torchrun")
    return [
        torchrun,
        "--standalone",
        "--nproc_per_node=2",
        f"--max-restarts={max_restarts}",
        "-m",
        "conmim.cli",
        "pretrain",
        *TINY,
        "train.batch_size=4",
        f"output_dir={run_dir}",
        *overrides,
    ]


def worker_pids(agent: subprocess.Popen) -> dict[int, int]:
    """``{rank: pid}`` of the live worker processes that a torchrun agent started."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) != agent.pid or fields[0] == "Z":
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        for item in environ:
            if item.startswith(b"RANK="):
                found[int(item[5:])] = int(entry.name)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def load_tiny(run_dir: Path, *overrides: str):
    """The same configuration the CLI runs build, for in-process runs."""
    from conmim.config import load_config

    return load_config(None, [*TINY, f"output_dir={run_dir}", *overrides], default_preset="fashion_mnist")


def pretrain_in_process(run_dir: Path, *overrides: str) -> dict:
    """``conmim.train.engine.pretrain`` in this process, on one intra-op thread (see the module docstring)."""
    from conmim.train.engine import pretrain

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return pretrain(load_tiny(run_dir, *overrides))
    finally:
        torch.set_num_threads(threads)
