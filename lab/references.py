"""Raw-pixel reference lines of the label-efficiency study: logistic regression, an RBF SVM and k-NN.

    python -m lab.references [study_labels] [--methods raw_logreg,raw_svm,raw_knn]

A classifier on the raw pixels is the floor any pre-trained encoder has to clear. For every seed and
label fraction of the study preset the labelled images are the study's class-balanced subset
(:func:`lab.study.balanced_subset`, same seed); each method's hyper-parameters are chosen on the recipe
sweep's validation images (500 a class from the training images outside the seed's largest
fraction below 1, :func:`lab.sweep.validation_indices`), the test split is read once, by the chosen
setting. At fraction 1 the grid is fitted on the training images without the validation ones, and
the chosen setting is refitted on all of them. Pixels are scaled to [0, 1] at their native size
(Fashion-MNIST: 28 x 28); logistic regression also standardises each pixel. One JSON line per (method,
fraction, seed) in ``lab/records/references/raw_pixels.jsonl``: the grid's validation top-1, the
choice, the test top-1, the seconds, the machine and the commit; a line already there is skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from conmim.config import ConfigError
from conmim.data.sources import FASHION_MNIST_DIR
from lab.provenance import commit, machine
from lab.study import balanced_subset, load_study, study_splits
from lab.sweep import validation_indices

log = logging.getLogger("lab.references")
RECORDS = Path("lab/records/references/raw_pixels.jsonl")


def _logreg(c: float) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))


def _svm(c: float) -> Any:
    from sklearn.svm import SVC

    return SVC(C=c, kernel="rbf", gamma="scale")


def _knn(k: int) -> Any:
    from sklearn.neighbors import KNeighborsClassifier

    return KNeighborsClassifier(n_neighbors=k, weights="distance")


# method -> (the hyper-parameter's name, its grid, the classifier it makes)
METHODS: dict[str, tuple[str, list[float], Callable[[Any], Any]]] = {
    "raw_logreg": ("C", [1e-3, 1e-2, 1e-1, 1.0], _logreg),
    "raw_svm": ("C", [1.0, 10.0, 100.0], _svm),
    "raw_knn": ("k", [1, 5, 10, 20], _knn),
}
# An RBF SVM's fit grows with the square of the images or worse (~40 s for 6,000 here, one core; a grid on
# 55,000 would take hours): at fraction 1 it takes the setting its own grid chose at the largest fraction below 1.
REUSE_AT_FULL = {"raw_svm"}


def pixels(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


def top1(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    return round(100.0 * float(np.mean(model.predict(x) == y)), 2)


def reference(
    method: str,
    x: np.ndarray,
    y: np.ndarray,
    labelled: np.ndarray,
    val: np.ndarray,
    test: tuple[np.ndarray, ...],
    grid: list[float] | None = None,
) -> dict[str, Any]:
    """Choose ``method``'s setting on ``val`` (of ``grid``, default its own; a single value is taken as it
    is), then fit on ``labelled`` and score the test split once."""
    name, own_grid, make = METHODS[method]
    grid = grid or own_grid
    start = time.perf_counter()
    tune = np.setdiff1d(labelled, val)  # at fraction 1 the labelled images include the validation ones
    scores = [top1(make(v).fit(x[tune], y[tune]), x[val], y[val]) for v in grid] if len(grid) > 1 else [None]
    chosen = grid[int(np.argmax([s or 0 for s in scores]))]
    model = make(chosen).fit(x[labelled], y[labelled])
    return {
        "method": method,
        "labels": len(labelled),
        "val_images": len(val),
        "grid": [{name: v, "val_top1": s} for v, s in zip(grid, scores, strict=True)],
        "chosen": {name: chosen},
        "test_top1": top1(model, *test),
        "test_images": len(test[1]),
        "seconds": round(time.perf_counter() - start, 1),
    }


def run(preset: str, methods: list[str], records: Path = RECORDS, fashion_root: str = FASHION_MNIST_DIR) -> list[dict]:
    study, _base = load_study(preset)
    if not study.label_fractions:
        raise ConfigError(f"study preset {preset!r} has no study.label_fractions: no label-efficiency protocol")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ConfigError(f"unknown reference method(s) {', '.join(unknown)}; allowed: {', '.join(METHODS)}")
    train, test = study_splits(study, fashion_root)
    x, y = pixels(train.images), np.asarray(train.labels)
    test_xy = (pixels(test.images), np.asarray(test.labels))
    rows_done = [json.loads(line) for line in records.read_text().splitlines()] if records.is_file() else []
    done = {r["key"]: r for r in rows_done}
    records.parent.mkdir(parents=True, exist_ok=True)
    below_one = [f for f in study.label_fractions if f < 1] or study.label_fractions
    rows = []
    for i, seed in enumerate(study.seeds):
        largest = balanced_subset(train, max(below_one), seed)
        val = validation_indices(train, largest, 500, seed)
        for fraction in study.label_fractions:
            if fraction >= 1 and i > 0:  # fraction 1 is the same subset for every seed: the first seed only
                continue
            for method in methods:
                key = json.dumps([method, fraction, seed])
                if key in done:
                    continue
                log.info("%s, fraction %g, seed %d", method, fraction, seed)
                labelled = balanced_subset(train, fraction, seed)
                row, grid = {"key": key, "fraction": fraction, "seed": seed}, None
                if fraction >= 1 and method in REUSE_AT_FULL:
                    source = done.get(json.dumps([method, max(below_one), seed]))
                    if source is None:
                        raise ConfigError(f"{method} at fraction 1 needs its run at fraction {max(below_one)} first")
                    grid, row["setting_from_fraction"] = list(source["chosen"].values()), max(below_one)
                row |= reference(method, x, y, labelled, val, test_xy, grid)
                row |= {"machine": machine(), "commit": commit()}
                with records.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                rows.append(row)
                done[key] = row
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.references", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", default="study_labels", help="study YAML file or lab preset name")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--records", type=Path, default=RECORDS, help="the JSON-lines file the rows go to")
    parser.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads (default 1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        from threadpoolctl import threadpool_limits  # scikit-learn's own dependency

        with threadpool_limits(args.threads):  # one thread: the 2-core machine keeps a core for other work
            rows = run(args.config, [m for m in args.methods.split(",") if m], args.records)
    except (ConfigError, ImportError) as err:
        print(f"lab.references: error: {err}", file=sys.stderr)
        return 2
    for r in rows:
        print(
            f"{r['method']} fraction {r['fraction']:g} seed {r['seed']}: {r['chosen']} test top-1 {r['test_top1']:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
