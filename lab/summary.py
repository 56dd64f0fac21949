"""``label_efficiency_summary.json``: the label-efficiency numbers once, one value per seed.

    python -m lab.summary [lab/records/study_labels_gpu]

Reads the study's ``results.json`` (every run of the study's report), the raw-pixel references
(``lab/records/references/raw_pixels.jsonl``) and, where there are any, the pre-trained starts' own
recipe-sweep trials (``pretrained_trials.jsonl`` beside the study's ``recipe_sweep`` records), and writes beside the
results: ``finetune`` and ``linear`` (variant -> fraction -> top-1 per seed, test split), ``references``
(raw_logreg, raw_svm, raw_knn), ``length_curve`` (method -> pre-training steps -> fraction -> top-1 per
seed: the 1x run and its ``_3x`` / ``_9x`` variants) and ``best_of_sweep`` (start -> fraction -> the test
top-1 of its best validation trial, with that trial's overrides; a trial recorded without ``head_fit_passes``
fitted the head for tiled epochs and does not count). Keys of fractions are ``str(fraction)``.
Once a longer pre-training has a fine-tuning, ``length_curve.png`` plots the length curve.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lab.report import PIXEL_REFERENCES, current_trials

BASE_STEPS = 936  # the built-in default pre-training, which the 1x variants run
LENGTHS = {"": 1, "_3x": 3, "_9x": 9}


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _per_seed(rows: list[dict[str, Any]], key: str) -> dict[str, dict[str, list[float]]]:
    """variant -> str(fraction) -> the values of ``key``, in seed order."""
    out: dict[str, dict[str, list[float]]] = {}
    for r in sorted(rows, key=lambda r: (r["variant"], r["fraction"], r["seed"])):
        if key in r:
            out.setdefault(r["variant"], {}).setdefault(str(r["fraction"]), []).append(round(r[key], 2))
    return out


def summarize(results: dict[str, Any], references: list[dict], own_sweeps: list[dict]) -> dict[str, Any]:
    runs = [r for r in results["runs"] if r["variant"] != "raw_pixels"]
    finetune, linear = _per_seed(runs, "finetune_top1"), _per_seed(runs, "linprobe_top1")
    longer = _length_variants(finetune)
    curve = {
        name: {
            str(BASE_STEPS * factor): {f: v for f, v in finetune[name + suffix].items() if float(f) < 1}
            for suffix, factor in LENGTHS.items()
            if name + suffix in finetune
        }
        for name in sorted(finetune)
        if name not in longer and any(name + s in longer for s in LENGTHS)
    }
    refs: dict[str, dict[str, list[float]]] = {}
    for r in sorted(references, key=lambda r: (r["method"], r["fraction"], r["seed"])):
        refs.setdefault(r["method"], {}).setdefault(str(r["fraction"]), []).append(r["test_top1"])
    best: dict[str, dict[str, Any]] = {}
    for r in current_trials(own_sweeps):
        start = Path(r["start"]).parent.name  # runs/.../conmim_s0/pretrain -> conmim_s0
        kept = best.setdefault(start, {}).get(str(r["fraction"]))
        if kept is None or r["val_top1"] > kept["val_top1"]:
            best[start][str(r["fraction"])] = {k: r[k] for k in ("val_top1", "test_top1", "overrides", "passes")}
    return {
        "finetune": {k: v for k, v in finetune.items() if k not in longer},
        "linear": {k: v for k, v in linear.items() if k not in longer},
        "references": refs,
        "length_curve": curve,
        "best_of_sweep": best,
    }


def plot_length_curve(summary: dict[str, Any], path: Path) -> None:
    """Fine-tune top-1 against pre-training steps, one panel per label fraction: a line per method through
    its seeds' means (dots: the seeds), scratch and the raw-pixel classifiers as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = summary["length_curve"]
    fractions = sorted({f for curve in curves.values() for at in curve.values() for f in at}, key=float)
    fig, axes = plt.subplots(1, len(fractions), figsize=(6 * len(fractions), 4.5), squeeze=False)
    for ax, fraction in zip(axes[0], fractions, strict=True):
        for method, curve in curves.items():
            points = [(int(steps), at.get(fraction)) for steps, at in sorted(curve.items(), key=lambda kv: int(kv[0]))]
            points = [(steps, values) for steps, values in points if values]
            for steps, values in points:
                ax.scatter([steps] * len(values), values, color="black", s=8, zorder=3)
            ax.plot([s for s, _ in points], [sum(v) / len(v) for _, v in points], marker="o", label=method)
        lines = {"scratch": summary["finetune"].get("scratch", {}).get(fraction)}
        lines |= {name: values.get(fraction) for name, values in summary["references"].items()}
        for (name, values), color in zip(lines.items(), ("black", "tab:red", "tab:purple", "tab:brown"), strict=False):
            if values:
                mean = sum(values) / len(values)
                ax.axhline(mean, color=color, ls="--", lw=1.0, label=f"{name} ({mean:.1f})")
        steps = sorted({int(s) for curve in curves.values() for s in curve})
        ax.set_xscale("log")
        ax.set_xticks(steps, [str(s) for s in steps])
        ax.minorticks_off()
        ax.set(xlabel="pre-training steps (batch 128)", ylabel="fine-tune top-1 on the test images (%)")
        ax.set_title(f"{float(fraction) * 100:g} % of the labels")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _length_variants(table: dict[str, Any]) -> set[str]:
    return {v for v in table if any(v.endswith(s) for s in LENGTHS if s)}


def write_summary(records_dir: str | Path) -> Path:
    records_dir = Path(records_dir)
    results = json.loads((records_dir / "results.json").read_text())
    sweep = results.get("study", {}).get("recipe_sweep")
    own_sweeps = _lines(Path(sweep).with_name("pretrained_trials.jsonl")) if sweep else []
    summary = summarize(results, _lines(PIXEL_REFERENCES), own_sweeps)
    out = records_dir / "label_efficiency_summary.json"
    out.write_text(json.dumps(summary, indent=1) + "\n")
    plot = records_dir / "length_curve.png"
    if any(len(curve) > 1 for curve in summary["length_curve"].values()):
        plot_length_curve(summary, plot)
    else:  # no longer pre-training has a fine-tuning of the current recipe: an older plot would contradict the summary
        plot.unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("records_dir", nargs="?", default="lab/records/study_labels_gpu")
    args = parser.parse_args(argv)
    if not (Path(args.records_dir) / "results.json").is_file():
        print(
            f"lab.summary: error: no results.json in {args.records_dir} (write the study's report first)",
            file=sys.stderr,
        )
        return 2
    print(write_summary(args.records_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
