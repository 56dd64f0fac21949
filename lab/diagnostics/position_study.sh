#!/usr/bin/env bash
# The position-signal comparison of docs/results.md: the built-in preset for 240 steps with each
# choice of BEiT position parameters, one torch thread each, then the retrieval plot.
# Usage: bash lab/diagnostics/position_study.sh [RUNS_DIR]   (default runs/position; about 4 minutes a
# variant on an idle 2-core machine, resumable: a finished variant is skipped)
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${1:-runs/position}
export OMP_NUM_THREADS=1
for variant in "none zero" "none locality" "mask_sincos locality" "mask_sincos zero" "sincos zero" \
               "sincos_fixed zero"; do
  set -- $variant
  out="$RUNS/$1_$2"
  [ -f "$out/checkpoints/last.pt" ] && grep -q '"step": 240' "$out/metrics.jsonl" && continue
  .venv/bin/conmim pretrain model.pos_embed="$1" model.rel_pos_init="$2" train.max_steps=240 \
    eval.final_knn=false eval.monitor_every=80 output_dir="$out"
done
.venv/bin/python -m lab.diagnostics.plot_position_study "$RUNS" lab/records/position
