"""Fine-tuning recipe sweep on a validation split: which recipe gets the most out of a given start.

    python -m lab.sweep [lab/presets/recipe_sweep.yaml]

For each label fraction the labelled images are the class-balanced subset the label-efficiency study
uses (:func:`lab.study.balanced_subset`, same seed), and the validation images are a class-balanced
draw from the training images outside the largest swept fraction's subset: the test split is never
read. Every trial (fraction x passes x recipe overrides) fine-tunes the configured start (``random``:
timm's initialisation, i.e. from scratch; or a run directory / export) and appends one JSON line to
``sweep.records``; a trial already there is skipped, an interrupted one resumes from its checkpoints.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from conmim.config import ConfigError, load_config
from conmim.data.sources import ArraySource, fashion_mnist
from conmim.eval.finetune import finetune
from lab.provenance import commit, cpu_name
from lab.study import _random_encoder, balanced_subset, lab_preset, tile

log = logging.getLogger("lab.sweep")


@dataclass
class FractionTrials:
    fraction: float
    passes: list[int]  # fine-tuning lengths, in passes over the labelled images
    evals: int = 4  # validation evaluations per trial (each passes / evals passes)
    overrides: list[str] = field(default_factory=list)  # for every trial of this fraction (e.g. batch size)


@dataclass
class SweepSettings:
    output_dir: str = "runs/recipe_sweep"
    records: str = "lab/records/recipe_sweep/trials.jsonl"
    seed: int = 0  # label subset, validation draw, initialisation and fine-tuning
    val_per_class: int = 500
    threads: int = 0  # torch threads (0: torch's default)
    start: str = "random"  # random (scratch) | a pre-training run directory, checkpoint or export
    preset: str = "fashion_mnist"  # the configuration the overrides apply to
    base: list[str] = field(default_factory=list)  # overrides for every trial
    fractions: list[FractionTrials] = field(default_factory=list)
    recipes: list[list[str]] = field(default_factory=lambda: [[]])  # crossed with every fraction and length


def load_sweep(path: str) -> SweepSettings:
    source = str(lab_preset(path))
    try:
        raw = OmegaConf.load(source)
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SweepSettings), raw.get("sweep", {})))
    except OmegaConfBaseException as err:
        raise ConfigError(f"bad sweep configuration {source}: {err}") from None


def validation_indices(train: ArraySource, used: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """A class-balanced draw of ``per_class`` images per class among the indices not in ``used``."""
    free = np.setdiff1d(np.arange(len(train)), used)
    rng = np.random.default_rng(seed + 10_007)
    labels = np.asarray(train.labels)[free]
    chosen = [rng.permutation(free[labels == c])[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(chosen))


def trial_key(settings: SweepSettings, fraction: float, passes: int, overrides: list[str]) -> str:
    return json.dumps([settings.start, settings.seed, fraction, passes, sorted(overrides)])


def done_keys(records: Path) -> set[str]:
    if not records.is_file():
        return set()
    return {json.loads(line)["key"] for line in records.read_text().splitlines() if line.strip()}


def run_trial(
    settings: SweepSettings,
    trials: FractionTrials,
    passes: int,
    recipe: list[str],
    train: ArraySource,
    val: ArraySource,
    labelled: np.ndarray,
) -> dict[str, Any]:
    overrides = [*settings.base, *trials.overrides, *recipe]
    if passes % trials.evals:
        raise ConfigError(f"passes={passes} is not a multiple of evals={trials.evals} (fraction {trials.fraction})")
    tiles = passes // trials.evals
    name = f"f{trials.fraction:g}_p{passes}_" + "_".join(o.split(".")[-1] for o in recipe).replace("=", "")
    out = Path(settings.output_dir) / name
    cfg = load_config(
        settings.preset,
        [
            *overrides,
            f"seed={settings.seed}",
            f"output_dir={out}",
            f"finetune.epochs={trials.evals}",
            *(["finetune.init=random"] if settings.start == "random" else []),
        ],
        command="finetune",
    )
    warmup_passes = cfg.finetune.warmup_epochs  # given in passes over the labelled images
    cfg.finetune.warmup_epochs = warmup_passes / tiles
    encoder = _random_encoder(cfg, settings.seed) if settings.start == "random" else settings.start
    start = time.perf_counter()
    result = finetune(
        encoder, tile(train, labelled, tiles), val, cfg, out, head_source=(tile(train, labelled, 1), tiles)
    )
    (out / "checkpoints" / "last.pt").unlink(missing_ok=True)  # finished: the record holds what counts
    steps = trials.evals * (len(labelled) * tiles // cfg.finetune.batch_size)
    return {
        "key": trial_key(settings, trials.fraction, passes, recipe),
        "start": settings.start,
        "seed": settings.seed,
        "fraction": trials.fraction,
        "labels": len(labelled),
        "val_images": len(val),
        "passes": passes,
        "warmup_passes": warmup_passes,
        "steps": steps,
        "batch_size": cfg.finetune.batch_size,
        "overrides": overrides,
        "val_top1": result["top1"],
        "val_best_top1": result["best_top1"],
        "val_history_top1": [h["top1"] for h in result["history"]],
        "seconds": round(time.perf_counter() - start, 1),
        "machine": {
            "cpu": cpu_name(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads(),
        },
        "commit": commit(),  # fine-tuning's data order changed at ce7a524 (per-sample seeded, resumable)
    }


def run_sweep(path: str) -> list[dict[str, Any]]:
    settings = load_sweep(path)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    cfg = load_config(settings.preset, settings.base, command="finetune")
    train = fashion_mnist(cfg.data.path, "train")
    subsets = {t.fraction: balanced_subset(train, t.fraction, settings.seed) for t in settings.fractions}
    largest = max(subsets.values(), key=len)
    val_idx = validation_indices(train, largest, settings.val_per_class, settings.seed)
    val = ArraySource(train.images[val_idx], train.labels[val_idx], train.classes)
    records = Path(settings.records)
    records.parent.mkdir(parents=True, exist_ok=True)
    done, rows = done_keys(records), []
    for trials in settings.fractions:
        for passes in trials.passes:
            for recipe in settings.recipes:
                if trial_key(settings, trials.fraction, passes, recipe) in done:
                    continue
                log.info("sweep: fraction %g, %d passes, %s", trials.fraction, passes, recipe or "base recipe")
                row = run_trial(settings, trials, passes, recipe, train, val, subsets[trials.fraction])
                with records.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", default="recipe_sweep", help="sweep YAML file or lab preset name")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        rows = run_sweep(args.config)
    except ConfigError as err:
        print(f"lab.sweep: error: {err}", file=sys.stderr)
        return 2
    for r in rows:
        print(f"fraction {r['fraction']:g} passes {r['passes']} {r['overrides']}: val top-1 {r['val_top1']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
