"""Retrieval accuracy and online k-NN against the step for each run of lab/diagnostics/position_study.sh.

    python -m lab.diagnostics.plot_position_study RUNS_DIR OUT_DIR

Writes OUT_DIR/retrieval.png and OUT_DIR/position_study.json (per run: the logged records).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(runs: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    curves = {}
    for metrics in sorted(runs.glob("*/metrics.jsonl")):
        curves[metrics.parent.name] = [json.loads(line) for line in metrics.read_text().splitlines() if line]
    fig, (acc_ax, knn_ax) = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, records in curves.items():
        logged = [r for r in records if "retrieval_acc" in r]
        acc_ax.plot([r["step"] for r in logged], [100 * r["retrieval_acc"] for r in logged], label=name)
        knn = [r for r in records if "knn_top1" in r]
        knn_ax.plot([r["step"] for r in knn], [r["knn_top1"] for r in knn], marker="o", label=name)
    acc_ax.axhline(100 / 64, color="grey", ls=":", label="chance (1/64)")
    acc_ax.set(xlabel="pre-training step", ylabel="masked-patch retrieval accuracy (%)", yscale="log")
    knn_ax.set(xlabel="pre-training step", ylabel="online k-NN top-1 (%) (1,000 bank, 500 queries)")
    for ax in (acc_ax, knn_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("pos_embed_rel_pos_init: built-in preset, 240 steps")
    fig.tight_layout()
    fig.savefig(out / "retrieval.png", dpi=110)
    (out / "position_study.json").write_text(json.dumps(curves, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
