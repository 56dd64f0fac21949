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
import hashlib
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
from lab.provenance import commit, machine
from lab.study import _random_encoder, balanced_subset, lab_preset, tile

log = logging.getLogger("lab.sweep")


@dataclass
class FractionTrials:
    fraction: float
    passes: list[int]  # fine-tuning lengths, in passes over the labelled images
    evals: int = 4  # validation evaluations per trial (each passes / evals passes)
    overrides: list[str] = field(default_factory=list)  # for every trial of this fraction (e.g. batch size)
    recipes: list[list[str]] = field(default_factory=list)  # this fraction's recipes (empty: the sweep's)


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
    # also score each trial's final model on the test split (recorded as test_top1, never used to choose:
    # a start's best-of-sweep figure is the test top-1 of its best validation trial)
    test: bool = False


def load_sweep(path: str, overrides: list[str] | None = None) -> SweepSettings:
    """The preset ``path`` (a file or a lab preset name), then dotted ``sweep.KEY=VALUE`` overrides."""
    source = str(lab_preset(path))
    try:
        raw = OmegaConf.load(source)
        merged = OmegaConf.merge(
            OmegaConf.structured(SweepSettings),
            raw.get("sweep", {}),
            OmegaConf.from_dotlist(overrides or []).get("sweep", {}),
        )
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(f"bad sweep configuration {source}: {err}") from None


def validation_indices(train: ArraySource, used: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """A class-balanced draw of ``per_class`` images per class among the indices not in ``used``."""
    free = np.setdiff1d(np.arange(len(train)), used)
    rng = np.random.default_rng(seed + 10_007)
    labels = np.asarray(train.labels)[free]
    chosen = [rng.permutation(free[labels == c])[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(chosen))


def trial_key(
    start: str, seed: int, fraction: float, passes: int, overrides: list[str], head_fit_passes: int | None
) -> str:
    """What makes a trial: its start, seed, fraction, passes, every override in force, in order (the
    sweep's base, the fraction's, the recipe's) and its head fit's passes over the labelled images. A trial
    of a changed base recipe is a new trial, and the records are keyed by the fields they hold, so trials
    recorded before the key named the base count too. Records without ``head_fit_passes`` fitted the head
    for ``probe_head_epochs`` tiled epochs (passes / evals passes each): they key as None, never as a
    trial of today's code."""
    return json.dumps([start, seed, fraction, passes, list(overrides), head_fit_passes])


def head_fit_passes(settings: SweepSettings, overrides: list[str]) -> int:
    """Passes over the labelled images of a trial's head fit before fine-tuning (``probe_head_epochs``)."""
    return load_config(settings.preset, overrides, command="finetune").finetune.probe_head_epochs


def trial_overrides(settings: SweepSettings, trials: FractionTrials, recipe: list[str]) -> list[str]:
    """Every override a trial runs under, in the order they apply (the sweep's base, the fraction's, the
    recipe's): what keys the trial in the record and names its folder, so a changed base is a new trial."""
    return [*settings.base, *trials.overrides, *recipe]


def trial_folder(settings: SweepSettings, trials: FractionTrials, passes: int, recipe: list[str]) -> Path:
    """Where a trial runs; a pre-trained start's trials have a folder of their own, so that two starts'
    sweeps side by side never resume from each other's checkpoints, and a digest of every override and of
    the head fit keeps a trial of a changed base recipe from resuming one of the old."""
    settings_named = (o.split("=", 1)[0].split(".")[-1] + o.split("=", 1)[1] for o in recipe)  # layer_decay0.75
    overrides = trial_overrides(settings, trials, recipe)
    keyed = json.dumps([overrides, "head_fit_passes", head_fit_passes(settings, overrides)])
    digest = hashlib.sha1(keyed.encode()).hexdigest()[:8]
    name = f"f{trials.fraction:g}_p{passes}_{digest}_" + "_".join(settings_named)
    if settings.start == "random":
        return Path(settings.output_dir) / name
    return Path(settings.output_dir) / "_".join(Path(settings.start).with_suffix("").parts[-3:]) / name


def done_keys(records: Path) -> set[str]:
    if not records.is_file():
        return set()
    rows = [json.loads(line) for line in records.read_text().splitlines() if line.strip()]
    return {
        trial_key(r["start"], r["seed"], r["fraction"], r["passes"], r["overrides"], r.get("head_fit_passes"))
        for r in rows
    }


def run_trial(
    settings: SweepSettings,
    trials: FractionTrials,
    passes: int,
    recipe: list[str],
    train: ArraySource,
    val: ArraySource,
    labelled: np.ndarray,
    test: ArraySource | None = None,
) -> dict[str, Any]:
    overrides = trial_overrides(settings, trials, recipe)
    if passes % trials.evals:
        raise ConfigError(f"passes={passes} is not a multiple of evals={trials.evals} (fraction {trials.fraction})")
    tiles = passes // trials.evals
    out = trial_folder(settings, trials, passes, recipe)
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
    result = finetune(encoder, tile(train, labelled, tiles), val, cfg, out, head_images=tile(train, labelled, 1))
    scored = {"test_top1": final_test_top1(out, test, cfg)} if test is not None else {}
    (out / "checkpoints" / "last.pt").unlink(missing_ok=True)  # finished: the record holds what counts
    steps = trials.evals * (len(labelled) * tiles // cfg.finetune.batch_size)
    return {
        "key": trial_key(
            settings.start, settings.seed, trials.fraction, passes, overrides, cfg.finetune.probe_head_epochs
        ),
        "start": settings.start,
        "seed": settings.seed,
        "fraction": trials.fraction,
        "labels": len(labelled),
        "val_images": len(val),
        "passes": passes,
        "warmup_passes": warmup_passes,
        "head_fit_passes": cfg.finetune.probe_head_epochs,
        "steps": steps,
        "batch_size": cfg.finetune.batch_size,
        "overrides": overrides,
        "val_top1": result["top1"],
        "val_best_top1": result["best_top1"],
        "val_history_top1": [h["top1"] for h in result["history"]],
        **scored,
        "seconds": round(time.perf_counter() - start, 1),
        "machine": {**machine(), "torch_threads": torch.get_num_threads()},
        "commit": commit(),  # fine-tuning's data order changed at ce7a524 (per-sample seeded, resumable)
    }


def final_test_top1(out: Path, test: ArraySource, cfg) -> float:
    """Test top-1 of the model a trial ends with (``checkpoints/last.pt``, in the architecture of
    ``best.safetensors``), whichever epoch scored best on validation: the validation score that
    chooses a trial is its final one too."""
    from conmim.eval.common import EvalTransform, LabeledDataset
    from conmim.eval.finetune import evaluate
    from conmim.export.encoders import load_encoder
    from conmim.runtime import checkpoint as ckpt
    from conmim.runtime.device import resolve_device, resolve_precision

    device = resolve_device(cfg.device)
    model = load_encoder(out / "best.safetensors")
    model.load_state_dict(ckpt.safe_load(out / "checkpoints" / "last.pt")["model"])
    dataset = LabeledDataset(
        test, EvalTransform(cfg.model.img_size, cfg.data.mean, cfg.data.std, cfg.finetune.crop_pct)
    )
    amp = resolve_precision(cfg.precision, device)
    return evaluate(model.to(device), dataset, 512, device, amp, cfg.data.num_workers)["top1"]


def sweep_splits(settings: SweepSettings, train: ArraySource) -> tuple[dict[float, np.ndarray], ArraySource]:
    """(the labelled indices of every fraction, the validation images). Validation images come from
    outside the largest fraction below 1; fraction 1 is every other training image."""
    subsets = {t.fraction: balanced_subset(train, t.fraction, settings.seed) for t in settings.fractions}
    partial = [idx for f, idx in subsets.items() if f < 1]
    used = max(partial, key=len) if partial else np.zeros(0, dtype=np.int64)
    val_idx = validation_indices(train, used, settings.val_per_class, settings.seed)
    for fraction in subsets:
        if fraction >= 1:
            subsets[fraction] = np.setdiff1d(np.arange(len(train)), val_idx)
    return subsets, ArraySource(train.images[val_idx], train.labels[val_idx], train.classes)


def run_sweep(
    path: str,
    overrides: list[str] | None = None,
    fractions: list[float] | None = None,
    recipes: list[int] | None = None,
) -> list[dict]:
    """Every trial of the preset not yet recorded (only ``fractions`` and the recipes at positions
    ``recipes`` when given); the new records."""
    settings = load_sweep(path, overrides)
    if settings.start != "random" and not Path(settings.start).exists():
        raise ConfigError(
            f"sweep.start={settings.start!r}: no such pre-training run directory, checkpoint or export "
            "(pre-train it first, e.g. python -m lab.study study_labels --variants conmim --seeds 0 --pretrain-only)"
        )
    if settings.threads:
        torch.set_num_threads(settings.threads)
    cfg = load_config(settings.preset, settings.base, command="finetune")
    train = fashion_mnist(cfg.data.path, "train")
    test = fashion_mnist(cfg.data.path, "test") if settings.test else None
    subsets, val = sweep_splits(settings, train)
    records = Path(settings.records)
    records.parent.mkdir(parents=True, exist_ok=True)
    done, rows = done_keys(records), []
    for trials in settings.fractions:
        if fractions and trials.fraction not in fractions:
            continue
        for passes in trials.passes:
            for position, recipe in enumerate(trials.recipes or settings.recipes):
                if recipes and position not in recipes:
                    continue
                overrides = trial_overrides(settings, trials, recipe)
                head_fit = head_fit_passes(settings, overrides)
                if trial_key(settings.start, settings.seed, trials.fraction, passes, overrides, head_fit) in done:
                    continue
                log.info("sweep: fraction %g, %d passes, %s", trials.fraction, passes, recipe or "base recipe")
                row = run_trial(settings, trials, passes, recipe, train, val, subsets[trials.fraction], test)
                with records.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", default="recipe_sweep", help="sweep YAML file or lab preset name")
    parser.add_argument("overrides", nargs="*", help="sweep.KEY=VALUE, e.g. sweep.start=runs/x/pretrain")
    parser.add_argument("--fractions", nargs="+", type=float, default=[], help="only these label fractions")
    parser.add_argument("--recipes", nargs="+", type=int, default=[], help="only the recipes at these positions")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        rows = run_sweep(args.config, args.overrides, args.fractions, args.recipes)
    except ConfigError as err:
        print(f"lab.sweep: error: {err}", file=sys.stderr)
        return 2
    for r in rows:
        print(f"fraction {r['fraction']:g} passes {r['passes']} {r['overrides']}: val top-1 {r['val_top1']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
