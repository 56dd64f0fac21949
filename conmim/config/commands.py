"""Which keys each command reads: its ``--print-config`` shows these, its checks cover these."""

from __future__ import annotations

# Shared by every command, at the top level.
RUN_KEYS = ("seed", "device", "precision", "output_dir", "dist_timeout_s", "stop_signals")
_PRETRAIN = (
    *RUN_KEYS,
    "resume",
    "model",
    "mask",
    "data",
    "scenes",  # data.source=scenes: which built-in scenes
    "train",
    # the online k-NN monitor and the final evaluation after pre-training
    "eval.knn_k",
    "eval.knn_t",
    "eval.pool",
    "eval.batch_size",
    "eval.final_knn",
    "eval.final_min_steps",
    "eval.monitor_every",
    "eval.monitor_bank",
    "eval.monitor_queries",
    "linprobe",
)
_FROZEN = (*RUN_KEYS, "model.in_chans", "data", "eval.batch_size", "eval.which")
COMMAND_KEYS: dict[str, tuple[str, ...]] = {
    "pretrain": _PRETRAIN,
    "bench": (*_PRETRAIN, "bench"),
    "knn": (*_FROZEN, "eval.knn_k", "eval.knn_t", "eval.pool"),
    "linprobe": (*_FROZEN, "linprobe"),
    "finetune": (*RUN_KEYS, "model.img_size", "model.in_chans", "data", "finetune"),
    "segment": (*RUN_KEYS, "data", "scenes", "segment"),
    "detect": (*RUN_KEYS, "data", "scenes", "detect"),
    "stats": (*RUN_KEYS, "model.img_size", "model.in_chans", "data", "scenes"),
}
