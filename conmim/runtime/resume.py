"""The checkpoint a fine-tuning or dense training loop writes and resumes from: the modules' states,
every rank's RNG states and per-rank values (a loss window), in one atomically written file.

Together with batches that are a function of the step (:class:`conmim.data.pretrain.EpochSampler`,
:class:`conmim.dense.data.StepSampler`) this makes a resumed run train exactly as an uninterrupted
one: the same batches, the same augmentations, the same drop-path and mixup draws. Pre-training keeps
its own richer format (step files, retention, the non-finite guard's restores: :mod:`conmim.train.engine`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from . import distributed
from .seeding import rng_state, set_rng_state

log = logging.getLogger(__name__)


def save_training_state(
    path: Path,
    stateful: dict[str, Any],
    extra: dict[str, Any],
    info: distributed.DistInfo,
    device: torch.device,
    local: Any = None,
) -> None:
    """Rank 0 writes ``{name: obj.state_dict()}`` for ``stateful``, the ``extra`` values, every rank's
    RNG states (``rng``) and every rank's ``local`` value (``local``). Every rank must call it."""
    per_rank = distributed.gather_to_main({"rng": rng_state(device), "local": local})
    if info.is_main:
        state = {name: obj.state_dict() for name, obj in stateful.items()}
        ranks = {"rng": [r["rng"] for r in per_rank], "local": [r["local"] for r in per_rank]}
        ckpt.atomic_save({**state, **extra, **ranks}, path)


def load_training_state(
    path: Path, stateful: dict[str, Any], info: distributed.DistInfo, device: torch.device
) -> tuple[dict[str, Any], Any] | None:
    """When ``path`` exists: load every ``stateful`` object's state and this rank's RNG states from it;
    returns (the checkpoint, this rank's ``local`` value). None when there is nothing to resume."""
    if not path.is_file():
        return None
    state = ckpt.safe_load(path)
    for name, obj in stateful.items():
        obj.load_state_dict(state[name])
    rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
    if len(rngs) != info.world_size:
        log.warning(
            "%s was written by %d process(es), not %d: the resume is not exact", path, len(rngs), info.world_size
        )
    set_rng_state(rngs[info.rank % len(rngs)], device)
    locals_ = state.get("local") or [None]
    return state, locals_[info.rank % len(locals_)]
