"""The tiny configuration every CPU test builds on: one place to make all tests smaller or larger."""

from __future__ import annotations

# A ViT small enough for CPU tests: 16-px images, 4-px patches (a 4x4 grid), 2 blocks, a narrow projector.
TINY_MODEL_ARGS = dict(arch="vit_tiny", img_size=16, patch_size=4, depth=2, proj_hidden_dim=64, proj_out_dim=32)
TINY_MODEL = [f"model.{key}={value}" for key, value in TINY_MODEL_ARGS.items()] + ["mask.unit=2"]

# A short fp32 pre-training on the preset's data (Fashion-MNIST): a record every 2 steps, a checkpoint every 3.
TINY = [
    *TINY_MODEL,
    "data.num_workers=0",
    "train.batch_size=8",
    "train.epochs=1",
    "train.warmup_epochs=0.1",
    "train.log_every=2",
    "train.checkpoint_every=3",
    "precision=fp32",
    "train.base_lr=1e-3",
    "eval.final_knn=false",
    "eval.monitor_every=0",
]
