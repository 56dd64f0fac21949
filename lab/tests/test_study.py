"""The lab's study harness end to end on a tiny protocol: Fashion-MNIST subsets, real runs, reports, skip on rerun."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conmim.config import ConfigError
from lab.provenance import machine
from lab.study import load_study, main, plan

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_STUDY = """
study:
  output_dir: {out}/runs
  records_dir: {out}/docs
  seeds: [0]
  train_images: 128
  test_images: 64
  variants:
    - {{name: conmim, seeds: [0, 1], finetune: false}}
    - {{name: pixel, overrides: [model.objective=pixel], finetune: false}}
    - {{name: scratch, pretrain: false}}
base:
  model: {{arch: vit_tiny, encoder: vit, depth: 2, img_size: 32, patch_size: 4, proj_hidden_dim: 64, proj_out_dim: 32}}
  data: {{num_workers: 0, crop_scale_min: 0.25}}
  precision: fp32
  train: {{batch_size: 32, epochs: 1, log_every: 1, checkpoint_every: 2, warmup_epochs: 0.25}}
  eval: {{pool: mean}}
  linprobe: {{epochs: 2, warmup_epochs: 0}}
  finetune: {{epochs: 1, batch_size: 32, mixup: 0.0, cutmix: 0.0, auto_augment: "", reprob: 0.0, crop_pct: 1.0}}
"""


def test_tiny_study_runs_reports_and_skips_finished_stages(tmp_path):
    config = tmp_path / "study.yaml"
    config.write_text(TINY_STUDY.format(out=tmp_path))
    study, _base = load_study(config)
    assert [(v.name, s) for v, s in plan(study)] == [("conmim", 0), ("pixel", 0), ("scratch", 0), ("conmim", 1)]
    assert main([str(config)]) == 0

    results = json.loads((tmp_path / "docs" / "results.json").read_text())
    runs = {(r["variant"], r["seed"]): r for r in results["runs"]}
    assert set(runs) == {("conmim", 0), ("conmim", 1), ("pixel", 0), ("scratch", 0)}
    assert "finetune_top1" not in runs[("conmim", 0)] and 0 <= runs[("scratch", 0)]["finetune_top1"] <= 100
    # scratch fine-tunes for its own epoch plus the pre-training's 4 steps (one 4-step epoch)
    assert runs[("scratch", 0)]["finetune_epochs"] == 2
    assert all(0 <= r["knn_top1"] <= 100 and 0 <= r["linprobe_top1"] <= 100 for r in runs.values())
    conmim = next(row for row in results["aggregate"] if row["variant"] == "conmim")
    assert len(conmim["knn_top1"]["values"]) == 2 and conmim["knn_top1"]["std"] is not None
    assert "| conmim | 2 |" in (tmp_path / "docs" / "table.md").read_text()
    for png in ("pretrain_curves.png", "accuracy_bars.png"):
        with Image.open(tmp_path / "docs" / png) as im:
            assert im.width > 400 and im.height > 200

    stages = tmp_path / "runs" / "conmim_s0" / "stages.json"
    before = stages.read_text()
    assert main([str(config)]) == 0  # everything finished: nothing reruns
    assert stages.read_text() == before
    again = json.loads((tmp_path / "docs" / "results.json").read_text())
    assert again["runs"] == results["runs"]


def test_bad_variant_override_fails_before_any_work(tmp_path):
    config = tmp_path / "study.yaml"
    config.write_text(TINY_STUDY.format(out=tmp_path).replace("model.objective=pixel", "model.objectiv=pixel"))
    with pytest.raises(ConfigError, match="pixel"):
        load_study(config)
    assert not (tmp_path / "runs").exists()


FRACTION_STUDY = """
study:
  output_dir: {out}/runs
  records_dir: {out}/docs
  seeds: [0, 1]
  train_images: 400
  test_images: 200
  label_fractions: [0.1, 1.0]
  finetune_epochs: [2, 1]
  probe_epochs: [5, 2]
  fraction_overrides: [[finetune.batch_size=16], []]
  variants:
    - {{name: conmim, label: ConMIM}}
    - {{name: scratch, pretrain: false}}
base:
  model: {{arch: vit_tiny, encoder: vit, depth: 2, img_size: 32, patch_size: 4, proj_hidden_dim: 64, proj_out_dim: 32}}
  data: {{num_workers: 0, crop_scale_min: 0.25}}
  precision: fp32
  train: {{batch_size: 32, epochs: 1, max_steps: 3, log_every: 1, checkpoint_every: 2,
          warmup_epochs: 0.1}}
  eval: {{pool: mean}}
  linprobe: {{warmup_epochs: 0}}
  finetune: {{batch_size: 32, warmup_epochs: 0.5, mixup: 0.0, cutmix: 0.0, auto_augment: "", reprob: 0.0,
             crop_pct: 1.0}}
"""


def test_balanced_subset_is_class_balanced_and_seeded(fashion_mnist_dir):
    from conmim.data.sources import fashion_mnist
    from lab.study import balanced_subset, fixed_subset

    source = fixed_subset(fashion_mnist(fashion_mnist_dir, "train"), 400, 0)
    first = balanced_subset(source, 0.1, 0)
    assert len(first) == 40 and len(set(first.tolist())) == 40
    assert np.bincount(source.labels[first], minlength=10).tolist() == [4] * 10
    assert np.array_equal(first, balanced_subset(source, 0.1, 0))  # same seed, same subset
    assert not np.array_equal(first, balanced_subset(source, 0.1, 1))  # another seed, another subset
    assert set(first) <= set(balanced_subset(source, 0.2, 0))  # one seed's subsets are nested
    assert np.array_equal(balanced_subset(source, 1.0, 3), np.arange(400))


def test_fraction_lists_must_match_the_fractions(tmp_path):
    config = tmp_path / "study.yaml"
    config.write_text(FRACTION_STUDY.format(out=tmp_path).replace("finetune_epochs: [2, 1]", "finetune_epochs: [2]"))
    with pytest.raises(ConfigError, match="finetune_epochs"):
        load_study(config)


def test_label_fraction_study_runs_resumes_and_reports(tmp_path, caplog):
    config = tmp_path / "study.yaml"
    config.write_text(FRACTION_STUDY.format(out=tmp_path))
    start = time.perf_counter()
    assert main([str(config)]) == 0
    first_seconds = time.perf_counter() - start
    results = json.loads((tmp_path / "docs" / "results.json").read_text())
    runs = {(r["variant"], r["seed"], r["fraction"]): r for r in results["runs"]}
    expected = {(v, s, 0.1) for v in ("conmim", "scratch", "raw_pixels") for s in (0, 1)}
    assert set(runs) == expected | {(v, 0, 1.0) for v in ("conmim", "scratch", "raw_pixels")}  # 100 %: seed 0 only
    assert runs[("conmim", 0, 0.1)]["labels"] == 40 and runs[("conmim", 0, 1.0)]["labels"] == 400
    for seed, fraction in ((0, 0.1), (1, 0.1), (0, 1.0)):  # scratch: the same recipe and steps
        assert runs[("conmim", seed, fraction)]["finetune_steps"] == runs[("scratch", seed, fraction)]["finetune_steps"]
    assert runs[("conmim", 0, 0.1)]["finetune_steps"] == 40 * 2 // 16  # two passes over 40 labels at batch 16
    assert runs[("conmim", 0, 1.0)]["finetune_steps"] == 400 // 32
    for r in runs.values():
        assert all(0 <= r[m] <= 100 for m in ("linprobe_top1", "knn_top1"))
        assert ("finetune_top1" in r) == (r["variant"] != "raw_pixels")
        ran = {"linprobe", "knn"} | ({"finetune"} if "finetune_top1" in r else set())
        ran |= {"pretrain"} if r["variant"] == "conmim" else set()
        assert r["machines"] == dict.fromkeys(ran, machine())  # each stage names the machine it ran on
    assert results["machine"]["cpu"] == machine()["cpu"] != "x86_64"
    row = next(r for r in results["aggregate"] if r["variant"] == "conmim" and r["fraction"] == 0.1)
    assert len(row["finetune_top1"]["values"]) == 2 and row["finetune_top1"]["std"] is not None
    assert results["not_run"] == []
    table = (tmp_path / "docs" / "table.md").read_text()
    assert "| ConMIM |" in table and "| scratch |" in table
    assert "raw pixels: k-NN (k=20, cosine)" in table and "raw pixels: linear" in table
    with Image.open(tmp_path / "docs" / "label_efficiency.png") as im:
        assert im.width > 400 and im.height > 300
    assert not (tmp_path / "runs" / "scratch_s1" / "finetune_f1").exists()
    assert not (tmp_path / "runs" / "scratch_s0" / "pretrain").exists()
    kept = tmp_path / "docs" / "pretrain" / "conmim_s1" / "metrics.jsonl"  # the curve outlives the run folder
    assert kept.read_text() == (tmp_path / "runs" / "conmim_s1" / "pretrain" / "metrics.jsonl").read_text()
    assert sorted(p.name for p in (tmp_path / "docs" / "pretrain").iterdir()) == ["conmim_s0", "conmim_s1"]

    stages = {p: p.read_text() for p in (tmp_path / "runs").glob("*/stages.json")}
    start = time.perf_counter()
    assert main([str(config)]) == 0  # everything finished: nothing reruns
    assert time.perf_counter() - start < first_seconds / 3
    assert {p: p.read_text() for p in stages} == stages
    assert json.loads((tmp_path / "docs" / "results.json").read_text())["runs"] == results["runs"]

    # an interrupted study resumes stage by stage: a lost probe stage reruns alone, with the same result
    path = tmp_path / "runs" / "conmim_s1" / "stages.json"
    done = json.loads(path.read_text())
    del done["linprobe_f0.1"]
    path.write_text(json.dumps(done))
    assert main([str(config)]) == 0
    again = json.loads(path.read_text())
    assert list(again) == list(done) + ["linprobe_f0.1"]
    assert again["linprobe_f0.1"]["result"] == json.loads(stages[path])["linprobe_f0.1"]["result"]
    assert again["pretrain"] == done["pretrain"]

    # on a new machine the run folders are gone: a report written there keeps the recorded rows and curves
    reported = json.loads((tmp_path / "docs" / "results.json").read_text())["runs"]
    (tmp_path / "runs").rename(tmp_path / "runs_elsewhere")
    assert main([str(config), "--report-only"]) == 0
    rows = json.loads((tmp_path / "docs" / "results.json").read_text())["runs"]
    assert sorted(map(json.dumps, rows)) == sorted(map(json.dumps, reported))
    assert kept.read_text() == (tmp_path / "runs_elsewhere" / "conmim_s1" / "pretrain" / "metrics.jsonl").read_text()
    (tmp_path / "runs_elsewhere").rename(tmp_path / "runs")

    # a study whose fine-tuning recipe has changed since (another sweep choice) reports no fine-tuning of
    # the old recipe: its rows keep their probe and k-NN only, from the records or from a run folder...
    config.write_text(
        FRACTION_STUDY.format(out=tmp_path).replace("[[finetune.batch_size=16]", "[[finetune.batch_size=8]")
    )
    for moved in (True, False):  # the rows of runs no longer here, then those of the run folders
        if moved:
            (tmp_path / "runs").rename(tmp_path / "runs_elsewhere")
        assert main([str(config), "--report-only"]) == 0
        report = json.loads((tmp_path / "docs" / "results.json").read_text())
        rows = {(r["variant"], r["seed"], r["fraction"]): r for r in report["runs"]}
        assert "finetune_top1" not in rows[("conmim", 1, 0.1)]
        assert "finetune" not in rows[("conmim", 1, 0.1)]["seconds"]
        assert "finetune" not in rows[("conmim", 1, 0.1)]["machines"]
        assert rows[("conmim", 1, 0.1)]["knn_top1"] == runs[("conmim", 1, 0.1)]["knn_top1"]
        assert rows[("conmim", 0, 1.0)] == runs[("conmim", 0, 1.0)]  # 100 %: the recipe there is unchanged
        assert sorted(report["not_run"]) == [[v, s, 0.1] for v in ("conmim", "scratch") for s in (0, 1)]
        # the dropped fine-tunings are kept whole beside the report, once each however often it is written
        superseded = json.loads((tmp_path / "docs" / "superseded.json").read_text())["runs"]
        assert sorted((r["variant"], r["seed"]) for r in superseded) == [
            (v, s) for v in ("conmim", "scratch") for s in (0, 1)
        ]
        kept_row = next(r for r in superseded if (r["variant"], r["seed"]) == ("conmim", 1))
        assert kept_row["finetune_top1"] == runs[("conmim", 1, 0.1)]["finetune_top1"]
        assert kept_row["finetune_recipe"]["batch_size"] == 16 and kept_row["from_commit"]
        if moved:
            (tmp_path / "runs_elsewhere").rename(tmp_path / "runs")
    # ...and running it again runs each stale fine-tuning with the new recipe (the old run moves aside),
    # and nothing else
    assert main([str(config)]) == 0
    assert "finetune_f0.1 ran with another fine-tuning recipe (differs in batch_size" in caplog.text
    now = json.loads(path.read_text())
    assert now["finetune_f0.1"]["result"]["recipe"]["batch_size"] == 8
    assert now["finetune_f0.1"]["result"]["steps"] == 40 * 2 // 8
    assert {k: v for k, v in now.items() if k != "finetune_f0.1"} == {
        k: v for k, v in again.items() if k != "finetune_f0.1"
    }
    assert (path.parent / "finetune_f0.1.superseded" / "config.yaml").is_file()
    assert json.loads((tmp_path / "docs" / "results.json").read_text())["not_run"] == []

    # a finished pre-training run serves as a variant: the same encoder gives the same probe and k-NN
    reuse = tmp_path / "reuse.yaml"
    text = FRACTION_STUDY.format(out=tmp_path / "reuse")
    for old, new in (
        ("seeds: [0, 1]", "seeds: [0]\n  references: false"),
        ("[0.1, 1.0]", "[0.1]"),
        ("[2, 1]", "[2]"),
        ("[5, 2]", "[5]"),
        ("[[finetune.batch_size=16], []]", "[[]]"),
        ("- {name: scratch, pretrain: false}", ""),
        (
            "{name: conmim, label: ConMIM}",
            f"{{name: reused, finetune: false, pretrained: {tmp_path / 'runs/conmim_s0/pretrain'}}}",
        ),
    ):
        assert old in text
        text = text.replace(old, new)
    reuse.write_text(text)
    assert main([str(reuse)]) == 0
    reused = json.loads((tmp_path / "reuse" / "runs" / "reused_s0" / "stages.json").read_text())
    assert sorted(reused) == ["knn_f0.1", "linprobe_f0.1"]
    original = json.loads((tmp_path / "runs" / "conmim_s0" / "stages.json").read_text())
    assert all(reused[stage]["result"] == original[stage]["result"] for stage in reused)


def test_label_preset_is_the_default_pretraining_under_the_swept_scratch_recipe(tmp_path):
    from omegaconf import OmegaConf

    from conmim.config import preset_path
    from lab.study import fraction_config, swept_recipe, variant_config

    study, base = load_study("study_labels")
    default = OmegaConf.load(preset_path("fashion_mnist"))
    for section in ("model", "mask", "data", "train"):  # ConMIM here is the built-in default run
        assert OmegaConf.to_container(base[section]) == OmegaConf.to_container(default[section]), section
    # the sweep fine-tunes from the fashion_mnist preset's recipe: the swept overrides mean the same here
    assert OmegaConf.to_container(base.finetune) == OmegaConf.to_container(default.finetune)
    assert study.label_fractions == [0.01, 0.1, 1.0] and study.seeds == [0, 1]
    steps = {}
    for variant in study.variants:
        cfg = variant_config(base, variant, 0, tmp_path, tmp_path)
        for i, labels in enumerate((600, 6000)):  # the fractions the sweep has measured
            overrides, passes, _ = swept_recipe(study, study.label_fractions[i])
            f, got = fraction_config(cfg, study, i)
            assert got == passes
            for override in overrides:  # warm-up is rescaled from passes to the tiled epochs
                key = override.split("=")[0]
                if key != "finetune.warmup_epochs":
                    swept = OmegaConf.select(OmegaConf.from_dotlist([override]), key)
                    assert OmegaConf.select(OmegaConf.structured(f), key) == swept, override
            steps.setdefault(variant.name, []).append(f.finetune.epochs * (labels * passes // f.finetune.batch_size))
    assert (
        steps["scratch"]
        == steps["conmim"]
        == steps["pixel"]
        == steps["mae"]
        == steps["scratch_vit"]
        == steps["conmim_vit"]
        == [1425, 2250]
    )


def test_fine_tuning_passes_split_into_evaluated_epochs(tmp_path):
    from lab.study import fraction_config, variant_config

    config = tmp_path / "study.yaml"
    config.write_text(
        FRACTION_STUDY.format(out=tmp_path).replace(
            "finetune_epochs: [2, 1]", "finetune_epochs: [4, 2]\n  finetune_evals: 2"
        )
    )
    study, base = load_study(config)
    cfg = variant_config(base, study.variants[0], 0, tmp_path, tmp_path)
    f, passes = fraction_config(cfg, study, 0)
    # 4 passes over the labelled images = 2 evaluated epochs of 2 passes; warm-up 0.5 pass = 0.25 epoch
    assert (passes, f.finetune.epochs, f.finetune.warmup_epochs, f.finetune.batch_size) == (4, 2, 0.25, 16)
    assert f.linprobe.epochs == 5 and fraction_config(cfg, study, 1)[0].linprobe.epochs == 2
    config.write_text(config.read_text().replace("finetune_evals: 2", "finetune_evals: 3"))
    with pytest.raises(ConfigError, match="finetune_evals"):
        load_study(config)


def test_pretrained_runs_per_seed_are_checked_before_any_work(tmp_path):
    """``pretrained: DIR{seed}`` names one finished run per seed; a missing one fails at load time."""
    (tmp_path / "pre0").mkdir()
    config = tmp_path / "study.yaml"
    text = FRACTION_STUDY.format(out=tmp_path).replace(
        "{name: conmim, label: ConMIM}", f"{{name: conmim, label: ConMIM, pretrained: '{tmp_path}/pre{{seed}}'}}"
    )
    config.write_text(text)
    with pytest.raises(ConfigError, match="pre1"):
        load_study(config)
    (tmp_path / "pre1").mkdir()
    study, _base = load_study(config)
    assert [study.variants[0].pretrained_at(s) for s in (0, 1)] == [f"{tmp_path}/pre0", f"{tmp_path}/pre1"]


def test_every_lab_preset_loads_and_each_variant_validates():
    from lab.study import PRESETS, variant_config

    names = sorted(p.stem for p in PRESETS.glob("study_*.yaml"))
    assert {"study_labels", "study_cpu", "study_gpu"} <= set(names)
    for name in names:
        study, base = load_study(name)
        for variant in study.variants:
            variant_config(base, variant, 0, Path("/tmp/unused"), Path("/tmp/unused"))


def test_recipe_sweep_records_every_trial_on_validation_images_and_skips_them_on_rerun(tmp_path, tiny_sweep):
    from lab.sweep import main as sweep_main

    config = tiny_sweep("{fraction: 0.002, passes: [2], evals: 2, overrides: [finetune.batch_size=16]}")
    assert sweep_main([str(config)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "trials.jsonl").read_text().splitlines()]
    assert [r["overrides"][-1] for r in rows] == ["finetune.base_lr=1.0e-3", "finetune.base_lr=4.0e-3"]
    for r in rows:
        assert (r["labels"], r["val_images"], r["passes"], len(r["val_history_top1"])) == (120, 30, 2, 2)
        assert 0 <= r["val_top1"] <= 100 and r["steps"] == 2 * (120 // 16)
    before = (tmp_path / "trials.jsonl").read_text()
    assert sweep_main([str(config)]) == 0
    assert (tmp_path / "trials.jsonl").read_text() == before  # every trial was done: nothing reruns
    # a trial recorded before the head fit was counted in passes (no head_fit_passes) is not today's trial
    old = {k: v for k, v in rows[0].items() if k != "head_fit_passes"}
    (tmp_path / "trials.jsonl").write_text(json.dumps(old) + "\n" + before.splitlines()[1] + "\n")
    assert sweep_main([str(config)]) == 0
    again = [json.loads(line) for line in (tmp_path / "trials.jsonl").read_text().splitlines()]
    assert [r.get("head_fit_passes") for r in again] == [None, 0, 0]
    assert again[2]["overrides"] == rows[0]["overrides"]


def test_validation_images_never_overlap_the_labelled_subset():
    from conmim.data.sources import fashion_mnist
    from lab.study import balanced_subset
    from lab.sweep import validation_indices

    train = fashion_mnist("/usr/share/datasets/fashion-mnist", "train")
    labelled = balanced_subset(train, 0.1, 0)
    val = validation_indices(train, labelled, 500, 0)
    assert len(val) == 5000 and not set(val) & set(labelled)
    assert np.bincount(np.asarray(train.labels)[val]).tolist() == [500] * 10
    assert set(balanced_subset(train, 0.01, 0)) <= set(labelled)  # the smaller fraction's images too


def test_pretraining_alone_needs_no_swept_recipe_and_a_sweep_names_a_missing_start(tmp_path, tiny_sweep, capsys):
    from lab.sweep import main as sweep_main

    config = tmp_path / "study.yaml"
    text = FRACTION_STUDY.format(out=tmp_path).replace(
        "  variants:", f"  recipe_sweep: {tmp_path}/trials.jsonl\n  variants:"
    )  # no sweep trial yet at any fraction
    config.write_text(text)
    threads = torch.get_num_threads()
    wanted = 2 if threads == 1 else 1  # --threads replaces study.threads for this invocation
    try:
        part = ["--variants", "conmim", "--seeds", "0", "--pretrain-only", f"--threads={wanted}"]
        assert main([str(config), *part]) == 0
        assert torch.get_num_threads() == wanted
    finally:
        torch.set_num_threads(threads)
    start = tmp_path / "runs" / "conmim_s0" / "pretrain"
    assert (start / "checkpoints" / "last.pt").is_file()
    assert main([str(config), "--variants", "conmim", "--seeds", "0"]) == 2  # fine-tuning does need one
    assert "no trial of 'random' at seed 0 and fraction 0.1 yet" in capsys.readouterr().err

    missing = tmp_path / "runs" / "conmim_s1" / "pretrain"
    sweep = tiny_sweep("{fraction: 0.002, passes: [2], evals: 1}", f"  start: {missing}")
    assert sweep_main([str(sweep)]) == 2
    assert f"sweep.start={str(missing)!r}: no such pre-training run directory" in capsys.readouterr().err


def test_two_starts_sweeps_run_their_trials_in_folders_of_their_own():
    from lab.sweep import FractionTrials, SweepSettings, trial_folder

    trials = FractionTrials(fraction=0.01, passes=[152], overrides=["finetune.base_lr=8.0e-3"])
    folders = {
        start: trial_folder(SweepSettings(output_dir="runs/s", start=start), trials, 152, ["finetune.layer_decay=0.75"])
        for start in (
            "random",
            "runs/study/conmim_s0/pretrain",
            "runs/study/mae_s0/pretrain",
            "exports/mae.safetensors",
        )
    }
    assert len(set(folders.values())) == 4
    assert folders["random"].parent == Path("runs/s")
    assert folders["runs/study/mae_s0/pretrain"].parent == Path("runs/s/study_mae_s0_pretrain")
    assert folders["random"].name.startswith("f0.01_p152_") and folders["random"].name.endswith("_layer_decay0.75")
    # the same recipe over another base recipe is another trial, in another folder
    trials.overrides = ["finetune.base_lr=2.0e-3"]
    other_base = trial_folder(SweepSettings(output_dir="runs/s"), trials, 152, ["finetune.layer_decay=0.75"])
    assert other_base != folders["random"]
