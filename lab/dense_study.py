"""Dense transfer in domain: pre-train on the built-in scenes without labels, segment and detect with few labels.

    python -m lab.dense_study [dense_scenes] [--sweep | --curve | --detect-sweep | --detect | --report-only]

Every step is an ordinary ``conmim`` command run as a subprocess (``conmim pretrain --config scenes``,
``conmim segment``, ``conmim detect``), its output folder under ``study.output_dir``, its log beside it. A finished
command appends one JSON line to ``records_dir`` (``runs.jsonl``, or ``sweep.jsonl`` for the recipe
sweep) holding the command, its result, the seconds, the machine and the commit; a command already in
the records is skipped, an interrupted one resumes from its own checkpoints when run again. The
labelled subsets are the first N training scenes (scene i is a pure function of the scenes' seed),
linked into folders that ``conmim segment`` reads as its own data (for ``conmim detect``: a COCO file of
those scenes); the tables are scored on the 200 validation scenes, whose garments come from
Fashion-MNIST's test split. The sweeps score on training scenes that no labelled subset holds, so the
validation scenes never choose a recipe.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from conmim.config import load_config
from lab.provenance import commit, machine
from lab.report import keep_pretraining
from lab.study import lab_preset

log = logging.getLogger("lab.dense_study")


@dataclass
class Sweep:
    labelled: int = 200
    holdout: list[int] = field(default_factory=lambda: [19800, 20000])
    recipes: list[list[str]] = field(default_factory=list)  # from scratch
    pretrained: list[list[str]] = field(default_factory=list)  # from each variant's first-seed pre-training
    # --curve: every start with this recipe (a longer one, evaluated along the way) on the same scenes
    curve: list[str] = field(default_factory=list)


@dataclass
class Detection:
    """``conmim detect`` (box AP): trained on the first ``labelled`` training scenes with ``recipe``;
    ``sweep``: the scratch recipes tried first, ``pretrained``: recipes tried from each variant's
    first-seed pre-training, all scored on the segmentation sweep's held-out scenes."""

    labelled: int = 2000
    recipe: list[str] = field(default_factory=list)
    sweep: list[list[str]] = field(default_factory=list)
    pretrained: list[list[str]] = field(default_factory=list)


@dataclass
class DenseStudy:
    output_dir: str = "runs/dense_study"
    records_dir: str = "lab/records/dense_study"
    threads: int = 1
    pretrain_preset: str = "scenes"
    pretrain_overrides: list[str] = field(default_factory=list)  # on every pre-training (and the scenes)
    variants: list[dict[str, Any]] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    labelled: list[int] = field(default_factory=lambda: [200, 2000])
    segment_preset: str = "segment_cpu"
    recipe: list[str] = field(default_factory=list)
    linear: list[str] = field(default_factory=list)
    sweep: Sweep = field(default_factory=Sweep)
    detect: Detection = field(default_factory=Detection)


def load(name: str) -> DenseStudy:
    merged = OmegaConf.merge(OmegaConf.structured(DenseStudy), OmegaConf.load(lab_preset(name))["study"])
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


class Records:
    """One JSON line per finished command, keyed by the command's arguments."""

    def __init__(self, path: Path):
        self.path = path
        lines = path.read_text().splitlines() if path.is_file() else []
        self.rows = {row["key"]: row for row in map(json.loads, lines)}

    def add(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.rows[row["key"]] = row


def conmim(args: list[str], out: Path, threads: int) -> float:
    """Run ``conmim ARGS`` (its log in ``out.log``); the seconds it took. A failure stops the study."""
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    with open(f"{out}.log", "a") as logfile:
        done = subprocess.run([sys.executable, "-m", "conmim.cli", *args], stdout=logfile, stderr=logfile, env=env)
    if done.returncode != 0:
        raise SystemExit(f"lab.dense_study: `conmim {' '.join(args)}` failed ({done.returncode}); see {out}.log")
    return round(time.perf_counter() - start, 1)


def scenes_config(study: DenseStudy):
    """The ``scenes`` section of the pre-trainings: the scenes every command of the study reads."""
    return load_config(study.pretrain_preset, study.pretrain_overrides, command="pretrain").scenes


def linked_scenes(study: DenseStudy, name: str, split: str, indices: range) -> tuple[Path, Path]:
    """Folders ``images`` and ``masks`` of links to scenes ``indices`` of ``split`` (the scenes made first)."""
    root = Path(scenes_config(study).dir).resolve()
    folder = Path(study.output_dir) / "data" / name
    for kind, source in (("images", "images"), ("masks", "annotations")):
        (folder / kind).mkdir(parents=True, exist_ok=True)
        for i in indices:
            link = folder / kind / f"scene_{i:05d}.png"
            if not link.is_symlink():
                link.symlink_to(root / source / split / link.name)
    return folder / "images", folder / "masks"


def coco_scenes(study: DenseStudy, name: str, split: str, indices: range) -> tuple[Path, Path]:
    """The images folder and a COCO instances file of scenes ``indices`` of ``split`` (cut from the
    scenes' own ``coco/instances_{split}.json``), for ``conmim detect``'s ``train_*`` / ``val_*``."""
    root = Path(scenes_config(study).dir)  # as given (relative: the records' commands hold no machine's paths)
    path = Path(study.output_dir) / "data" / f"coco_{name}.json"
    if not path.is_file():
        coco = json.loads((root / "coco" / f"instances_{split}.json").read_text())
        wanted = {f"{split}/scene_{i:05d}.png" for i in indices}
        images = [image for image in coco["images"] if image["file_name"] in wanted]
        if len(images) != len(indices):
            raise SystemExit(
                f"lab.dense_study: {root} holds {len(images)} of the {len(indices)} {split} scenes {indices}"
            )
        ids = {image["id"] for image in images}
        coco.update(images=images, annotations=[a for a in coco["annotations"] if a["image_id"] in ids])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # starts may run side by side: whole files only
        tmp.write_text(json.dumps(coco))
        os.replace(tmp, path)
    return root / "images", path


def pretrain(study: DenseStudy, variant: dict[str, Any], seed: int, records: Records) -> Path:
    """A variant's pre-training: on the scenes (``study.pretrain_preset``), or with the variant's own
    ``preset`` (out of domain, e.g. ``fashion_mnist``), which then takes no ``pretrain_overrides``."""
    out = Path(study.output_dir) / f"{variant['name']}_s{seed}" / "pretrain"
    preset = variant.get("preset", study.pretrain_preset)
    args = ["pretrain", "--config", preset, f"seed={seed}", f"output_dir={out}"]
    args += [*(study.pretrain_overrides if preset == study.pretrain_preset else []), *variant["overrides"]]
    key = json.dumps(args)
    if key in records.rows and (out / "checkpoints" / "last.pt").is_file():
        return out
    log.info("pre-training %s seed %d", variant["name"], seed)
    seconds = conmim(args, out, study.threads)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    if key in records.rows:  # recorded on another machine, its run folder absent here: made again from its seed
        # the same loss where the machine computes as the recorded one did (precision auto: bf16 or fp32)
        log.info("%s made again: final loss %.6f, recorded %.6f", out, last["loss"], records.rows[key]["final"]["loss"])
        return out
    keep_pretraining(out, Path(study.records_dir) / "pretrain" / f"{variant['name']}_s{seed}")
    records.add({"key": key, "stage": "pretrain", "variant": variant["name"], "seed": seed,
                 "command": "conmim " + " ".join(args), "final": last, "seconds": seconds,
                 "machine": machine(), "commit": commit()})  # fmt: skip
    return out


SCORES = {"segment": ("mIoU", "mAcc", "aAcc"), "detect": ("bbox_AP", "bbox_AP50", "bbox_AP75")}


def dense(
    study: DenseStudy, command: str, source: Path, start: str, seed: int, data: list[str], recipe: list[str],
    tag: str, records: Records, **fields: Any,
) -> dict[str, Any]:  # fmt: skip
    """``conmim segment`` or ``conmim detect`` (``command``) of ``source`` with the ``data`` settings
    (``start`` scratch: its architecture, timm's initialisation); its scores go into ``records``."""
    out = Path(study.output_dir) / command / f"{start}_s{seed}_{tag}"
    init = "random" if start == "scratch" else "pretrained"
    preset = ["--config", study.segment_preset] if command == "segment" else []  # detect: its CPU-sized defaults
    settings = [f"seed={seed}", f"output_dir={out}", f"{command}.init={init}", *data, *recipe]
    args = [command, str(source), *preset, *settings]
    identity = [start, seed, tag, settings[2:]]  # segmentation records keep the key they were written with
    key = json.dumps(identity if command == "segment" else [command, *identity])
    if key not in records.rows:
        log.info("%s %s seed %d %s", command, start, seed, tag)
        seconds = conmim(args, out, study.threads)
        result = json.loads((out / command / "results.json").read_text())
        records.add({"key": key, "start": start, "seed": seed, "tag": tag, **fields, "recipe": recipe,
                     **{k: result[k] for k in SCORES[command]}, "history": result["history"],
                     "command": "conmim " + " ".join(args), "seconds": seconds,
                     "machine": machine(), "commit": commit()})  # fmt: skip
    return records.rows[key]


def segment(
    study: DenseStudy, source: Path, start: str, seed: int, train: tuple[Path, Path], val: tuple[Path, Path],
    recipe: list[str], tag: str, records: Records, **fields: Any,
) -> dict[str, Any]:  # fmt: skip
    """``conmim segment`` of ``source`` on the ``train`` and ``val`` folders of images and masks."""
    data = [f"segment.images={train[0]}", f"segment.masks={train[1]}", f"segment.val_images={val[0]}",
            f"segment.val_masks={val[1]}", "segment.num_classes=10"]  # fmt: skip
    return dense(study, "segment", source, start, seed, data, recipe, tag, records, **fields)


def detect(
    study: DenseStudy, source: Path, start: str, seed: int, train: tuple[Path, Path], val: tuple[Path, Path],
    recipe: list[str], tag: str, records: Records, **fields: Any,
) -> dict[str, Any]:  # fmt: skip
    """``conmim detect`` of ``source`` on the ``train`` and ``val`` pairs of images folder and COCO file."""
    data = [f"detect.train_images={train[0]}", f"detect.train_ann={train[1]}", f"detect.val_images={val[0]}",
            f"detect.val_ann={val[1]}"]  # fmt: skip
    return dense(study, "detect", source, start, seed, data, recipe, tag, records, **fields)


def architecture(study: DenseStudy) -> Path:
    """A one-step pre-training: the encoder shape scratch starts from (its weights are never used)."""
    out = Path(study.output_dir) / "architecture"
    if not (out / "checkpoints" / "last.pt").is_file():
        args = ["pretrain", "--config", study.pretrain_preset, *study.pretrain_overrides, "train.max_steps=1"]
        conmim([*args, f"output_dir={out}"], out, 1)
    return out


def run_sweep(study: DenseStudy, starts: list[str] | None = None) -> list[dict[str, Any]]:
    """The scratch recipes, then the pre-trained ones from each variant (``starts``: only these)."""
    records = Records(Path(study.records_dir) / "sweep.jsonl")
    sw = study.sweep
    train = linked_scenes(study, f"train_{sw.labelled}", "training", range(sw.labelled))
    val = linked_scenes(study, "holdout", "training", range(*sw.holdout))
    source, seed = architecture(study), study.seeds[0]
    rows = [
        segment(study, source, "scratch", seed, train, val, recipe, f"sweep{i}", records, labelled=sw.labelled)
        for i, recipe in enumerate(sw.recipes if starts is None or "scratch" in starts else [])
    ]
    pretrainings = Records(Path(study.records_dir) / "runs.jsonl")
    for variant in [v for v in study.variants if sw.pretrained and (starts is None or v["name"] in starts)]:
        source = pretrain(study, variant, seed, pretrainings)
        for i, recipe in enumerate(sw.pretrained):
            tag = f"sweep_{variant['name']}{i}"
            rows.append(
                segment(study, source, variant["name"], seed, train, val, recipe, tag, records, labelled=sw.labelled)
            )
    return rows


def run_curve(study: DenseStudy, starts: list[str] | None = None) -> list[dict[str, Any]]:
    """Every start (first seed) with the sweep's curve recipe on its labelled and held-out scenes: the
    mIoU along fine-tuning, to see whether a pre-trained start leads early or catches up late."""
    records = Records(Path(study.records_dir) / "curve.jsonl")
    sw = study.sweep
    train = linked_scenes(study, f"train_{sw.labelled}", "training", range(sw.labelled))
    val = linked_scenes(study, "holdout", "training", range(*sw.holdout))
    seed, pretrainings = study.seeds[0], Records(Path(study.records_dir) / "runs.jsonl")
    sources = {"scratch": architecture(study)}
    for variant in [v for v in study.variants if starts is None or v["name"] in starts]:
        sources[variant["name"]] = pretrain(study, variant, seed, pretrainings)
    return [
        segment(study, source, start, seed, train, val, sw.curve, "curve", records, labelled=sw.labelled)
        for start, source in sources.items()
        if starts is None or start in starts
    ]


def sources_of(study: DenseStudy, seed: int, starts: list[str] | None, records: Records) -> dict[str, Path]:
    """Each start's encoder source for ``seed`` (``starts``: only these), pre-training where needed."""
    sources = {"scratch": architecture(study)}
    for variant in study.variants:
        if starts is None or variant["name"] in starts:
            sources[variant["name"]] = pretrain(study, variant, seed, records)
    return {k: v for k, v in sources.items() if starts is None or k in starts}


def run_table(study: DenseStudy, starts: list[str] | None = None) -> None:
    """Seed by seed: the pre-trainings, then every start's segmentations (``starts``: only these)."""
    records = Records(Path(study.records_dir) / "runs.jsonl")
    val = linked_scenes(study, "validation", "validation", range(scenes_config(study).val))
    for seed in study.seeds:
        sources = sources_of(study, seed, starts, records)
        for n in study.labelled:
            train = linked_scenes(study, f"train_{n}", "training", range(n))
            for start, source in sources.items():
                segment(study, source, start, seed, train, val, study.recipe, f"upernet_{n}", records,
                        labelled=n, head="upernet")  # fmt: skip
                if start != "scratch" or n == study.labelled[0]:
                    segment(study, source, start, seed, train, val, study.linear, f"linear_{n}", records,
                            labelled=n, head="linear")  # fmt: skip


def run_detect_sweep(study: DenseStudy, starts: list[str] | None = None) -> list[dict[str, Any]]:
    """Scratch with each of ``detect.sweep``'s recipes, then each variant's first-seed pre-training with
    each of ``detect.pretrained``'s (``starts``: only these), on the first ``detect.labelled`` training
    scenes, scored on the held-out training scenes (``sweep.holdout``)."""
    records = Records(Path(study.records_dir) / "detect_sweep.jsonl")
    d, seed = study.detect, study.seeds[0]
    train = coco_scenes(study, f"train_{d.labelled}", "training", range(d.labelled))
    val = coco_scenes(study, "holdout", "training", range(*study.sweep.holdout))
    trials = [("scratch", recipe, f"sweep{i}") for i, recipe in enumerate(d.sweep)]
    trials += [
        (v["name"], recipe, f"sweep_{v['name']}{i}") for v in study.variants for i, recipe in enumerate(d.pretrained)
    ]
    sources = sources_of(study, seed, sorted({start for start, _, _ in trials if starts is None or start in starts}),
                         Records(Path(study.records_dir) / "runs.jsonl"))  # fmt: skip
    return [
        detect(study, sources[start], start, seed, train, val, recipe, tag, records, labelled=d.labelled)
        for start, recipe, tag in trials
        if start in sources
    ]


def run_detect_table(study: DenseStudy, starts: list[str] | None = None) -> None:
    """Seed by seed: every start's ``conmim detect`` with ``detect.recipe``, scored on the validation scenes."""
    records = Records(Path(study.records_dir) / "runs.jsonl")
    d = study.detect
    train = coco_scenes(study, f"train_{d.labelled}", "training", range(d.labelled))
    val = coco_scenes(study, "validation", "validation", range(scenes_config(study).val))
    for seed in study.seeds:
        for start, source in sources_of(study, seed, starts, records).items():
            detect(study, source, start, seed, train, val, d.recipe, "detect", records, labelled=d.labelled)


def write_pictures(study: DenseStudy, seed: int, tag: str) -> Path | None:
    """``predictions_{tag}.png``: the validation scenes' image and truth, then each start's prediction
    (scratch first, then every start that ran), one column each, cut from the runs' own ``predictions.png``
    (same scenes, same order)."""
    starts = ["scratch", *(v["name"] for v in study.variants)]
    found = {
        s: Path(study.output_dir) / "segment" / f"{s}_s{seed}_{tag}" / "segment" / "predictions.png" for s in starts
    }
    starts = [s for s in starts if found[s].is_file()]  # the starts that ran (scratch first)
    paths = [found[s] for s in starts]
    if len(paths) < 2 or starts[0] != "scratch":
        return None
    from PIL import Image

    pictures = [Image.open(p).convert("RGB") for p in paths]
    third = pictures[0].width // 3  # each picture: image | truth | prediction
    columns = [pictures[0].crop((0, 0, 2 * third, pictures[0].height))]
    columns += [p.crop((2 * third, 0, p.width, p.height)) for p in pictures]
    out = Image.new("RGB", (sum(c.width for c in columns), pictures[0].height), "white")
    for i, column in enumerate(columns):
        out.paste(column, (sum(c.width for c in columns[:i]), 0))
    path = Path(study.records_dir) / f"predictions_{tag}.png"
    out.save(path)
    log.info("wrote %s (columns: image, truth, %s)", path, ", ".join(starts))
    return path


def report(study: DenseStudy) -> dict[str, Any]:
    """The pictures of the first seed's runs, then ``dense_summary.json``."""
    for n in study.labelled:
        write_pictures(study, study.seeds[0], f"upernet_{n}")
    return write_summary(study)


def write_summary(study: DenseStudy) -> dict[str, Any]:
    """``dense_summary.json``: mIoU per start and labelled count, box AP and AP50 per start, one value
    per seed."""
    rows = sorted(Records(Path(study.records_dir) / "runs.jsonl").rows.values(), key=lambda r: r["seed"])
    summary: dict[str, Any] = {
        "segment_miou": {},
        "segment_linear_miou": {},
        "detect_box_ap": {},
        "detect_box_ap50": {},
    }
    for row in (r for r in rows if "head" in r):
        table = summary["segment_miou" if row["head"] == "upernet" else "segment_linear_miou"]
        table.setdefault(row["start"], {}).setdefault(str(row["labelled"]), []).append(round(row["mIoU"], 2))
    for row in (r for r in rows if r.get("tag") == "detect"):
        summary["detect_box_ap"].setdefault(row["start"], []).append(round(row["bbox_AP"], 2))
        summary["detect_box_ap50"].setdefault(row["start"], []).append(round(row["bbox_AP50"], 2))
    path = Path(study.records_dir) / "dense_summary.json"
    path.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.dense_study", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", default="dense_scenes", help="study YAML file or lab preset name")
    parser.add_argument("--sweep", action="store_true", help="run the scratch recipe sweep instead of the table")
    parser.add_argument("--curve", action="store_true", help="run every start with the sweep's curve recipe")
    parser.add_argument(
        "--detect-sweep", action="store_true", help="run the scratch detection recipes (held-out scenes)"
    )
    parser.add_argument("--detect", action="store_true", help="run the detection table instead of segmentation")
    parser.add_argument("--report-only", action="store_true", help="rewrite dense_summary.json from the records")
    parser.add_argument("--starts", help="comma-separated starts to run (scratch, variants)")
    parser.add_argument("--seeds", help="comma-separated seeds to run (default: the study's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    study = load(args.config)
    starts = args.starts.split(",") if args.starts else None
    if args.seeds:
        study.seeds = [int(s) for s in args.seeds.split(",")]
    if args.sweep:
        for row in run_sweep(study, starts):
            print(f"{row['start']} {row['recipe']}: held-out mIoU {row['mIoU']:.2f}")
    elif args.curve:
        for row in run_curve(study, starts):
            points = [f"{h['step']}: {h['val_mIoU']:.2f}" for h in row["history"]] + [f"end: {row['mIoU']:.2f}"]
            print(f"{row['start']} held-out mIoU by iteration {', '.join(points)}")
    elif args.detect_sweep:
        for row in run_detect_sweep(study, starts):
            print(f"{row['start']} {row['recipe']}: held-out box AP {row['bbox_AP']:.2f}, AP50 {row['bbox_AP50']:.2f}")
    elif args.detect:
        run_detect_table(study, starts)
        print(json.dumps(report(study), indent=1))
    elif args.report_only:
        print(json.dumps(report(study), indent=1))
    else:
        run_table(study, starts)
        print(json.dumps(report(study), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
