"""The small-scale study: ConMIM vs. scratch, pixel MIM and ablations (docs/method.md §14), on Fashion-MNIST.

One YAML file fixes the protocol: a ``study`` section (data subset sizes, seeds, the variants as
dotted overrides of the base configuration, which evaluations run) and a ``base`` section (an
ordinary :class:`conmim.config.Config`: model, schedule, fine-tune and probe recipes). Every
(variant, seed) runs in its own folder under ``study.output_dir``; a finished stage is recorded in
that folder's ``stages.json`` and skipped when the command is run again, and an interrupted
pre-training or fine-tuning resumes from its checkpoints, so the study can be stopped at any time.
Runs go seed by seed (all variants of the first seed, then the next seed), so a study cut short
still has every variant once.

With ``study.label_fractions`` the study measures label efficiency instead: every (variant, seed)
pre-trains once without labels on all of ``train_images``, then for each fraction of the labels
(a class-balanced subset drawn with the seed) a linear probe on cached features, a k-NN and, for
variants that fine-tune, a full fine-tuning, each its own resumable stage (``linprobe_f0.01``,
``finetune_f0.01``, ...); raw-pixel references (k-NN and the probe's linear head on normalised
pixels) run once per (fraction, seed) in ``reference_sSEED``. Fraction 1 runs for the first seed only.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import shutil
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from conmim.config import Config, ConfigError, validate, without_retired
from conmim.data.sources import ArraySource, fashion_mnist
from lab.provenance import commit, machine
from lab.report import REFERENCE, current_trials, write_report

log = logging.getLogger(__name__)
METRICS = ("finetune_top1", "linprobe_top1", "knn_top1")


@dataclass
class Variant:
    name: str
    overrides: list[str] = field(default_factory=list)  # dotted key=value on top of the base config
    seeds: list[int] = field(default_factory=list)  # empty: study.seeds
    pretrain: bool = True  # false: evaluate a randomly initialised encoder (scratch fine-tuning)
    finetune: bool = True  # false: k-NN and linear probe only for this variant
    label: str = ""  # legend text; empty: the name
    # a `conmim pretrain` run directory: its teacher encoder instead of pre-training here; "{seed}" in it
    # names one run per seed (e.g. runs/fashion_mnist_seed{seed}), else every seed shares the one run
    pretrained: str = ""
    fractions: list[float] = field(default_factory=list)  # label fractions run (empty: all of the study's)
    full_label_seeds: int = 0  # how many of its seeds run fraction 1 (0: study.full_label_seeds)
    # a lab.sweep records file of scratch trials in this variant's own encoder layout: its fine-tuning
    # recipe is chosen there instead of in study.recipe_sweep (empty: the study's)
    recipe_sweep: str = ""

    def pretrained_at(self, seed: int) -> str:
        return self.pretrained.replace("{seed}", str(seed))


@dataclass
class StudySettings:
    output_dir: str = "runs/study_cpu"
    records_dir: str = "lab/records/study"
    seeds: list[int] = field(default_factory=lambda: [0])
    train_images: int = 0  # fixed random subset of Fashion-MNIST train for every stage (0: all 60,000)
    test_images: int = 0  # fixed random subset of the test split (0: all 10,000)
    subset_seed: int = 0
    threads: int = 0  # torch intra-op threads (0: torch's default)
    knn: bool = True
    linprobe: bool = True
    finetune: bool = True
    variants: list[Variant] = field(default_factory=list)
    # Label-efficiency protocol (empty: the protocol above): fractions of the training labels, each a
    # class-balanced subset drawn with the seed; fractions below 1 for every seed, 1 for the first only.
    label_fractions: list[float] = field(default_factory=list)
    finetune_epochs: list[int] = field(default_factory=list)  # per fraction: passes over its labelled images
    probe_epochs: list[int] = field(default_factory=list)  # per fraction: linear-probe epochs
    fraction_overrides: list[list[str]] = field(default_factory=list)  # per fraction: dotted overrides
    finetune_evals: int = 1  # test evaluations per fine-tuning (the last one is the result); divides its epochs
    references: bool = True  # raw-pixel k-NN and linear probe at each fraction
    full_label_seeds: int = 1  # how many of a variant's seeds (the first ones) also run fraction 1
    # A lab.sweep records file: each fraction's recipe is then the best validation trial of `recipe_start`
    # at seed `recipe_seed` there (its overrides and passes), instead of fraction_overrides / finetune_epochs
    recipe_sweep: str = ""
    recipe_start: str = "random"
    recipe_seed: int = 0


PRESETS = Path(__file__).parent / "presets"


def lab_preset(name: str) -> Path:
    """The YAML file ``name``, else ``lab/presets/NAME.yaml``; the error lists the presets there."""
    if os.path.isfile(name):
        return Path(name)
    path = PRESETS / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in PRESETS.glob("*.yaml"))
        raise ConfigError(f"unknown study preset {name!r}; available: {', '.join(available)}")
    return path


def load_study(path: str | os.PathLike) -> tuple[StudySettings, Any]:
    """(typed study settings, the untyped ``base`` section); a preset name also works."""
    path = str(lab_preset(str(path)))
    try:
        raw = OmegaConf.load(path)
        unknown = set(raw.keys()) - {"study", "base"}
        if unknown:
            raise ConfigError(f"{path}: unknown top-level key(s) {sorted(unknown)}; allowed: study, base")
        study = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(StudySettings), raw.get("study", {})))
    except OmegaConfBaseException as err:
        raise ConfigError(f"bad study configuration {path}: {err}") from None
    if not study.variants:
        raise ConfigError(f"{path}: study.variants is empty")
    names = [v.name for v in study.variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: study.variants names repeat: {names}")
    base = without_retired(raw.get("base", OmegaConf.create({})))
    check_fractions(study, path)
    for v in study.variants:  # fail on a bad override before hours of work, not in the middle
        for seed in v.seeds or study.seeds:
            if v.pretrained and not os.path.exists(v.pretrained_at(seed)):
                raise ConfigError(f"{path}: variant {v.name!r}: pretrained={v.pretrained_at(seed)!r} does not exist")
        cfg = variant_config(base, v, (v.seeds or study.seeds)[0], Path(study.output_dir), Path(study.output_dir))
        for i, fraction in enumerate(study.label_fractions):
            if not recipe_records(study, v) or swept_recipe(study, fraction, v) is not None:
                fraction_config(cfg, study, i, v)
        if any(f not in study.label_fractions for f in v.fractions):
            raise ConfigError(f"{path}: variant {v.name!r}: fractions {v.fractions} not all in {study.label_fractions}")
    return study, base


def check_fractions(study: StudySettings, path: str) -> None:
    """The per-fraction lists have one entry per fraction (or none); fractions lie in (0, 1]."""
    fractions = study.label_fractions
    if len(set(fractions)) != len(fractions) or any(not 0 < f <= 1 for f in fractions):
        raise ConfigError(f"{path}: study.label_fractions={fractions}: distinct values in (0, 1] expected")
    for key in ("finetune_epochs", "probe_epochs", "fraction_overrides"):
        value = getattr(study, key)
        if value and len(value) != len(fractions):
            raise ConfigError(f"{path}: study.{key} has {len(value)} entries for {len(fractions)} label_fractions")
    if study.finetune_evals < 1 or any(e % study.finetune_evals for e in study.finetune_epochs):
        raise ConfigError(
            f"{path}: study.finetune_evals={study.finetune_evals} must divide every finetune_epochs "
            f"{study.finetune_epochs}"
        )


def fraction_tag(fraction: float) -> str:
    """Stage-name suffix of a fraction: 0.01 -> f0.01, 1.0 -> f1."""
    return f"f{fraction:g}"


def recipe_records(study: StudySettings, variant: Variant | None = None) -> str:
    """The recipe-sweep records that choose ``variant``'s fine-tuning recipe ("" when none do)."""
    return (variant.recipe_sweep if variant else "") or study.recipe_sweep


def swept_recipe(
    study: StudySettings, fraction: float, variant: Variant | None = None
) -> tuple[list[str], int, float] | None:
    """(overrides, passes, validation top-1) of the best trial of ``study.recipe_start`` at
    ``study.recipe_seed`` and ``fraction`` in :func:`recipe_records` (of its current trials); None while
    there is none."""
    path = Path(recipe_records(study, variant))
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    mine = [
        r
        for r in current_trials(rows)
        if r["start"] == study.recipe_start and r["seed"] == study.recipe_seed and r["fraction"] == fraction
    ]
    if not mine:
        return None
    best = max(mine, key=lambda r: r["val_top1"])
    return list(best["overrides"]), int(best["passes"]), float(best["val_top1"])


def fraction_config(
    cfg: Config, study: StudySettings, index: int, variant: Variant | None = None
) -> tuple[Config, int]:
    """(a copy of ``cfg`` for the fraction ``study.label_fractions[index]``, its fine-tuning passes): the
    fraction's overrides, probe epochs and passes (``variant``'s swept recipe, when the study sweeps).
    ``finetune.epochs`` and ``finetune.warmup_epochs`` are read in passes over the labelled images; the
    copy's ``finetune.epochs`` is ``finetune_evals``, each epoch being passes / finetune_evals passes
    over the labelled images (see :func:`tile`). A swept recipe's ``model.*`` overrides (the layout its
    scratch trials ran in) must agree with ``cfg``'s: a recipe swept in one layout is not another's."""
    overrides = list(study.fraction_overrides[index]) if study.fraction_overrides else []
    if study.probe_epochs:
        overrides.append(f"linprobe.epochs={study.probe_epochs[index]}")
    if study.finetune_epochs:
        overrides.append(f"finetune.epochs={study.finetune_epochs[index]}")
    if records := recipe_records(study, variant):
        swept = swept_recipe(study, study.label_fractions[index], variant)
        if swept is None:
            raise ConfigError(
                f"recipe sweep {records}: no trial of {study.recipe_start!r} at seed "
                f"{study.recipe_seed} and fraction {study.label_fractions[index]} yet (run lab.sweep first)"
            )
        _check_layout(cfg, swept[0], records, variant)
        overrides += [*swept[0], f"finetune.epochs={swept[1]}"]
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cfg), OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as err:
        raise ConfigError(f"study fraction {study.label_fractions[index]}: {err}") from None
    out: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(out)
    passes = out.finetune.epochs
    if passes % study.finetune_evals:
        raise ConfigError(
            f"study fraction {study.label_fractions[index]}: finetune.epochs={passes} is not a "
            f"multiple of study.finetune_evals={study.finetune_evals}"
        )
    out.finetune.epochs = study.finetune_evals
    out.finetune.warmup_epochs = out.finetune.warmup_epochs * study.finetune_evals / passes
    return out, passes


def _check_layout(cfg: Config, overrides: list[str], records: str, variant: Variant | None) -> None:
    """Every ``model.*`` override of a swept recipe holds in ``cfg`` already."""
    for override in overrides:
        key, _, value = override.partition("=")
        if not key.startswith("model."):
            continue
        have = OmegaConf.select(OmegaConf.structured(cfg), key)
        if str(have) != str(OmegaConf.select(OmegaConf.from_dotlist([override]), key)):
            name = variant.name if variant else "the study"
            raise ConfigError(
                f"{records}: its recipes were swept with {override}, but {name} has {key}={have}; "
                "give the variant a recipe_sweep run in its own layout"
            )


def balanced_subset(source: ArraySource, fraction: float, seed: int) -> np.ndarray:
    """Indices (sorted) of a class-balanced ``fraction`` of ``source``: round(fraction * N / classes) images
    of every class, drawn by ``seed``; fraction 1: every index. The subsets of one seed are nested."""
    if fraction >= 1:
        return np.arange(len(source))
    labels = np.asarray(source.labels)
    classes = np.unique(labels)
    per_class = max(1, round(fraction * len(labels) / len(classes)))
    rng = np.random.default_rng(seed)
    chosen = []
    for c in classes:
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise ConfigError(f"label fraction {fraction}: class {c} has {len(members)} images, {per_class} needed")
        chosen.append(members[rng.permutation(len(members))[:per_class]])
    return np.sort(np.concatenate(chosen))


def tile(source: ArraySource, indices: np.ndarray, times: int) -> ArraySource:
    """The images at ``indices``, repeated ``times`` over: one fine-tuning "epoch" of several passes."""
    order = np.tile(indices, times)
    return ArraySource(source.images[order], source.labels[order], source.classes)


def variant_config(base: Any, variant: Variant, seed: int, run_dir: Path, data_dir: Path) -> Config:
    """The full configuration of one (variant, seed): base, then the variant's overrides, then the run's paths."""
    run = [
        f"seed={seed}",
        f"output_dir={run_dir / 'pretrain'}",
        f"data.path={data_dir}",
        "data.source=fashion_mnist",
        "data.split=train",
        "resume=''",
    ]
    try:
        merged = OmegaConf.merge(
            OmegaConf.structured(Config), base, OmegaConf.from_dotlist(list(variant.overrides) + run)
        )
    except OmegaConfBaseException as err:
        raise ConfigError(f"study variant {variant.name!r}: {err}") from None
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(cfg)
    return cfg


def fixed_subset(source: ArraySource, count: int, seed: int) -> ArraySource:
    """``count`` images of ``source`` drawn once by ``seed`` (in index order); 0 or more than there are: all."""
    if not count or count >= len(source):
        return source
    order = np.random.default_rng(seed).permutation(len(source))[:count]
    order.sort()
    return ArraySource(source.images[order], source.labels[order], source.classes)


def write_idx(images: np.ndarray, labels: np.ndarray, folder: Path, prefix: str = "train") -> None:
    """Fashion-MNIST-layout IDX files, so the pre-training engine reads the subset like the real thing.
    Each file appears at once (written aside, then renamed; the aside name is the process's own), so parts
    of a study started together may all write them while others read."""
    folder.mkdir(parents=True, exist_ok=True)
    for kind, arr in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
        header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
        tmp = folder / f".{prefix}-{kind}.{os.getpid()}.tmp"
        tmp.write_bytes(header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes())
        os.replace(tmp, folder / f"{prefix}-{kind}")


def study_splits(study: StudySettings, fashion_root: str) -> tuple[ArraySource, ArraySource]:
    """The study's fixed train and test subsets of Fashion-MNIST."""
    return (
        fixed_subset(fashion_mnist(fashion_root, "train"), study.train_images, study.subset_seed),
        fixed_subset(fashion_mnist(fashion_root, "test"), study.test_images, study.subset_seed + 1),
    )


def prepare_data(study: StudySettings, fashion_root: str) -> tuple[ArraySource, ArraySource, Path]:
    """The fixed train/test subsets; the train subset is also written as IDX files for pre-training."""
    train, test = study_splits(study, fashion_root)
    data_dir = Path(study.output_dir) / "data"
    write_idx(train.images, train.labels, data_dir)
    return train, test, data_dir


def scratch_epochs(cfg: Config, train_images: int) -> int:
    """Fine-tuning epochs of a scratch run: its own epochs plus the pre-training's optimizer steps."""
    pre_steps = cfg.train.epochs * (train_images // cfg.train.batch_size)
    per_epoch = train_images // cfg.finetune.batch_size
    return cfg.finetune.epochs + math.ceil(pre_steps / per_epoch)


class Stages:
    """``stages.json`` of one run: each finished stage's result, its seconds and the machine it ran on (the
    parts of one run may run on different machines, and bf16 results differ between CPU kinds), written
    after every stage."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "stages.json"
        self.done: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def run(self, name: str, fn) -> Any:
        if name not in self.done:
            start = time.perf_counter()
            value = fn()
            seconds = round(time.perf_counter() - start, 1)
            self._save(name, {"result": value, "seconds": seconds, "machine": machine()})
        return self.done[name]["result"]

    def forget(self, name: str) -> None:
        """Drop a finished stage, so that the next ``run`` of it runs again."""
        self._save(name, None)

    def _save(self, name: str, entry: dict[str, Any] | None) -> None:
        """Write stage ``name`` (``None``: remove it). Parts of one run may go side by side (one process
        per label fraction): under a lock, merge with what the file holds now rather than overwrite the
        other processes' stages."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            on_disk = json.loads(self.path.read_text()) if self.path.is_file() else {}
            self.done = {**on_disk, **self.done, name: entry}
            if entry is None:
                del self.done[name]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.done, indent=2) + "\n")
            os.replace(tmp, self.path)


def _random_encoder(cfg: Config, seed: int) -> torch.nn.Module:
    """timm's own random initialisation of the encoder (what fine-tuning from scratch starts from)."""
    import timm

    from conmim.export.encoders import spec_of

    spec = spec_of(cfg)
    torch.manual_seed(seed)
    return timm.create_model(spec["model_name"], pretrained=False, **spec["kwargs"])


def study_encoder(variant: Variant, seed: int, cfg: Config, stages: Stages, run_dir: Path) -> torch.nn.Module:
    """The encoder of one (variant, seed): the teacher of ``variant.pretrained``, of a pre-training run
    here (a recorded stage), or timm's random initialisation."""
    from conmim.eval.knn import KnnMonitor
    from conmim.export.encoders import load_encoder
    from conmim.train.engine import pretrain

    if variant.pretrained:
        return load_encoder(variant.pretrained_at(seed), "teacher")
    if variant.pretrain:
        stages.run("pretrain", lambda: {"steps": pretrain(cfg, KnnMonitor.from_config)["steps"]})
        return load_encoder(run_dir / "pretrain", "teacher")
    return _random_encoder(cfg, seed)


def run_one(
    study: StudySettings, base: Any, variant: Variant, seed: int, train: ArraySource, test: ArraySource, data_dir: Path
) -> dict[str, Any]:
    """Pre-train (or not), then k-NN, linear probe and fine-tuning of one (variant, seed)."""
    from conmim.eval.common import EvalTransform, LabeledDataset
    from conmim.eval.finetune import finetune
    from conmim.eval.knn import extract_features, knn_accuracy
    from conmim.eval.linprobe import linear_probe
    from conmim.runtime.device import resolve_device

    run_dir = Path(study.output_dir) / f"{variant.name}_s{seed}"
    cfg = variant_config(base, variant, seed, run_dir, data_dir)
    device = resolve_device(cfg.device)
    stages = Stages(run_dir)
    if not variant.pretrain:
        cfg.finetune.epochs = scratch_epochs(cfg, len(train))
    encoder = study_encoder(variant, seed, cfg, stages, run_dir).to(device)

    def knn() -> float:
        e, d = cfg.eval, cfg.data
        transform = EvalTransform(cfg.model.img_size, d.mean, d.std)
        feats = [
            extract_features(encoder, LabeledDataset(src, transform), e.batch_size, e.pool, device, 0, f"k-NN {name}")
            for name, src in (("train", train), ("test", test))
        ]
        (tx, ty), (qx, qy) = feats
        return knn_accuracy(tx, ty, qx, qy, e.knn_k, e.knn_t)

    if study.knn:
        stages.run("knn", knn)
    if study.linprobe:
        stages.run("linprobe", lambda: linear_probe(encoder, train, test, cfg, device, run_dir / "linprobe"))
    if study.finetune and variant.finetune:
        stages.run(
            "finetune",
            lambda: {
                "epochs": cfg.finetune.epochs,
                **{
                    k: v
                    for k, v in finetune(encoder, train, test, cfg, run_dir / "finetune").items()
                    if isinstance(v, (int, float, str))
                },
            },
        )
    return record_of(variant.name, seed, stages.done)


def record_of(name: str, seed: int, done: dict[str, Any]) -> dict[str, Any]:
    """One row of the results: the three top-1 accuracies that exist, and each stage's seconds."""
    record: dict[str, Any] = {"variant": name, "seed": seed}
    if "knn" in done:
        record["knn_top1"] = done["knn"]["result"]
    if "linprobe" in done:
        record["linprobe_top1"] = done["linprobe"]["result"]["top1"]
    if "finetune" in done:
        record["finetune_top1"] = done["finetune"]["result"]["top1"]
        record["finetune_epochs"] = done["finetune"]["result"]["epochs"]
    record["seconds"] = {k: v["seconds"] for k, v in done.items()}
    return {**record, **_machines(done)}


def _machines(stages: dict[str, Any]) -> dict[str, Any]:
    """``{"machines": {stage: machine}}`` for the stages that name theirs (those recorded before stages named
    their machine do not); empty when none does."""
    named = {name: stage["machine"] for name, stage in stages.items() if "machine" in stage}
    return {"machines": named} if named else {}


def fractions_at(study: StudySettings, seeds: list[int], seed: int, variant: Variant | None = None) -> list[int]:
    """Indices of the label fractions run at ``seed``: those of the variant (default: all), fraction 1 only
    at the first ``study.full_label_seeds`` of ``seeds``."""
    full = seed in seeds[: (variant.full_label_seeds if variant else 0) or study.full_label_seeds]
    wanted = variant.fractions if variant and variant.fractions else study.label_fractions
    return [i for i, f in enumerate(study.label_fractions) if f in wanted and (f < 1 or full)]


def _stage_names(study: StudySettings, finetunes: bool, fraction: float) -> list[str]:
    tag = fraction_tag(fraction)
    return [
        f"{kind}_{tag}"
        for kind, on in (("linprobe", study.linprobe), ("knn", study.knn), ("finetune", study.finetune and finetunes))
        if on
    ]


class _Features:
    """Features of the fixed test split (extracted once) and of labelled subsets of train, on demand."""

    def __init__(self, extract, train: ArraySource, test: ArraySource):
        self.extract, self.train, self.test = extract, train, test
        self._test: tuple[torch.Tensor, torch.Tensor] | None = None
        self._subset: tuple[bytes, tuple[torch.Tensor, torch.Tensor]] | None = None

    def of_test(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._test is None:
            self._test = self.extract(self.test, None, "test")
        return self._test

    def of_subset(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        key = indices.tobytes()
        if self._subset is None or self._subset[0] != key:  # the last subset only: probe and k-NN share it
            self._subset = (key, self.extract(self.train, indices, f"{len(indices)} labelled"))
        return self._subset[1]


def _probe_and_knn(
    stages: Stages,
    study: StudySettings,
    features: _Features,
    fcfg: Config,
    indices: np.ndarray,
    tag: str,
    seed: int,
    device: torch.device,
) -> None:
    """The ``linprobe_TAG`` and ``knn_TAG`` stages on the features of the labelled subset ``indices``
    (for encoders: ``linprobe.pool`` / ``linprobe.block`` features for both; the k-NN bank is the subset)."""
    from conmim.eval.knn import knn_accuracy
    from conmim.eval.linprobe import probe_cached

    def probe() -> dict[str, Any]:
        (tx, ty), (qx, qy) = features.of_subset(indices), features.of_test()
        top1 = probe_cached(tx, ty, qx, qy, int(max(ty.max(), qy.max())) + 1, fcfg.linprobe, device, seed)
        return {"top1": top1, "epochs": fcfg.linprobe.epochs, "labels": len(indices), "feature_dim": tx.shape[1]}

    def knn() -> dict[str, Any]:
        (tx, ty), (qx, qy) = features.of_subset(indices), features.of_test()
        return {
            "top1": knn_accuracy(tx, ty, qx, qy, fcfg.eval.knn_k, fcfg.eval.knn_t),
            "k": fcfg.eval.knn_k,
            "labels": len(indices),
        }

    if study.linprobe:
        stages.run(f"linprobe_{tag}", probe)
    if study.knn:
        stages.run(f"knn_{tag}", knn)


def run_fractions(
    study: StudySettings,
    base: Any,
    variant: Variant,
    seed: int,
    seeds: list[int],
    train: ArraySource,
    test: ArraySource,
    data_dir: Path,
    only: Selection | None = None,
) -> list[dict[str, Any]]:
    """Label-efficiency protocol of one (variant, seed): the encoder once, then per label fraction a
    linear probe and a k-NN on cached features and, for variants that fine-tune, a fine-tuning."""
    from conmim.eval.common import EvalTransform, LabeledDataset
    from conmim.eval.finetune import finetune
    from conmim.eval.knn import extract_features
    from conmim.runtime.device import resolve_device, resolve_precision

    run_dir = Path(study.output_dir) / f"{variant.name}_s{seed}"
    cfg = variant_config(base, variant, seed, run_dir, data_dir)
    device = resolve_device(cfg.device)
    stages = Stages(run_dir)
    todo = [
        i
        for i in fractions_at(study, seeds, seed, variant)
        if only is None or not only.fractions or study.label_fractions[i] in only.fractions
    ]
    if pretraining_alone(only):  # no fine-tuning recipe needed (the sweep may not have it yet)
        study_encoder(variant, seed, cfg, stages, run_dir)
        return []
    names = [n for i in todo for n in _stage_names(study, variant.finetune, study.label_fractions[i])]
    configs = {i: fraction_config(cfg, study, i, variant) for i in todo}
    recipes = {i: finetune_recipe(*configs[i]) for i in todo}
    for i in todo if variant.finetune else []:
        _supersede_stale(study, stages, variant.name, seed, study.label_fractions[i], recipes[i])
    if all(n in stages.done for n in names):
        return fraction_records(variant.name, seed, stages.done, study.label_fractions)
    encoder = study_encoder(variant, seed, cfg, stages, run_dir).to(device)
    p, d = cfg.linprobe, cfg.data
    transform = EvalTransform(cfg.model.img_size, d.mean, d.std)
    amp_dtype = resolve_precision(cfg.precision, device)

    def extract(source: ArraySource, indices: np.ndarray | None, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        dataset = LabeledDataset(source, transform, None if indices is None else indices.tolist())
        return extract_features(
            encoder,
            dataset,
            cfg.eval.batch_size,
            p.pool,
            device,
            d.num_workers,
            f"{variant.name} s{seed} {what} features",
            p.block,
            amp_dtype,
        )

    features = _Features(extract, train, test)
    for i in todo:
        fraction, tag = study.label_fractions[i], fraction_tag(study.label_fractions[i])
        (fcfg, passes), recipe = configs[i], recipes[i]
        indices = balanced_subset(train, fraction, seed)
        log.info("study: %s seed %d, %d labels (%s)", variant.name, seed, len(indices), tag)
        _probe_and_knn(stages, study, features, fcfg, indices, tag, seed, device)
        if study.finetune and variant.finetune:
            tiles = passes // study.finetune_evals

            def tune(fcfg=fcfg, indices=indices, tiles=tiles, passes=passes, tag=tag, recipe=recipe) -> dict[str, Any]:
                result = finetune(
                    encoder,
                    tile(train, indices, tiles),
                    test,
                    fcfg,
                    run_dir / f"finetune_{tag}",
                    head_images=tile(train, indices, 1),
                )
                (run_dir / f"finetune_{tag}" / "checkpoints" / "last.pt").unlink(missing_ok=True)  # finished
                steps = fcfg.finetune.epochs * (len(indices) * tiles // fcfg.finetune.batch_size)
                return {
                    "top1": result["top1"],
                    "top5": result["top5"],
                    "best_top1": result["best_top1"],
                    "history_top1": [h["top1"] for h in result["history"]],
                    "passes": passes,
                    "steps": steps,
                    "batch_size": fcfg.finetune.batch_size,
                    "labels": len(indices),
                    "recipe": recipe,
                }

            stages.run(f"finetune_{tag}", tune)
    return fraction_records(variant.name, seed, stages.done, study.label_fractions)


def finetune_recipe(fcfg: Config, passes: int) -> dict[str, Any]:
    """What a fine-tuning stage records as its recipe, and is compared by: the ``finetune`` section, its
    passes over the labelled images and its head fit's (a stage recorded without ``head_fit_passes`` fitted
    the head for ``probe_head_epochs`` tiled epochs, so it runs again)."""
    section = OmegaConf.to_container(OmegaConf.structured(fcfg.finetune))
    return {**section, "passes": passes, "head_fit_passes": fcfg.finetune.probe_head_epochs}


def _supersede_stale(
    study: StudySettings, stages: Stages, variant: str, seed: int, fraction: float, recipe: dict[str, Any]
) -> None:
    """A finished fine-tuning stage that ran with another recipe than the study asks for now (a recipe
    sweep that later chose another) runs again: no result of the old recipe may stay in the table. Its
    row goes to ``superseded.json`` (``keep_superseded``), its result leaves ``stages.json`` and its folder
    moves to ``NAME.superseded`` (replacing an older one)."""
    name = f"finetune_{fraction_tag(fraction)}"
    done = stages.done.get(name, {}).get("result", {}).get("recipe")
    if done is None or done == recipe:
        return
    changed = sorted(k for k in recipe.keys() | done.keys() if recipe.get(k) != done.get(k))
    folder = stages.path.parent / name
    old = folder.with_name(f"{name}.superseded")
    log.warning(
        "%s: stage %s ran with another fine-tuning recipe (differs in %s); it runs again (the old run: %s)",
        stages.path,
        name,
        ", ".join(changed),
        old,
    )
    keep_superseded(study, fraction_records(variant, seed, {name: stages.done[name]}, [fraction]))
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    stages.forget(name)


def run_references(
    study: StudySettings, base: Any, seed: int, seeds: list[int], train: ArraySource, test: ArraySource, data_dir: Path
) -> list[dict[str, Any]]:
    """Raw-pixel reference lines at each label fraction of ``seed``: k-NN (eval.knn_k, cosine) and the
    linear probe's head (BatchNorm + linear) on flattened normalised pixels, as stages of ``reference_sSEED``."""
    from conmim.eval.common import EvalTransform
    from conmim.runtime.device import resolve_device

    run_dir = Path(study.output_dir) / f"reference_s{seed}"
    cfg = variant_config(base, Variant(REFERENCE), seed, run_dir, data_dir)
    device = resolve_device(cfg.device)
    stages = Stages(run_dir)
    transform = EvalTransform(cfg.model.img_size, cfg.data.mean, cfg.data.std)

    def extract(source: ArraySource, indices: np.ndarray | None, _what: str) -> tuple[torch.Tensor, torch.Tensor]:
        order = range(len(source)) if indices is None else indices.tolist()
        feats = torch.stack([transform(source[i][0]).flatten() for i in order])
        return feats, torch.as_tensor(np.asarray(source.labels)[list(order)].astype("int64"))

    features = _Features(extract, train, test)
    for i in fractions_at(study, seeds, seed):
        fcfg, _passes = fraction_config(cfg, study, i)  # the study's: raw pixels fine-tune nothing
        _probe_and_knn(
            stages,
            study,
            features,
            fcfg,
            balanced_subset(train, study.label_fractions[i], seed),
            fraction_tag(study.label_fractions[i]),
            seed,
            device,
        )
    return fraction_records(REFERENCE, seed, stages.done, study.label_fractions)


def fraction_records(name: str, seed: int, done: dict[str, Any], fractions: list[float]) -> list[dict[str, Any]]:
    """One row per label fraction with a finished stage: its top-1 accuracies, labels, steps and seconds."""
    records = []
    for fraction in fractions:
        tag = fraction_tag(fraction)
        mine = {kind: done[f"{kind}_{tag}"] for kind in ("linprobe", "knn", "finetune") if f"{kind}_{tag}" in done}
        if not mine:
            continue
        record: dict[str, Any] = {
            "variant": name,
            "seed": seed,
            "fraction": fraction,
            "labels": next(iter(mine.values()))["result"]["labels"],
        }
        for kind, stage in mine.items():
            record[f"{kind}_top1"] = stage["result"]["top1"]
        if "finetune" in mine:
            record["finetune_steps"] = mine["finetune"]["result"]["steps"]
            record["finetune_recipe"] = mine["finetune"]["result"]["recipe"]
        record["seconds"] = {kind: stage["seconds"] for kind, stage in mine.items()}
        if "pretrain" in done:
            record["seconds"]["pretrain"] = done["pretrain"]["seconds"]
        record.update(_machines({"pretrain": done.get("pretrain", {}), **mine}))
        records.append(record)
    return records


def plan(study: StudySettings) -> list[tuple[Variant, int]]:
    """Seed by seed: every variant's first seed, then every variant's second seed, ..."""
    seeds = [v.seeds or study.seeds for v in study.variants]
    order = []
    for position in range(max(len(s) for s in seeds)):
        order += [(v, s[position]) for v, s in zip(study.variants, seeds, strict=True) if position < len(s)]
    return order


def _fraction_study(
    study: StudySettings, base: Any, root: str, report_only: bool, only: Selection | None = None
) -> list[dict[str, Any]]:
    """Every stage of the label-efficiency protocol, seed by seed (references first); the rows of the results.
    ``only``: just these variants / seeds (and, with ``pretrain_only``, just their pre-training)."""
    out, records = Path(study.output_dir), []
    order = [(v, s) for v, s in plan(study) if only is None or only.wants(v.name, s)]
    reference_seeds = list(dict.fromkeys(seed for _v, seed in order))
    if not report_only:
        train, test, data_dir = prepare_data(study, root)
    for variant, seed in order:
        seeds = variant.seeds or study.seeds
        if study.references and seed in reference_seeds and not pretraining_alone(only):
            reference_seeds.remove(seed)
            if report_only:
                records += fraction_records(
                    REFERENCE, seed, Stages(out / f"reference_s{seed}").done, study.label_fractions
                )
            else:
                log.info("study: raw-pixel references, seed %d", seed)
                records += run_references(study, base, seed, [order[0][1]], train, test, data_dir)
        if report_only:
            records += fraction_records(
                variant.name, seed, Stages(out / f"{variant.name}_s{seed}").done, study.label_fractions
            )
        else:
            log.info("study: %s seed %d", variant.name, seed)
            records += run_fractions(study, base, variant, seed, seeds, train, test, data_dir, only)
    return records


def recorded_runs(
    study: StudySettings, records: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows of the last report (``records_dir/results.json``) of the study's (variant, seed)s: (those that
    no run folder here holds any more, those that one does). The records outlive the runs, so a report
    written on a new machine keeps what ran on the old one; a row a run folder holds again may be a
    fine-tuning of an older recipe that the run folder's rerun replaces."""
    path = Path(study.records_dir) / "results.json"
    if not path.is_file():
        return [], []
    here = {(r["variant"], r["seed"], r["fraction"]) for r in records}
    wanted = {(v.name, s) for v, s in plan(study)} | {(REFERENCE, s) for s in study.seeds}
    rows = [r for r in json.loads(path.read_text())["runs"] if (r["variant"], r["seed"]) in wanted]
    gone = [r for r in rows if (r["variant"], r["seed"], r["fraction"]) not in here]
    return gone, [r for r in rows if (r["variant"], r["seed"], r["fraction"]) in here]


def without_stale(
    study: StudySettings, base: Any, records: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows, where a fine-tuning ran with another recipe than the study asks for now (the sweep has
    since chosen another) keeping their probe and k-NN only: a report shows no result of an old recipe.
    Also returns those rows whole, for ``keep_superseded``."""
    variants = {v.name: v for v in study.variants}
    kept, stale = [], []
    for r in records:
        if "finetune_recipe" in r and r["finetune_recipe"] != _recipe_now(study, base, variants[r["variant"]], r):
            stale.append(r)
            r = {k: v for k, v in r.items() if not k.startswith("finetune_")}
            for key in ("seconds", "machines"):
                if key in r:
                    r[key] = {k: v for k, v in r[key].items() if k != "finetune"}
        kept.append(r)
    return kept, stale


SUPERSEDED_NOTE = (
    "fine-tunings under recipes the sweep later replaced, as the report held them before dropping them; "
    "from_commit: the commit whose report still held the row (or at which it was dropped)"
)


def keep_superseded(study: StudySettings, stale: list[dict[str, Any]]) -> None:
    """Append the fine-tunings a report drops (their recipe since replaced) to ``records_dir/superseded.json``,
    once each: the results page compares the recipes, and a dropped row is otherwise lost with its run folder."""
    path = Path(study.records_dir) / "superseded.json"
    held = json.loads(path.read_text()) if path.is_file() else {"note": SUPERSEDED_NOTE, "runs": []}

    def key(r: dict[str, Any]) -> str:
        return json.dumps([r["variant"], r["seed"], r["fraction"], r["finetune_recipe"]], sort_keys=True)

    seen = {key(r) for r in held["runs"]}
    fields = ("variant", "seed", "fraction", "labels")
    new = [
        {
            **{k: r[k] for k in fields},
            **{k: v for k, v in r.items() if k.startswith("finetune_")},
            "from_commit": commit(),
        }
        for r in stale
        if key(r) not in seen
    ]
    if new:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**held, "runs": held["runs"] + new}, indent=2) + "\n")


def _recipe_now(study: StudySettings, base: Any, variant: Variant, row: dict[str, Any]) -> dict[str, Any] | None:
    """The fine-tuning recipe the study asks for now at the row's seed and fraction; None while the
    sweep has none there."""
    index = study.label_fractions.index(row["fraction"])
    if recipe_records(study, variant) and swept_recipe(study, row["fraction"], variant) is None:
        return None
    out = Path(study.output_dir)
    cfg = variant_config(base, variant, row["seed"], out, out)
    return finetune_recipe(*fraction_config(cfg, study, index, variant))


def not_run(study: StudySettings, records: list[dict[str, Any]]) -> list[tuple[str, int, float]]:
    """(variant, seed, fraction) of the protocol with no finished record yet (for a variant that
    fine-tunes, none with a fine-tuning result)."""
    tuned = {v.name for v in study.variants if v.finetune and study.finetune}
    done = {
        (r["variant"], r["seed"], r["fraction"]) for r in records if r["variant"] not in tuned or "finetune_top1" in r
    }
    return [
        (v.name, s, study.label_fractions[i])
        for v in study.variants
        for s in (v.seeds or study.seeds)
        for i in fractions_at(study, v.seeds or study.seeds, s, v)
        if (v.name, s, study.label_fractions[i]) not in done
    ]


@dataclass
class Selection:
    """A part of a study, for running parts side by side (e.g. one process per variant on one GPU)."""

    variants: list[str] = field(default_factory=list)  # empty: all
    seeds: list[int] = field(default_factory=list)  # empty: all
    pretrain_only: bool = False
    fractions: list[float] = field(default_factory=list)  # label fractions (empty: all)

    def wants(self, variant: str, seed: int) -> bool:
        return (not self.variants or variant in self.variants) and (not self.seeds or seed in self.seeds)


def pretraining_alone(only: Selection | None) -> bool:
    """Whether the part asks for pre-training alone: then no fine-tuning recipe, fine-tuning or reference runs."""
    return only is not None and only.pretrain_only


def run_study(
    path: str | os.PathLike,
    fashion_root: str | None = None,
    report_only: bool = False,
    only: Selection | None = None,
    threads: int = 0,
) -> dict:
    """Run (or continue) every (variant, seed) of a study, then write the report; returns the summary.
    With ``only`` just that part runs and no report is written (``--report-only`` writes it later).
    ``threads`` (when not 0) replaces study.threads: e.g. one long part alone on the whole machine."""
    study, base = load_study(path)
    study.threads = threads or study.threads
    if study.threads:
        torch.set_num_threads(study.threads)
    root = fashion_root or OmegaConf.select(base, "data.path", default=None) or Config().data.path
    out = Path(study.output_dir)
    records, start = [], time.perf_counter()
    if only is not None:
        unknown = set(only.variants) - {v.name for v in study.variants}
        if unknown:
            names = [v.name for v in study.variants]
            raise ConfigError(f"{path}: no variant(s) {sorted(unknown)}; the study has {names}")
        if not study.label_fractions:
            raise ConfigError(f"{path}: --variants / --seeds / --pretrain-only need study.label_fractions")
        records = _fraction_study(study, base, root, report_only, only)
        return {"runs": records, "study": {"records_dir": "(no report: a part of the study)"}}
    if study.label_fractions:
        records = _fraction_study(study, base, root, report_only)
        if report_only:
            gone, shadowed = recorded_runs(study, records)
            records, stale = without_stale(study, base, records + gone)
            keep_superseded(study, stale + without_stale(study, base, shadowed)[1])
    elif not report_only:
        train, test, data_dir = prepare_data(study, root)
        for variant, seed in plan(study):
            log.info("study: %s seed %d", variant.name, seed)
            records.append(run_one(study, base, variant, seed, train, test, data_dir))
    else:
        for variant, seed in plan(study):
            stages = Stages(out / f"{variant.name}_s{seed}")
            if stages.done:
                records.append(record_of(variant.name, seed, stages.done))
    here = {**machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    summary = {
        "config": str(path),
        "study": OmegaConf.to_container(OmegaConf.structured(study)),
        "base": OmegaConf.to_container(base),
        "machine": here,  # the report's; each row's "machines" names where its stages ran
        "runs": records,
        "not_run": not_run(study, records) if study.label_fractions else [],
        "this_invocation_seconds": round(time.perf_counter() - start, 1),
    }
    write_report(summary, study, out)
    return summary


def main(argv: list[str] | None = None) -> int:
    """``python -m lab.study [CONFIG] [--report-only]``, from the repository root."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m lab.study",
        description="ConMIM vs. scratch, pixel MIM and ablations, as fixed by a study YAML (lab/presets/): "
        "study_labels (pre-train without labels, then fine-tune and probe on 1 %, 10 % and 100 % of the labels) "
        "or study_cpu (a subset, with the ablations). Running it again skips finished stages and resumes "
        "unfinished ones.",
    )
    parser.add_argument("config", nargs="?", default="study_labels", help="study YAML file or lab preset name")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the report from finished stages")
    parser.add_argument("--variants", nargs="+", default=[], help="run only these variants (no report)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[], help="run only these seeds (no report)")
    parser.add_argument("--pretrain-only", action="store_true", help="only the pre-training stage (no report)")
    parser.add_argument("--fractions", nargs="+", type=float, default=[], help="only these label fractions")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads for this invocation (default: study.threads)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    part = args.variants or args.seeds or args.pretrain_only or args.fractions
    only = Selection(args.variants, args.seeds, args.pretrain_only, args.fractions)
    only = only if part and not args.report_only else None
    try:
        summary = run_study(args.config, report_only=args.report_only, only=only, threads=args.threads)
    except ConfigError as err:
        print(f"lab.study: error: {err}", file=sys.stderr)
        return 2
    print(f"{len(summary['runs'])} run(s) reported in {summary['study']['records_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
