"""What every lab record says about where it was made: the CPU, its compute capability, the commit."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch


def cpu_name() -> str:
    """The CPU's model name (figures from different CPU kinds are never compared)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def machine() -> dict[str, Any]:
    """The CPU and the kernels torch picks on it (AVX2, AVX512, AMX differ by factors in step time), and
    the GPU where there is one."""
    found = {"cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name(0)
    return found


def commit() -> str:
    """The repository's HEAD, so a record says which code made it; ``LAB_COMMIT`` names it where the
    checkout has no git (a copy of the working tree on another machine)."""
    if os.environ.get("LAB_COMMIT"):
        return os.environ["LAB_COMMIT"]
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    except OSError:
        return "unknown"
    return done.stdout.strip() or "unknown"
