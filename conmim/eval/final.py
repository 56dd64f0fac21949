"""The one-screen summary after pre-training: does the encoder beat a random initialisation?

The teacher and a randomly initialised encoder of the same configuration are each encoded once
over the labelled training and held-out splits; a weighted k-NN and a linear probe run on those
cached features. The summary never fails a finished pre-training: data without labels or without
a held-out split, or a run too short to mean anything, skip it with one log line.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import Config
from ..data.sources import DataError, split_missing
from .common import EvalTransform, LabeledDataset, eval_sources, num_classes_of
from .knn import extract_features, knn_accuracy
from .linprobe import probe_cached

log = logging.getLogger(__name__)


def last_retrieval_acc(out: Path) -> float | None:
    """The masked-patch retrieval accuracy of the run's last logged record."""
    path, found = out / "metrics.jsonl", None
    if path.is_file():
        for line in path.read_text().splitlines():
            value = json.loads(line).get("retrieval_acc")
            found = value if value is not None else found
    return found


def final_evaluation(
    cfg: Config,
    teacher: nn.Module,
    random_init: nn.Module,
    steps: int,
    minutes: float,
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> dict[str, Any] | None:
    """k-NN and linear probe of ``teacher`` against ``random_init``; the report written to
    ``OUTPUT_DIR/final_eval.json``, or None when skipped (the reason is logged)."""
    e = cfg.eval
    if steps < e.final_min_steps:
        log.warning(
            "final evaluation skipped: this run made %d steps, fewer than eval.final_min_steps=%d "
            "(run `conmim knn %s` for one)",
            steps,
            e.final_min_steps,
            cfg.output_dir,
        )
        return None
    size = cfg.model.img_size
    try:
        missing = split_missing(cfg.data, cfg.data.eval_split)  # known before any image is read
        if missing is not None:
            raise DataError(f"the data has no held-out split: {missing}")
        train, test = eval_sources(cfg, size)
        classes = num_classes_of(train, test)
    except (DataError, FileNotFoundError, ValueError) as err:
        log.warning(
            "final evaluation skipped: it needs labelled %s and %s splits (%s)",
            cfg.data.split,
            cfg.data.eval_split,
            err,
        )
        return None
    out = Path(cfg.output_dir)
    n_patches = (size // cfg.model.patch_size) ** 2
    report: dict[str, Any] = {
        "pretrain_minutes": round(minutes, 2),
        "steps": steps,
        "retrieval_acc": last_retrieval_acc(out),
        "retrieval_chance": 1 / n_patches,
        "train_images": len(train),
        "test_images": len(test),
        "pool": e.pool,
        "knn_k": e.knn_k,
        "linprobe_epochs": cfg.linprobe.epochs,
    }
    transform = EvalTransform(size, cfg.data.mean, cfg.data.std)
    for name, encoder in (("teacher", teacher), ("random_init", random_init)):
        feats = [
            extract_features(
                encoder,
                LabeledDataset(src, transform),
                e.batch_size,
                e.pool,
                device,
                cfg.data.num_workers,
                f"{name} {split} features",
                amp_dtype=amp_dtype,
            )
            for split, src in (("train", train), ("test", test))
        ]
        (train_x, train_y), (test_x, test_y) = feats
        report[f"knn_top1_{name}"] = round(knn_accuracy(train_x, train_y, test_x, test_y, e.knn_k, e.knn_t), 2)
        report[f"linprobe_top1_{name}"] = round(
            probe_cached(train_x, train_y, test_x, test_y, classes, cfg.linprobe, device, cfg.seed), 2
        )
    (out / "final_eval.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def evaluate_after_pretrain(cfg: Config, model: nn.Module, steps: int, minutes: float) -> dict[str, Any] | None:
    """:func:`final_evaluation` of a finished pre-training: its teacher encoder against a random
    initialisation of the same configuration (seeded with ``seed``)."""
    from ..models.conmim import ConMIM
    from ..runtime.device import resolve_device, resolve_precision

    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    random_init = ConMIM.from_config(cfg.model).teacher.encoder.to(device)
    return final_evaluation(
        cfg, model.teacher.encoder, random_init, steps, minutes, device, resolve_precision(cfg.precision, device)
    )


def summary_line(report: dict[str, Any]) -> str:
    """One screen: retrieval accuracy against chance, then teacher against random init."""
    acc, knn = report["retrieval_acc"], f"k-NN top-1 (k={report['knn_k']})"
    shown = "n/a" if acc is None or math.isnan(acc) else f"{100 * acc:.1f} %"
    return (
        f"ConMIM after {report['steps']} steps ({report['pretrain_minutes']:.1f} min): masked-patch retrieval "
        f"{shown} (chance {100 * report['retrieval_chance']:.1f} %)\n"
        f"  {'':<22}{'teacher':>10}{'random init':>14}\n"
        f"  {knn:<22}{report['knn_top1_teacher']:>9.2f}%"
        f"{report['knn_top1_random_init']:>13.2f}%\n"
        f"  {'linear probe top-1':<22}{report['linprobe_top1_teacher']:>9.2f}%"
        f"{report['linprobe_top1_random_init']:>13.2f}%\n"
        f"  ({report['train_images']} training / {report['test_images']} test images, {report['pool']}-pooled "
        f"features)"
    )
