"""Reference line for docs/results.md: k-NN top-1 of raw normalised pixels on a study's fixed subsets.

Same subsets, evaluation transform, k and temperature as the study's encoders, so it tells how far a
small pre-training budget is from the simplest possible feature. Usage:
``python -m lab.diagnostics.raw_pixel_knn [STUDY_CONFIG]`` (default: the lab's study_cpu protocol).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from conmim.eval.common import EvalTransform
from conmim.eval.knn import knn_accuracy
from lab.study import load_study, study_splits, variant_config


def main(config: str = "study_cpu") -> float:
    study, base = load_study(config)
    cfg = variant_config(base, study.variants[0], 0, Path(study.output_dir), Path(study.output_dir))
    train, test = study_splits(study, base.data.path)  # cfg.data.path points at the study's IDX copy
    transform = EvalTransform(cfg.model.img_size, cfg.data.mean, cfg.data.std)
    feats = [torch.stack([transform(src[i][0]).flatten() for i in range(len(src))]) for src in (train, test)]
    labels = [torch.as_tensor(src.labels.astype("int64")) for src in (train, test)]
    top1 = knn_accuracy(feats[0], labels[0], feats[1], labels[1], cfg.eval.knn_k, cfg.eval.knn_t)
    print(
        f"raw-pixel k-NN top-1 (k={cfg.eval.knn_k}, t={cfg.eval.knn_t}, {len(train)} bank / {len(test)} queries): "
        f"{top1:.2f}%"
    )
    return top1


if __name__ == "__main__":
    main(*sys.argv[1:2])
