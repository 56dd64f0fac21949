#!/usr/bin/env bash
# The GPU benchmark for one H100: ViT-S/16 and ViT-B/16 model steps at 224 px, batch 128, bf16 +
# torch.compile, and ViT-S end to end from JPEG files with the device data path and 16 workers; every
# configuration next to the plain eager fp32 step. About 5 minutes; the per-part time limits
# (140 + 170 + 140 s, a fourth part only before 360 s) keep it under 8 minutes in all.
#
# Run it from an environment with the project installed (pip install -e .): bash benchmarks/gpu_h100.sh
# Results: benchmarks/results/gpu_h100/*.jsonl (or $OUT/gpu_h100/ when OUT is set), logs beside
# them, a table last. See docs/benchmarks.md.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
RES=${OUT:-benchmarks/results}/gpu_h100
mkdir -p "$RES"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv \
  | tee "$RES/nvidia-smi.txt"
$PY -c "import torch, torchvision, timm, omegaconf; print('torch', torch.__version__, 'torchvision', \
torchvision.__version__, 'timm', timm.__version__, 'omegaconf', omegaconf.__version__, torch.cuda.get_device_name())" \
  | tee "$RES/versions.txt" || exit 1

run() {  # run NAME LIMIT_S OVERRIDES...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$PY" -m conmim.cli bench --config bench_vit_s16 "$@" > "$RES/$name.jsonl" 2> "$RES/$name.log"
  echo "$name: rc=$? in $((SECONDS - start)) s" | tee -a "$RES/runs.txt"
}
run vit_s_synthetic 140 bench.steps=60 bench.warmup=5
run vit_b_synthetic 170 model.arch=vit_base bench.steps=45 bench.warmup=5
run vit_s_jpeg_device 140 bench.data=jpeg bench.jpeg_images=512 data.gpu_aug=true bench.steps=45 bench.warmup=5
if (( SECONDS < 360 )); then  # the fast step fed by the CPU data path, if time is left
  run vit_s_jpeg_cpu 90 bench.data=jpeg bench.jpeg_images=512 data.gpu_aug=false bench.steps=30 bench.warmup=3
fi
echo "total ${SECONDS} s"
$PY benchmarks/summarize.py "$RES"/*.jsonl
