"""The small-scale study: ConMIM vs. scratch, pixel MIM and the ablations of docs/method.md §14.

One YAML file fixes the protocol: a ``study`` section (data subset sizes, seeds, the variants as
dotted overrides of the base configuration, which evaluations run) and a ``base`` section (an
ordinary :class:`conmim.config.Config`: model, schedule, fine-tune and probe recipes). Every
(variant, seed) runs in its own folder under ``study.output_dir``; a finished stage is recorded in
that folder's ``stages.json`` and skipped when the command is run again, and an interrupted
pre-training or fine-tuning resumes from its checkpoints, so the study can be stopped at any time.
Runs go seed by seed (all variants of the first seed, then the next seed), so a study cut short
still has every variant once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..config import Config, ConfigError, preset_path, validate
from ..data.sources import ArraySource, fashion_mnist

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


@dataclass
class StudySettings:
    output_dir: str = "runs/study_cpu"
    docs_dir: str = "docs/study"
    seeds: list[int] = field(default_factory=lambda: [0])
    train_images: int = 0  # fixed random subset of Fashion-MNIST train for every stage (0: all 60,000)
    test_images: int = 0  # fixed random subset of the test split (0: all 10,000)
    subset_seed: int = 0
    threads: int = 0  # torch intra-op threads (0: torch's default)
    knn: bool = True
    linprobe: bool = True
    finetune: bool = True
    variants: list[Variant] = field(default_factory=list)


def load_study(path: str | os.PathLike) -> tuple[StudySettings, Any]:
    """(typed study settings, the untyped ``base`` section); a preset name also works."""
    path = str(path)
    if not os.path.isfile(path):
        path = str(preset_path(path))
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
    base = raw.get("base", OmegaConf.create({}))
    for v in study.variants:  # fail on a bad override before hours of work, not in the middle
        variant_config(base, v, (v.seeds or study.seeds)[0], Path(study.output_dir), Path(study.output_dir))
    return study, base


def variant_config(base: Any, variant: Variant, seed: int, run_dir: Path, data_dir: Path) -> Config:
    """The full configuration of one (variant, seed): base, then the variant's overrides, then the run's paths."""
    run = [
        f"train.seed={seed}",
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
    """Fashion-MNIST-layout IDX files, so the pre-training engine reads the subset like the real thing."""
    folder.mkdir(parents=True, exist_ok=True)
    for kind, arr in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
        header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
        tmp = folder / f".{prefix}-{kind}.tmp"
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
    """``stages.json`` of one run: each finished stage's result, written after every stage."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "stages.json"
        self.done: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def run(self, name: str, fn) -> Any:
        if name not in self.done:
            start = time.perf_counter()
            value = fn()
            self.done[name] = {"result": value, "seconds": round(time.perf_counter() - start, 1)}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.done, indent=2) + "\n")
            os.replace(tmp, self.path)
        return self.done[name]["result"]


def _random_encoder(cfg: Config, seed: int) -> torch.nn.Module:
    """timm's own random initialisation of the encoder (what fine-tuning from scratch starts from)."""
    import timm

    from ..export.encoders import spec_of

    spec = spec_of(cfg)
    torch.manual_seed(seed)
    return timm.create_model(spec["model_name"], pretrained=False, **spec["kwargs"])


def run_one(
    study: StudySettings, base: Any, variant: Variant, seed: int, train: ArraySource, test: ArraySource, data_dir: Path
) -> dict[str, Any]:
    """Pre-train (or not), then k-NN, linear probe and fine-tuning of one (variant, seed)."""
    from ..eval.common import EvalTransform, LabeledDataset
    from ..eval.finetune import finetune
    from ..eval.knn import KnnMonitor, extract_features, knn_accuracy
    from ..eval.linprobe import linear_probe
    from ..export.encoders import load_encoder
    from ..runtime.device import resolve_device
    from ..train.engine import pretrain

    run_dir = Path(study.output_dir) / f"{variant.name}_s{seed}"
    cfg = variant_config(base, variant, seed, run_dir, data_dir)
    device = resolve_device(cfg.device)
    stages = Stages(run_dir)
    if variant.pretrain:
        stages.run("pretrain", lambda: {"steps": pretrain(cfg, KnnMonitor.from_config)["steps"]})
        encoder = load_encoder(run_dir / "pretrain", "teacher").to(device)
    else:
        cfg.finetune.epochs = scratch_epochs(cfg, len(train))
        encoder = _random_encoder(cfg, seed).to(device)

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
    return record


def plan(study: StudySettings) -> list[tuple[Variant, int]]:
    """Seed by seed: every variant's first seed, then every variant's second seed, ..."""
    seeds = [v.seeds or study.seeds for v in study.variants]
    order = []
    for position in range(max(len(s) for s in seeds)):
        order += [(v, s[position]) for v, s in zip(study.variants, seeds, strict=True) if position < len(s)]
    return order


def run_study(path: str | os.PathLike, fashion_root: str | None = None, report_only: bool = False) -> dict:
    """Run (or continue) every (variant, seed) of a study, then write the report; returns the summary."""
    from .report import write_report

    study, base = load_study(path)
    if study.threads:
        torch.set_num_threads(study.threads)
    root = fashion_root or OmegaConf.select(base, "data.path", default=None) or Config().data.path
    out = Path(study.output_dir)
    records, start = [], time.perf_counter()
    if not report_only:
        train, test, data_dir = prepare_data(study, root)
        for variant, seed in plan(study):
            log.info("study: %s seed %d", variant.name, seed)
            records.append(run_one(study, base, variant, seed, train, test, data_dir))
    else:
        for variant, seed in plan(study):
            stages = Stages(out / f"{variant.name}_s{seed}")
            if stages.done:
                records.append(record_of(variant.name, seed, stages.done))
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    summary = {
        "config": str(path),
        "study": OmegaConf.to_container(OmegaConf.structured(study)),
        "base": OmegaConf.to_container(base),
        "machine": machine,
        "runs": records,
        "this_invocation_seconds": round(time.perf_counter() - start, 1),
    }
    write_report(summary, study, out)
    return summary
