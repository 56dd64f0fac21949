"""What slows fine-tuning from scratch under the label-efficiency recipe, for docs/evaluation.md.

Scratch fine-tuning (timm's random initialisation) on the study's 10 % subset (6,000 labels, seed 0) for
6 passes (281 steps at batch 128, 0.1-pass warm-up), test top-1 on all 10,000 test images, once per
setting ``LAYER_DECAY[:BASE_LR]`` (default base_lr: the recipe's 2e-3, i.e. lr 1e-3). Usage:
``python -m lab.diagnostics.scratch_recipe_check 0.75 1.0 1.0:6e-3``.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

from conmim.eval.finetune import finetune
from lab.study import (
    _random_encoder,
    balanced_subset,
    fraction_config,
    load_study,
    study_splits,
    tile,
    variant_config,
)

PASSES = 6


def main(settings: list[str], out: Path = Path("runs/scratch_recipe_check")) -> None:
    torch.set_num_threads(1)
    study, base = load_study("lab/records/study_labels/session.yaml")
    scratch = next(v for v in study.variants if v.name == "scratch")
    cfg = variant_config(base, scratch, 0, out, Path(study.output_dir) / "data")
    train, test = study_splits(study, base.data.path)
    labelled = balanced_subset(train, 0.1, 0)
    recipe, _passes = fraction_config(cfg, study, 1)
    recipe.finetune.epochs, recipe.finetune.warmup_epochs = 1, 0.1  # one evaluation after all passes
    for setting in settings:
        layer_decay, _, base_lr = setting.partition(":")
        c = copy.deepcopy(recipe)
        c.finetune.layer_decay = float(layer_decay)
        c.finetune.base_lr = float(base_lr or c.finetune.base_lr)
        result = finetune(
            _random_encoder(cfg, 0),
            tile(train, labelled, PASSES),
            test,
            c,
            out / setting.replace(":", "_lr"),
            head_images=tile(train, labelled, 1),
        )
        steps = PASSES * len(labelled) // c.finetune.batch_size
        print(
            json.dumps(
                {
                    "layer_decay": c.finetune.layer_decay,
                    "base_lr": c.finetune.base_lr,
                    "steps": steps,
                    "top1": round(result["top1"], 2),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1:] or ["0.75", "1.0"])
