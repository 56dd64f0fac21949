"""Device and precision resolution, and the autocast context every command uses."""

from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products natively (AVX512-BF16 or AMX). Without either,
    oneDNN emulates them: on a 2-core AVX2-only AMD EPYC the built-in pre-training step took 6x the CPU
    time in bf16 autocast that it took in fp32 (docs/results.md, Speed), while on an Intel Xeon with AMX
    bf16 made it about 2x faster than fp32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own (private) checks
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for fp32. ``auto`` is bf16 on GPU and on a CPU with native bf16
    (:func:`cpu_has_native_bf16`), fp32 on any other CPU; an explicit bf16 on such a CPU is kept, with a warning."""
    native = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
    if precision == "auto":
        precision = "bf16" if native else "fp32"
    elif precision == "bf16" and device.type == "cpu" and not native:
        log.warning(
            "precision=bf16 on a CPU without native bf16 (no AVX512-BF16 or AMX): bf16 is emulated and "
            "several times slower than fp32 here; precision=auto picks the faster one"
        )
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``amp_dtype`` on ``device``, or a no-op context for fp32 (``None``)."""
    return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)
