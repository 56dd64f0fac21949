"""Running a study in parts side by side (lab.device_study): the recipe taken from a sweep, the parts'
selection, stages merged across processes, the sweep's test scoring and its 100 % split, the job graph."""

from __future__ import annotations

import json
import multiprocessing
import sys
from pathlib import Path

import numpy as np
import pytest

from conmim.config import ConfigError
from lab.study import Stages, Variant, fraction_config, fractions_at, load_study, swept_recipe, variant_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _trial(fraction: float, passes: int, lr: str, val: float, start: str = "random") -> dict:
    overrides = ["finetune.warmup_epochs=2", f"finetune.base_lr={lr}"]
    row = {"start": start, "seed": 0, "fraction": fraction, "passes": passes, "overrides": overrides, "val_top1": val}
    return row | {"head_fit_passes": 20}


def test_each_fraction_takes_the_best_validation_trial_of_scratch(tmp_path):
    records = tmp_path / "trials.jsonl"
    study, base = load_study("study_labels_gpu")
    study.recipe_sweep = str(records)
    assert swept_recipe(study, 0.01) is None  # no trial yet: the preset still loads (pre-training can start)
    cfg = variant_config(base, study.variants[0], 0, tmp_path, tmp_path)
    with pytest.raises(ConfigError, match="no trial of 'random'"):
        fraction_config(cfg, study, 0)
    rows = [
        _trial(0.01, 250, "1.0e-3", 61.0),
        _trial(0.01, 250, "2.0e-3", 63.5),
        _trial(0.01, 250, "4.0e-3", 70.0, start="runs/x/pretrain"),  # another start's trial never counts
        {k: v for k, v in _trial(0.01, 250, "8.0e-3", 71.0).items() if k != "head_fit_passes"},  # a tiled head fit
        _trial(0.1, 50, "1.0e-3", 80.0),
    ]
    records.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert swept_recipe(study, 0.01) == (["finetune.warmup_epochs=2", "finetune.base_lr=2.0e-3"], 250, 63.5)
    f, passes = fraction_config(cfg, study, 0)
    assert (passes, f.finetune.base_lr, f.finetune.epochs) == (250, 2.0e-3, 1)  # one evaluated epoch of 250 passes
    assert fraction_config(cfg, study, 1)[0].finetune.base_lr == 1.0e-3


def test_a_variant_takes_the_recipe_swept_in_its_own_layout_and_no_other_layouts(tmp_path):
    study, base = load_study("study_labels_gpu")
    study.recipe_sweep = str(tmp_path / "trials.jsonl")
    study.label_fractions = [0.01]
    (tmp_path / "trials.jsonl").write_text(json.dumps(_trial(0.01, 250, "8.0e-3", 65.0)) + "\n")
    layout = ["model.encoder=vit", "model.pos_embed=none", "model.rel_pos_init=zero"]
    vit_trial = _trial(0.01, 250, "4.0e-3", 73.0) | {"overrides": [*layout, "finetune.base_lr=4.0e-3"]}
    (tmp_path / "vit_trials.jsonl").write_text(json.dumps(vit_trial) + "\n")
    vit = Variant("scratch_vit", overrides=layout, pretrain=False, recipe_sweep=str(tmp_path / "vit_trials.jsonl"))
    cfg = variant_config(base, vit, 0, tmp_path, tmp_path)
    assert fraction_config(cfg, study, 0, vit)[0].finetune.base_lr == 4.0e-3
    assert fraction_config(cfg, study, 0)[0].finetune.base_lr == 8.0e-3  # the study's recipe without the variant
    beit = Variant("scratch", pretrain=False, recipe_sweep=vit.recipe_sweep)
    with pytest.raises(ConfigError, match="swept with model.encoder=vit, but scratch has model.encoder=beit"):
        fraction_config(variant_config(base, beit, 0, tmp_path, tmp_path), study, 0, beit)


def test_parts_select_fractions_and_seeds_per_variant():
    study, _base = load_study("study_labels_gpu")
    by_name = {v.name: v for v in study.variants}
    fractions = study.label_fractions
    assert [fractions[i] for i in fractions_at(study, [0, 1], 1, by_name["conmim"])] == [0.01, 0.1, 1.0]
    assert [fractions[i] for i in fractions_at(study, [0, 1], 1, by_name["pixel"])] == [0.01, 0.1]
    assert [fractions[i] for i in fractions_at(study, [0], 0, by_name["conmim_9x"])] == [0.01, 0.1]
    assert [fractions[i] for i in fractions_at(study, [0, 1], 0, Variant("x"))] == [0.01, 0.1, 1.0]


def _write_stage(path: str, name: str) -> None:
    Stages(Path(path)).run(name, lambda: {"top1": float(len(name))})


def test_stages_of_processes_side_by_side_are_merged(tmp_path):
    Stages(tmp_path).run("pretrain", lambda: {"steps": 3})
    names = [f"finetune_f{i}" for i in range(6)]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3) as pool:
        pool.starmap(_write_stage, [(str(tmp_path), n) for n in names])
    done = json.loads((tmp_path / "stages.json").read_text())
    assert set(done) == {"pretrain", *names}


def test_sweep_at_all_labels_holds_out_the_validation_images(fashion_mnist_dir):
    from conmim.data.sources import fashion_mnist
    from lab.sweep import FractionTrials, SweepSettings, sweep_splits

    train = fashion_mnist(fashion_mnist_dir, "train")
    settings = SweepSettings(fractions=[FractionTrials(0.1, [1]), FractionTrials(1.0, [1])])
    subsets, val = sweep_splits(settings, train)
    assert len(val) == 5000 and len(subsets[1.0]) == 55_000 and len(subsets[0.1]) == 6000
    assert set(subsets[0.1]) <= set(subsets[1.0])
    held_out = np.setdiff1d(np.arange(len(train)), subsets[1.0])
    assert np.array_equal(
        np.sort(val.images.reshape(5000, -1), 0), np.sort(train.images[held_out].reshape(5000, -1), 0)
    )


def test_sweep_trial_scores_its_final_model_on_the_test_split(tmp_path, tiny_sweep):
    from lab.sweep import main as sweep_main

    own_recipes = "recipes: [[finetune.base_lr=2.0e-3]]"  # replace the sweep's two
    # two evaluations: the final model is scored whichever epoch scored best on validation
    fraction = f"{{fraction: 0.002, passes: [2], evals: 2, overrides: [finetune.batch_size=16], {own_recipes}}}"
    config = tiny_sweep(fraction, "  test: true\n")
    assert sweep_main([str(config), "--recipes", "0"]) == 0
    (row,) = [json.loads(line) for line in (tmp_path / "trials.jsonl").read_text().splitlines()]
    assert row["overrides"][-1] == "finetune.base_lr=2.0e-3"  # the fraction's own recipe list
    assert 0 <= row["test_top1"] <= 100 and row["val_images"] == 30 and row["machine"]["cpu"]
    assert len(row["val_history_top1"]) == 2 and row["val_top1"] == row["val_history_top1"][-1]
    assert not list((tmp_path / "runs").rglob("last.pt"))  # the record holds what counts

    assert sweep_main([str(config), "--recipes", "0"]) == 0  # recorded: not run again
    assert len((tmp_path / "trials.jsonl").read_text().splitlines()) == 1
    # the same recipe over a changed base recipe (the fraction's batch size) is a new trial
    config.write_text(config.read_text().replace("finetune.batch_size=16", "finetune.batch_size=8"))
    assert sweep_main([str(config), "--recipes", "0"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "trials.jsonl").read_text().splitlines()]
    assert [r["batch_size"] for r in rows] == [16, 8] and rows[0]["key"] != rows[1]["key"]


def test_device_jobs_wait_for_their_pre_training_and_their_fraction_sweep(tmp_path):
    from omegaconf import OmegaConf

    from lab.device_study import study_jobs, write_own_sweep

    jobs = {j.name: j for j in study_jobs()}
    assert all(n in jobs for j in jobs.values() for n in j.needs)
    ft = jobs["ft_conmim_s1_f0.1"]
    assert "pre_conmim_s1" in ft.needs and {n for n in ft.needs if n.startswith("sweep_")} == {
        f"sweep_f0.1_r{r}" for r in range(4)
    }
    assert {n for n in jobs["ft_scratch_s0_f1"].needs} == {"sweep_f1_r0", "sweep_f1_r1"}
    assert "ft_pixel_s1_f1" not in jobs and "ft_conmim_9x_s0_f1" not in jobs
    assert min(jobs.values(), key=lambda j: j.priority).name.startswith("pre_conmim_")
    study_file = tmp_path / "study.yaml"
    records = tmp_path / "trials.jsonl"
    raw = OmegaConf.load("lab/presets/study_labels_gpu.yaml")
    raw.study.recipe_sweep = str(records)
    OmegaConf.save(raw, study_file)
    records.write_text(json.dumps(_trial(0.1, 50, "2.0e-3", 80.0)) + "\n")
    preset = tmp_path / "own.yaml"
    write_own_sweep(str(study_file), "recipe_sweep_gpu", "mae", 0.1, preset)
    own = OmegaConf.load(preset).sweep
    assert own.start.endswith("mae_s0/pretrain") and own.test and list(own.fractions[0].passes) == [50]
    assert [list(r) for r in own.recipes] == [[], ["finetune.base_lr=0.001"], ["finetune.layer_decay=0.75"]]
    assert list(own.base) == ["finetune.warmup_epochs=2", "finetune.base_lr=2.0e-3"]


def test_summary_holds_one_value_per_seed_and_the_length_curve(tmp_path):
    from PIL import Image

    from lab.summary import plot_length_curve, summarize

    def run(variant, seed, fraction, ft, lin):
        return {"variant": variant, "seed": seed, "fraction": fraction, "finetune_top1": ft, "linprobe_top1": lin}

    runs = [
        run("conmim", 1, 0.01, 61.0, 50.0),
        run("conmim", 0, 0.01, 60.0, 51.0),
        run("conmim", 0, 1.0, 90.0, 80.0),
        run("conmim", 0, 0.1, 75.0, 65.0),  # no longer pre-training has a 10 % run: a gap in the plot
        run("scratch", 0, 0.01, 55.0, 30.0),
        run("conmim_3x", 0, 0.01, 63.0, 55.0),
        run("conmim_9x", 0, 0.01, 65.456, 57.0),
        {"variant": "raw_pixels", "seed": 0, "fraction": 0.01, "linprobe_top1": 77.0},
    ]
    refs = [{"method": "raw_svm", "fraction": 0.01, "seed": s, "test_top1": 79.0 + s} for s in (1, 0)]
    own = [
        {"start": "runs/gpu/study_labels/conmim_s0/pretrain", "fraction": 0.01, "val_top1": v, "test_top1": t}
        | {"overrides": [f"finetune.base_lr={lr}"], "passes": 250, "head_fit_passes": 20}
        for v, t, lr in ((62.0, 61.5, "2e-3"), (64.0, 60.9, "1e-3"))
    ]
    out = summarize({"runs": runs}, refs, own)
    assert out["finetune"] == {
        "conmim": {"0.01": [60.0, 61.0], "0.1": [75.0], "1.0": [90.0]},
        "scratch": {"0.01": [55.0]},
    }
    assert out["linear"]["conmim"] == {"0.01": [51.0, 50.0], "0.1": [65.0], "1.0": [80.0]}
    assert out["length_curve"] == {
        "conmim": {"936": {"0.01": [60.0, 61.0], "0.1": [75.0]}, "2808": {"0.01": [63.0]}, "8424": {"0.01": [65.46]}}
    }
    assert out["references"] == {"raw_svm": {"0.01": [79.0, 80.0]}}
    assert out["best_of_sweep"]["conmim_s0"]["0.01"]["test_top1"] == 60.9  # chosen by validation, not by test
    plot_length_curve(out, tmp_path / "length_curve.png")
    with Image.open(tmp_path / "length_curve.png") as im:
        assert im.width > 400 and im.height > 300


def test_summary_removes_a_length_plot_that_no_fine_tuning_backs_any_more(tmp_path):
    from lab.summary import write_summary

    runs = [{"variant": v, "seed": 0, "fraction": 0.1, "linprobe_top1": 60.0} for v in ("conmim", "conmim_3x")]
    (tmp_path / "results.json").write_text(json.dumps({"runs": runs}))  # the 3x fine-tuning dropped (old recipe)
    stale = tmp_path / "length_curve.png"
    stale.write_bytes(b"an older recipe's plot")
    write_summary(tmp_path)
    assert json.loads((tmp_path / "label_efficiency_summary.json").read_text())["length_curve"] == {}
    assert not stale.exists()


def test_report_shows_the_validation_chosen_pixel_references_of_the_fractions_that_ran(tmp_path):
    from PIL import Image

    from lab.report import fraction_table, pixel_references, plot_bars

    records = tmp_path / "raw_pixels.jsonl"
    lines = [
        {"method": m, "fraction": f, "seed": s, "labels": int(60000 * f), "test_top1": t + s}
        for m, t in (("raw_svm", 79.0), ("raw_logreg", 78.0))
        for f in (0.01, 0.1)
        for s in (1, 0)
    ]
    records.write_text("".join(json.dumps(r) + "\n" for r in lines))
    refs = pixel_references(records, [0.01])
    assert [(r["variant"], r["fraction"], r["seeds"], r["test_top1"]["values"]) for r in refs] == [
        ("raw_logreg", 0.01, [0, 1], [78.0, 79.0]),
        ("raw_svm", 0.01, [0, 1], [79.0, 80.0]),
    ]
    row = {"variant": "scratch", "fraction": 0.01, "labels": 600, "seeds": [0]}
    row["finetune_top1"] = {"values": [57.4], "mean": 57.4, "std": None, "min": 57.4, "max": 57.4}
    table = fraction_table([row], {"scratch": "scratch"}, [0.01], "raw_pixels", 20, refs)
    assert "| scratch | 57.40 (1 seed) | — |" in table
    assert "| logistic regression | 78.50 ± 0.71 (78.00, 79.00) |" in table and "| RBF SVM | 79.50" in table
    assert "k-NN |" not in table and "10 %" not in table  # no k-NN record here; only the fraction that ran
    assert pixel_references(tmp_path / "absent.jsonl", [0.01]) == []
    plot_bars([row], {"scratch": "scratch"}, tmp_path / "bars.png", refs, "one fraction")  # the plot of one fraction
    with Image.open(tmp_path / "bars.png") as im:
        assert im.width > im.height > 300


def test_jobs_start_after_what_they_need_and_never_after_a_failure(tmp_path):
    from lab.device_study import Job, run_jobs

    def job(name: str, code: int, needs: list[str], priority: int = 0) -> Job:
        stamp = f"open({str(tmp_path / name)!r}, 'w').write(str(__import__('time').monotonic()))"
        return Job(name, [sys.executable, "-c", f"{stamp}; raise SystemExit({code})"], priority, needs)

    jobs = [job("a", 0, []), job("b", 3, []), job("c", 0, ["b"]), job("d", 0, ["a", "left_out"], 1)]
    run_jobs(jobs, tmp_path, slots=1, deadline=60, stop_at=120)
    assert [j.returncode for j in jobs] == [0, 3, -1, 0]
    assert not (tmp_path / "c").exists() and float((tmp_path / "d").read_text()) > float((tmp_path / "a").read_text())
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["a.log", "b.log", "d.log"]


def test_summary_reads_the_pretrained_starts_own_trials_beside_the_studys_recipe_sweep(tmp_path):
    from lab.summary import write_summary

    sweep = tmp_path / "recipe_sweep"
    sweep.mkdir()
    trials = [
        {"start": f"runs/x/{start}/pretrain", "fraction": 0.01, "val_top1": v, "test_top1": t, "passes": 152}
        | {"overrides": [f"finetune.base_lr={lr}"], "head_fit_passes": 20}
        for start, v, t, lr in (
            ("conmim_s0", 70.0, 69.0, "2e-3"),
            ("conmim_s0", 71.0, 68.0, "1e-3"),
            ("mae_s0", 72.0, 71.0, "2e-3"),
            ("mae_s0", 75.0, 74.0, "4e-3"),
        )
    ]
    del trials[-1]["head_fit_passes"]  # a trial of the tiled head fit does not count
    (sweep / "pretrained_trials.jsonl").write_text("".join(json.dumps(t) + "\n" for t in trials))
    records = tmp_path / "records"
    records.mkdir()
    run = {"variant": "conmim", "seed": 0, "fraction": 0.01, "finetune_top1": 69.0, "linprobe_top1": 60.0}
    results = {"study": {"recipe_sweep": str(sweep / "trials.jsonl")}, "runs": [run]}
    (records / "results.json").write_text(json.dumps(results))
    best = json.loads(write_summary(records).read_text())["best_of_sweep"]
    assert best["conmim_s0"]["0.01"]["test_top1"] == 68.0  # the best validation trial's, not the best test
    assert best["conmim_s0"]["0.01"]["overrides"] == ["finetune.base_lr=1e-3"]
    assert best["mae_s0"]["0.01"]["val_top1"] == 72.0


def test_report_lists_each_variants_values_in_seed_order_whatever_order_the_rows_came_in():
    from lab.report import aggregate, aggregate_fractions

    # rows from run folders come first and rows kept from the records after: seed 1 can precede seed 0
    runs = [
        {"variant": "conmim", "seed": 1, "fraction": 0.1, "labels": 60, "linprobe_top1": 71.0},
        {"variant": "conmim", "seed": 0, "fraction": 0.1, "labels": 60, "linprobe_top1": 72.0},
    ]
    (row,) = aggregate_fractions(runs, ["conmim"], [0.1])
    assert row["seeds"] == [0, 1] and row["linprobe_top1"]["values"] == [72.0, 71.0]
    (row,) = aggregate(runs, ["conmim"])
    assert row["seeds"] == [0, 1] and row["linprobe_top1"]["values"] == [72.0, 71.0]


def test_a_fine_tuning_recorded_before_the_head_fit_counted_passes_runs_again(tmp_path):
    """A stage whose recorded recipe has no ``head_fit_passes`` fitted its head for tiled epochs (the head fit's
    length then followed the passes to an epoch): it is superseded like any other change of recipe, and its
    row is kept in ``superseded.json`` before the stage is forgotten (no report need run first)."""
    from lab.study import _supersede_stale, finetune_recipe

    study, base = load_study("study_labels")
    study.records_dir = str(tmp_path / "records")
    cfg = variant_config(base, study.variants[0], 0, tmp_path, tmp_path)
    recipe = finetune_recipe(cfg, 152)
    assert recipe["head_fit_passes"] == cfg.finetune.probe_head_epochs == 20
    stages = Stages(tmp_path)
    stages.run("finetune_f0.01", lambda: {"top1": 70.0, "labels": 600, "steps": 9, "recipe": recipe})
    _supersede_stale(study, stages, "conmim", 0, 0.01, recipe)
    assert "finetune_f0.01" in stages.done  # the same recipe: kept
    assert not (tmp_path / "records" / "superseded.json").exists()
    tiled = {k: v for k, v in recipe.items() if k != "head_fit_passes"}
    stages.run("finetune_f0.1", lambda: {"top1": 80.0, "labels": 6000, "steps": 9, "recipe": tiled})
    (tmp_path / "finetune_f0.1").mkdir()
    _supersede_stale(study, stages, "conmim", 0, 0.1, recipe)
    assert "finetune_f0.1" not in Stages(tmp_path).done and (tmp_path / "finetune_f0.1.superseded").is_dir()
    (kept,) = json.loads((tmp_path / "records" / "superseded.json").read_text())["runs"]
    assert (kept["variant"], kept["seed"], kept["fraction"], kept["labels"]) == ("conmim", 0, 0.1, 6000)
    assert kept["finetune_top1"] == 80.0 and kept["finetune_recipe"] == tiled and kept["from_commit"]


def test_a_recorded_fine_tuning_that_a_rerun_here_replaced_under_a_new_recipe_is_kept_as_superseded(tmp_path):
    """The records hold a fine-tuning of an older recipe; on this machine the run folder lacked that stage
    and ran it again under the current recipe. The report shows the new one and keeps the old one whole."""
    from lab.study import finetune_recipe, run_study

    preset = (Path(__file__).parents[1] / "presets" / "study_labels.yaml").read_text()
    config = tmp_path / "study.yaml"
    config.write_text(
        preset.replace("runs/label_efficiency_cpu", str(tmp_path / "runs")).replace(
            "lab/records/label_efficiency_cpu", str(tmp_path / "records")
        )
    )
    study, base = load_study(config)
    scratch = next(v for v in study.variants if v.name == "scratch")
    now = finetune_recipe(*fraction_config(variant_config(base, scratch, 0, tmp_path, tmp_path), study, 0, scratch))
    old = {**now, "base_lr": now["base_lr"] * 2}
    row = {"variant": "scratch", "seed": 0, "fraction": 0.01, "labels": 600, "linprobe_top1": 31.0}
    recorded = {**row, "finetune_top1": 60.0, "finetune_steps": 9, "finetune_recipe": old, "seconds": {}}
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "results.json").write_text(json.dumps({"runs": [recorded]}))
    stages = Stages(tmp_path / "runs" / "scratch_s0")
    stages.run("linprobe_f0.01", lambda: {"top1": 31.0, "labels": 600})
    stages.run("finetune_f0.01", lambda: {"top1": 62.0, "labels": 600, "steps": 9, "recipe": now})

    run_study(config, report_only=True)
    (reported,) = json.loads((tmp_path / "records" / "results.json").read_text())["runs"]
    assert reported["finetune_top1"] == 62.0 and reported["finetune_recipe"] == now
    (kept,) = json.loads((tmp_path / "records" / "superseded.json").read_text())["runs"]
    assert kept["finetune_top1"] == 60.0 and kept["finetune_recipe"] == old
    run_study(config, report_only=True)  # kept once, however often the report is written
    assert len(json.loads((tmp_path / "records" / "superseded.json").read_text())["runs"]) == 1
