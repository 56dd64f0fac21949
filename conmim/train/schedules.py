"""Per-step schedules (docs/method.md §10.1, §9): linear warm-up from 0 then half-cosine, and the teacher momentum.

All schedules are functions of one global step count and one total, so their lengths can never
disagree (the official code's lr and momentum schedules could differ by one epoch, docs/method.md §13).
"""

from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, peak: float, final: float, warmup: int = 0, start: float = 0.0) -> float:
    """``start`` -> ``peak`` linearly over ``warmup`` steps, then cosine from ``peak`` to ``final`` at ``total``."""
    if step < warmup:
        return start + (peak - start) * step / warmup
    span = max(total - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    return final + 0.5 * (peak - final) * (1.0 + math.cos(math.pi * progress))


def teacher_momentum(step: int, total: int, start: float = 0.996, end: float = 1.0) -> float:
    """Cosine from ``start`` at step 0 to ``end`` at the last step (``total - 1``)."""
    if total <= 1:
        return start
    progress = min(step / (total - 1), 1.0)
    return end - (end - start) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_poly(
    step: int,
    total: int,
    peak: float,
    warmup: int = 0,
    warmup_ratio: float = 1e-6,
    power: float = 1.0,
    final: float = 0.0,
) -> float:
    """mmcv's ``poly`` policy with linear warm-up, as BEiT's segmentation configs use it: the poly
    value ``(peak - final) * (1 - step / total) ** power + final``, scaled during the first ``warmup``
    steps by a factor rising linearly from ``warmup_ratio`` to 1."""
    value = (peak - final) * (1.0 - min(step, total) / max(total, 1)) ** power + final
    if step < warmup:
        value *= 1.0 - (1.0 - step / warmup) * (1.0 - warmup_ratio)
    return value
