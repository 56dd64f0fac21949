"""The study's report: ``results.json``, a Markdown table and PNG plots (needs matplotlib).

Aggregates per variant (mean, spread over seeds), so the table and the plots show the same numbers
as the JSON. Plots: pre-training loss and masked-patch retrieval accuracy against steps; top-1
bars with one dot per seed and the min-max range as the error bar. The label-efficiency protocol
aggregates per (variant, label fraction) instead and plots top-1 against the fraction of labels
(``label_efficiency.png``: the variants run on every seed), with the raw-pixel references as grey lines.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REFERENCE = "raw_pixels"  # the raw-pixel reference rows of a label-fraction report
# Raw-pixel classifiers with settings chosen on validation images (python -m lab.references), per fraction and seed
PIXEL_REFERENCES = Path("lab/records/references/raw_pixels.jsonl")
PIXEL_METHODS = {"raw_logreg": "logistic regression", "raw_svm": "RBF SVM", "raw_knn": "k-NN"}

METRIC_NAMES = {"finetune_top1": "fine-tune", "linprobe_top1": "linear probe", "knn_top1": "k-NN"}


def current_trials(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The recipe-sweep trials that count: those recording ``head_fit_passes``. A trial recorded without it
    fitted its head for a number of tiled epochs, so that fit's length followed the trial's evaluations."""
    return [r for r in rows if "head_fit_passes" in r]


def aggregate(runs: list[dict[str, Any]], order: list[str]) -> list[dict[str, Any]]:
    """Per variant in ``order``: seeds, and for each metric the values, mean, sample std, min and max."""
    rows = []
    for name in order:
        mine = sorted((r for r in runs if r["variant"] == name), key=lambda r: r["seed"])  # values in seed order
        if not mine:
            continue
        row: dict[str, Any] = {"variant": name, "seeds": [r["seed"] for r in mine]}
        for metric in METRIC_NAMES:
            values = [r[metric] for r in mine if metric in r]
            if values:
                row[metric] = {
                    "values": values,
                    "mean": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else None,
                    "min": min(values),
                    "max": max(values),
                }
        rows.append(row)
    return rows


def _stat(values: list[float]) -> dict[str, Any]:
    return {
        "values": values,
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
    }


def aggregate_fractions(runs: list[dict[str, Any]], order: list[str], fractions: list[float]) -> list[dict[str, Any]]:
    """Per variant in ``order`` and label fraction: labels, seeds, fine-tuning steps and each metric's
    values over seeds with mean, sample std, min and max."""
    rows = []
    for name in order:
        for fraction in fractions:
            mine = sorted(
                (r for r in runs if r["variant"] == name and r["fraction"] == fraction), key=lambda r: r["seed"]
            )
            if not mine:
                continue
            row: dict[str, Any] = {
                "variant": name,
                "fraction": fraction,
                "labels": mine[0]["labels"],
                "seeds": [r["seed"] for r in mine],
            }
            steps = sorted({r["finetune_steps"] for r in mine if "finetune_steps" in r})
            if steps:
                row["finetune_steps"] = steps[0] if len(steps) == 1 else steps
            for metric in METRIC_NAMES:
                values = [r[metric] for r in mine if metric in r]
                if values:
                    row[metric] = _stat(values)
            rows.append(row)
    return rows


def pixel_references(path: Path, fractions: list[float]) -> list[dict[str, Any]]:
    """One row per raw-pixel method of ``path`` and fraction: labels, seeds and ``test_top1`` over seeds."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    rows = []
    for method in PIXEL_METHODS:
        for fraction in fractions:
            mine = sorted(
                (r for r in records if r["method"] == method and r["fraction"] == fraction), key=lambda r: r["seed"]
            )
            if mine:
                rows.append(
                    {
                        "variant": method,
                        "fraction": fraction,
                        "labels": mine[0]["labels"],
                        "seeds": [r["seed"] for r in mine],
                        "test_top1": _stat([r["test_top1"] for r in mine]),
                    }
                )
    return rows


def _percent(fraction: float) -> str:
    return f"{100 * fraction:g} %"


def fraction_table(
    rows: list[dict[str, Any]],
    labels: dict[str, str],
    fractions: list[float],
    reference: str,
    knn_k: int,
    references: Sequence[dict[str, Any]] = (),
) -> str:
    """Fine-tune and linear-probe top-1 per fraction (variants, then the raw-pixel reference lines), the
    raw-pixel classifiers of ``references`` (see :func:`pixel_references`), then the k-NN top-1 of every
    encoder and of raw pixels."""
    cell = {(r["variant"], r["fraction"]): r for r in rows}
    counts = {r["fraction"]: r["labels"] for r in rows}
    names = [n for n in labels if n != reference and any((n, f) in cell for f in fractions)]

    def head(kinds: list[str]) -> list[str]:
        cols = [f"{kind} {_percent(f)} ({counts.get(f, 0):,} labels)" for f in fractions for kind in kinds]
        return ["| variant | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]

    def line(title: str, name: str, metrics: list[str | None]) -> str:
        cells = [_cell(cell.get((name, f), {}).get(m)) if m else "—" for f in fractions for m in metrics]
        return f"| {title} | " + " | ".join(cells) + " |"

    has_reference = any(r["variant"] == reference for r in rows)
    out = head(["fine-tune", "linear probe"])
    out += [line(labels[n], n, ["finetune_top1", "linprobe_top1"]) for n in names]
    if has_reference:
        out.append(line(f"raw pixels: k-NN (k={knn_k}, cosine)", reference, [None, "knn_top1"]))
        out.append(line("raw pixels: linear (BatchNorm + linear head)", reference, [None, "linprobe_top1"]))
    single = [_percent(f) for f in fractions if f >= 1]
    text = (
        "Top-1 (%) on the test split: mean ± sample std over seeds (the seeds' values)"
        + (f"; {single[0]} of the labels ran for the seeds each cell names" if single else "")
        + (". Raw-pixel rows: the named classifier on flattened normalised pixels" if has_reference else "")
        + ".\n\n"
        + "\n".join(out)
        + "\n"
    )
    if references:
        cell.update({(r["variant"], r["fraction"]): r for r in references})
        pixel = head(["test top-1"])
        pixel += [
            line(title, m, ["test_top1"])
            for m, title in PIXEL_METHODS.items()
            if any(r["variant"] == m for r in references)
        ]
        text += (
            "\nRaw pixels (28 x 28 in [0, 1]), each classifier's setting chosen on validation images "
            f"({PIXEL_REFERENCES}):\n\n" + "\n".join(pixel) + "\n"
        )
    if any("knn_top1" in r for r in rows):
        knn = head(["k-NN"])
        knn += [
            line(labels[n], n, ["knn_top1"])
            for n in names + ([reference] if reference in labels else [])
            if any("knn_top1" in cell.get((n, f), {}) for f in fractions)
        ]
        text += (
            f"\nk-NN top-1 (%) of the frozen features (k={knn_k}, cosine; the labelled images are the bank):\n\n"
            + "\n".join(knn)
            + "\n"
        )
    return text


def plot_label_efficiency(
    rows: list[dict[str, Any]],
    labels: dict[str, str],
    fractions: list[float],
    reference: str,
    path: Path,
    references: Sequence[dict[str, Any]] = (),
) -> None:
    """Top-1 against the fraction of labels (log x): per variant fine-tuning (solid) and linear probe
    (dashed), mean over seeds with min-max error bars; raw pixels (the study's own k-NN and linear head,
    and the classifiers of ``references``) in grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5.2))
    names = [n for n in labels if n != reference]
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    styles = [(n, "finetune_top1", "fine-tune", {"color": colors[n], "ls": "-", "marker": "o"}) for n in names]
    styles += [
        (n, "linprobe_top1", "linear probe", {"color": colors[n], "ls": "--", "marker": "s", "alpha": 0.8})
        for n in names
    ]
    styles += [
        (reference, "knn_top1", "k-NN", {"color": "0.45", "ls": ":", "marker": "^"}),
        (reference, "linprobe_top1", "linear", {"color": "0.6", "ls": "-.", "marker": "v"}),
    ]
    greys = ("0.2", "0.4", "0.6")
    styles += [
        (m, "test_top1", title, {"color": grey, "ls": ":", "marker": "x"})
        for (m, title), grey in zip(PIXEL_METHODS.items(), greys, strict=True)
    ]
    values = []
    for name, metric, kind, style in styles:
        points = [(r["fraction"], r[metric]) for r in [*rows, *references] if r["variant"] == name and metric in r]
        if not points:
            continue
        points.sort()
        xs = [x for x, _ in points]
        means = [s["mean"] for _, s in points]
        err = [[s["mean"] - s["min"] for _, s in points], [s["max"] - s["mean"] for _, s in points]]
        values += [v for _, s in points for v in s["values"]]
        title = f"raw pixels: {kind}" if name in (reference, *PIXEL_METHODS) else f"{labels[name]}: {kind}"
        ax.errorbar(xs, means, yerr=err, capsize=3, lw=1.5, ms=4, label=title, **style)
    counts = {r["fraction"]: r["labels"] for r in rows}
    ax.set_xscale("log")
    ax.set_xticks(fractions, [f"{_percent(f)}\n({counts[f]:,})" if f in counts else _percent(f) for f in fractions])
    ax.minorticks_off()
    if values:
        ax.set_ylim(max(0.0, min(values) - 3), min(100.0, max(values) + 2))
    ax.set(
        xlabel="fraction of the training labels (class-balanced subset; labelled images)",
        ylabel="top-1 on the test split (%)",
        title="Fashion-MNIST label efficiency: mean over seeds, bars = min-max",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: no line hidden
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_fraction_report(summary: dict[str, Any], study, out: Path) -> dict[str, Path]:
    """The label-efficiency protocol's results.json, table.md, label_efficiency.png and pretrain_curves.png."""
    docs = Path(study.records_dir)
    docs.mkdir(parents=True, exist_ok=True)
    fractions = list(study.label_fractions)
    labels = {v.name: v.label or v.name for v in study.variants}
    if study.references:
        labels[REFERENCE] = "raw pixels"
    objectives = {v.name: loss_kind(v.overrides) for v in study.variants}
    rows = aggregate_fractions(summary["runs"], list(labels), fractions)
    missing = [f"{name}_s{seed} {_percent(fraction)}" for name, seed, fraction in summary["not_run"]]
    paths = {
        "json": docs / "results.json",
        "table": docs / "table.md",
        "plot": docs / "label_efficiency.png",
        "curves": docs / "pretrain_curves.png",
    }
    paths["json"].write_text(json.dumps({**summary, "aggregate": rows}, indent=2) + "\n")
    knn_k = summary.get("base", {}).get("eval", {}).get("knn_k", 20)
    fractions = [f for f in fractions if any(r["fraction"] == f for r in rows)]  # a study in parts: what ran
    references = pixel_references(PIXEL_REFERENCES, fractions)
    table = fraction_table(rows, labels, fractions, REFERENCE, knn_k, references)
    if missing:
        table += f"\nNot finished when this report was written: {', '.join(missing)}\n"
    paths["table"].write_text(table)
    if len(fractions) == 1:  # one fraction: bars per variant, not a column of points
        title = f"Fashion-MNIST, {_percent(fractions[0])} of the labels: mean over seeds, dots = seeds, bars = min-max"
        plot_bars(rows, labels, paths["plot"], references, title)
    else:
        # the variants run on every seed (a layout among them); a length has its own table rows and plot
        compared = {v.name for v in study.variants if set(study.seeds) <= set(v.seeds or study.seeds)} | {REFERENCE}
        plotted = {name: label for name, label in labels.items() if name in compared}
        plot_label_efficiency(rows, plotted, fractions, REFERENCE, paths["plot"], references)
    plot_curves(read_curves(out, summary["runs"], docs / "pretrain"), objectives, paths["curves"])
    for key in read_curves(out, summary["runs"]):
        keep_pretraining(out / key / "pretrain", docs / "pretrain" / key)
    return paths


def _cell(stat: dict[str, Any] | None) -> str:
    if not stat:
        return "—"
    if len(stat["values"]) == 1:
        return f"{stat['mean']:.2f} (1 seed)"
    return f"{stat['mean']:.2f} ± {stat['std']:.2f} ({', '.join(f'{v:.2f}' for v in stat['values'])})"


def markdown_table(rows: list[dict[str, Any]], labels: dict[str, str]) -> str:
    lines = [
        "| variant | seeds | " + " | ".join(f"{m} top-1 (%)" for m in METRIC_NAMES.values()) + " |",
        "|---|---|" + "---|" * len(METRIC_NAMES),
    ]
    for row in rows:
        cells = [_cell(row.get(metric)) for metric in METRIC_NAMES]
        lines.append(
            f"| {labels.get(row['variant'], row['variant'])} | {len(row['seeds'])} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def keep_pretraining(run: Path, keep: Path) -> None:
    """A pre-training's ``config.yaml`` and ``metrics.jsonl`` copied into the records: its loss and
    retrieval curve stay with the results when the run folder is gone."""
    keep.mkdir(parents=True, exist_ok=True)
    for name in ("config.yaml", "metrics.jsonl"):
        (keep / name).write_text((run / name).read_text())


def read_curves(out: Path, runs: list[dict[str, Any]], kept: Path | None = None) -> dict[str, list[dict[str, Any]]]:
    """``metrics.jsonl`` of each finished pre-training, keyed ``variant_sSEED``; from the copy under
    ``kept`` (see keep_pretraining) where the run folder holds none (gone, or a pre-training under way)."""
    curves = {}
    for r in runs:
        key = f"{r['variant']}_s{r['seed']}"
        stages = out / key / "stages.json"
        if stages.is_file() and "pretrain" in json.loads(stages.read_text()):
            path = out / key / "pretrain" / "metrics.jsonl"
        elif kept is not None:
            path = kept / key / "metrics.jsonl"
        else:
            continue
        if path.is_file():
            curves[key] = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return curves


def loss_kind(overrides: list[str]) -> str:
    """Which loss a variant's pre-training curve shows: ``pixel`` (pixel and MAE objectives) or ``conmim``."""
    pixel = {"model.objective=pixel", "model.objective=mae"}
    return "pixel" if pixel.intersection(overrides) else "conmim"


def plot_curves(curves: dict[str, list[dict[str, Any]]], objectives: dict[str, str], path: Path) -> None:
    """Contrastive loss, pixel loss and retrieval accuracy against the pre-training step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = {v: plt.get_cmap("tab10")(i % 10) for i, v in enumerate(objectives)}  # one colour per variant
    for key, records in sorted(curves.items()):
        records = [r for r in records if "loss" in r]
        steps = [r["step"] for r in records]
        variant, seed = key.rsplit("_s", 1)
        style = {"label": key, "lw": 1.2, "color": colors.get(variant), "ls": "-" if seed == "0" else "--"}
        loss_ax = axes[1] if objectives.get(variant) == "pixel" else axes[0]
        loss_ax.plot(steps, [r["loss"] for r in records], **style)
        axes[2].plot(steps, [100 * r["retrieval_acc"] for r in records], **style)
    axes[0].set(title="ConMIM variants: denoising-contrast loss", xlabel="pre-training step", ylabel="InfoNCE loss")
    axes[1].set(title="pixel baseline: normalised-pixel MSE", xlabel="pre-training step", ylabel="MSE")
    axes[2].set(title="masked-patch retrieval accuracy", xlabel="pre-training step", ylabel="accuracy (%)")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bars(
    rows: list[dict[str, Any]],
    labels: dict[str, str],
    path: Path,
    references: Sequence[dict[str, Any]] = (),
    title: str = "Fashion-MNIST study: mean over seeds, dots = seeds, bars = min-max",
) -> None:
    """Grouped top-1 bars per variant: the mean, one dot per seed, min-max as the error bar; the raw-pixel
    classifiers of ``references`` (one fraction) as grey horizontal lines at their mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in METRIC_NAMES if any(m in row for row in rows)]
    width = 0.8 / max(len(metrics), 1)
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(rows)) + 3, 4.8))
    for i, metric in enumerate(metrics):
        xs, means, low, high = [], [], [], []
        for j, row in enumerate(rows):
            if metric not in row:
                continue
            stat, x = row[metric], j + (i - (len(metrics) - 1) / 2) * width
            xs.append(x)
            means.append(stat["mean"])
            low.append(stat["mean"] - stat["min"])
            high.append(stat["max"] - stat["mean"])
            ax.scatter([x] * len(stat["values"]), stat["values"], color="black", s=8, zorder=3)
        ax.bar(xs, means, width, yerr=[low, high], capsize=3, label=METRIC_NAMES[metric])
    ax.set_xticks(
        range(len(rows)), [labels.get(r["variant"], r["variant"]) for r in rows], rotation=25, ha="right", fontsize=8
    )
    for ref, grey in zip(references, ("0.2", "0.4", "0.6"), strict=False):
        mean = ref["test_top1"]["mean"]
        ax.axhline(mean, color=grey, ls=":", lw=1.2, label=f"raw pixels: {PIXEL_METHODS[ref['variant']]} ({mean:.1f})")
    values = [v for row in rows for m in metrics if m in row for v in row[m]["values"]]
    values += [ref["test_top1"]["mean"] for ref in references]
    if values:
        ax.set_ylim(max(0.0, min(values) - 5), min(100.0, max(values) + 3))
    ax.set(ylabel="top-1 on the test images (%)", title=title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: no line hidden
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(summary: dict[str, Any], study, out: Path) -> dict[str, Path]:
    """Write results.json, table.md and the two PNGs into ``study.records_dir``; returns their paths."""
    if getattr(study, "label_fractions", None):
        return write_fraction_report(summary, study, out)
    docs = Path(study.records_dir)
    docs.mkdir(parents=True, exist_ok=True)
    order = [v.name for v in study.variants]
    labels = {v.name: v.label or v.name for v in study.variants}
    objectives = {v.name: loss_kind(v.overrides) for v in study.variants}
    rows = aggregate(summary["runs"], order)
    done = {(r["variant"], r["seed"]) for r in summary["runs"]}
    missing = [f"{v.name}_s{s}" for v in study.variants for s in (v.seeds or study.seeds) if (v.name, s) not in done]
    paths = {
        "json": docs / "results.json",
        "table": docs / "table.md",
        "curves": docs / "pretrain_curves.png",
        "bars": docs / "accuracy_bars.png",
    }
    paths["json"].write_text(json.dumps({**summary, "aggregate": rows}, indent=2) + "\n")
    table = markdown_table(rows, labels)
    if missing:
        table += f"\nNot finished when this report was written: {', '.join(missing)}\n"
    paths["table"].write_text(table)
    plot_curves(read_curves(out, summary["runs"]), objectives, paths["curves"])
    plot_bars(rows, labels, paths["bars"])
    return paths
