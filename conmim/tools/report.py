"""The study's report: ``results.json``, a Markdown table and two PNG plots (needs matplotlib).

Aggregates per variant (mean, spread over seeds), so the table and the bars show the same numbers
as the JSON. Plots: pre-training loss and masked-patch retrieval accuracy against steps; top-1
bars with one dot per seed and the min-max range as the error bar.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

METRIC_NAMES = {"finetune_top1": "fine-tune", "linprobe_top1": "linear probe", "knn_top1": "k-NN"}


def aggregate(runs: list[dict[str, Any]], order: list[str]) -> list[dict[str, Any]]:
    """Per variant in ``order``: seeds, and for each metric the values, mean, sample std, min and max."""
    rows = []
    for name in order:
        mine = [r for r in runs if r["variant"] == name]
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


def read_curves(out: Path, runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """``metrics.jsonl`` of each pre-trained run, keyed ``variant_sSEED``."""
    curves = {}
    for r in runs:
        key = f"{r['variant']}_s{r['seed']}"
        path = out / key / "pretrain" / "metrics.jsonl"
        if path.is_file():
            curves[key] = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return curves


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


def plot_bars(rows: list[dict[str, Any]], labels: dict[str, str], path: Path) -> None:
    """Grouped top-1 bars per variant: the mean, one dot per seed, min-max as the error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in METRIC_NAMES if any(m in row for row in rows)]
    width = 0.8 / max(len(metrics), 1)
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(rows)), 4.8))
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
    values = [v for row in rows for m in metrics if m in row for v in row[m]["values"]]
    if values:
        ax.set_ylim(max(0.0, min(values) - 5), min(100.0, max(values) + 3))
    ax.set(
        ylabel="top-1 on the test subset (%)",
        title="Fashion-MNIST study: mean over seeds, dots = seeds, bars = min-max",
    )
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(summary: dict[str, Any], study, out: Path) -> dict[str, Path]:
    """Write results.json, table.md and the two PNGs into ``study.docs_dir``; returns their paths."""
    docs = Path(study.docs_dir)
    docs.mkdir(parents=True, exist_ok=True)
    order = [v.name for v in study.variants]
    labels = {v.name: v.label or v.name for v in study.variants}
    objectives = {v.name: "pixel" if "model.objective=pixel" in v.overrides else "conmim" for v in study.variants}
    rows = aggregate(summary["runs"], order)
    done = {(r["variant"], r["seed"]) for r in summary["runs"]}
    missing = [f"{v.name}_s{s}" for v in study.variants for s in (v.seeds or study.seeds) if (v.name, s) not in done]
    paths = {
        "json": docs / "results.json",
        "table": docs / "table.md",
        "curves": docs / "pretrain_curves.png",
        "bars": docs / "accuracy_bars.png",
    }
    paths["json"].write_text(json.dumps({**summary, "aggregate": rows, "not_run": missing}, indent=2) + "\n")
    table = markdown_table(rows, labels)
    if missing:
        table += f"\nNot finished when this report was written: {', '.join(missing)}\n"
    paths["table"].write_text(table)
    plot_curves(read_curves(out, summary["runs"]), objectives, paths["curves"])
    plot_bars(rows, labels, paths["bars"])
    return paths
