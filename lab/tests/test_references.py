"""Raw-pixel references on real Fashion-MNIST: settings chosen on validation images, records, skip on rerun."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conmim.config import ConfigError
from lab.references import main, run

SMALL_STUDY = """
study:
  seeds: [0, 1]
  train_images: 3000
  test_images: 1000
  label_fractions: [0.05, 1.0]
  variants: [{name: scratch, pretrain: false}]
"""


def test_references_choose_on_validation_score_the_test_split_and_skip_on_rerun(tmp_path, fashion_mnist_dir):
    preset, records = tmp_path / "study.yaml", tmp_path / "refs.jsonl"
    preset.write_text(SMALL_STUDY)
    assert main([str(preset), "--records", str(records)]) == 0
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    # fractions below 1 for both seeds, fraction 1 for the first only; every method each time
    assert sorted((r["method"], r["fraction"], r["seed"]) for r in rows) == sorted(
        (m, f, s) for m in ("raw_logreg", "raw_svm", "raw_knn") for f, s in ((0.05, 0), (0.05, 1), (1.0, 0))
    )
    for r in rows:
        assert r["test_images"] == 1000 and r["machine"]["cpu"] and r["commit"]
        assert 55 < r["test_top1"] <= 100, r  # far above the 10 % of chance on real garments
        if r["fraction"] < 1:
            assert r["labels"] == 150
            (name,) = r["chosen"]
            best = r["grid"][int(np.argmax([g["val_top1"] for g in r["grid"]]))]
            assert len(r["grid"]) > 1 and r["chosen"][name] == best[name]
    full_svm = next(r for r in rows if r["method"] == "raw_svm" and r["fraction"] == 1.0)
    small_svm = next(r for r in rows if r["method"] == "raw_svm" and r["fraction"] == 0.05 and r["seed"] == 0)
    assert full_svm["setting_from_fraction"] == 0.05 and full_svm["chosen"] == small_svm["chosen"]
    assert full_svm["labels"] == 3000
    # each seed draws its own labelled subset: the two seeds' fits differ somewhere
    by_seed = {s: [r["test_top1"] for r in rows if r["fraction"] == 0.05 and r["seed"] == s] for s in (0, 1)}
    assert by_seed[0] != by_seed[1]
    assert run(str(preset), ["raw_logreg", "raw_svm", "raw_knn"], records) == []  # all recorded: nothing reruns


def test_unknown_method_and_missing_protocol_are_refused(tmp_path):
    preset = tmp_path / "study.yaml"
    preset.write_text(SMALL_STUDY)
    with pytest.raises(ConfigError, match="unknown reference method.*allowed: raw_logreg, raw_svm, raw_knn"):
        run(str(preset), ["raw_forest"], tmp_path / "refs.jsonl")
    preset.write_text("study:\n  variants: [{name: scratch, pretrain: false}]\n")
    with pytest.raises(ConfigError, match="no study.label_fractions"):
        run(str(preset), ["raw_knn"], tmp_path / "refs.jsonl")
