#!/usr/bin/env bash
# The CPU figures of docs/benchmarks.md, on this project's 2-core machine (no GPU). Appends one JSON
# line per variant to benchmarks/results/cpu.jsonl. Several minutes per command on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/cpu.jsonl
mkdir -p "$(dirname "$out")"
run() { echo "+ conmim bench $*" >&2; "${PYTHON:-python}" -m conmim.cli bench "$@" | tee -a "$out"; }
vit_s="--config bench_vit_s16 train.batch_size=8 data.num_workers=1 bench.warmup=2 bench.steps=6 bench.repeats=3"
# ViT-S/16 224, model step (synthetic): bf16 eager SDPA; fp32 eager SDPA; bf16 + torch.compile (inductor)
run $vit_s train.compile=false precision=bf16
run $vit_s train.compile=false precision=fp32
run $vit_s train.compile=true precision=bf16
# ViT-S/16 224 from JPEG files: device data path (run on the CPU here) + bf16 vs CPU data path + plain step
run $vit_s train.compile=false precision=bf16 bench.data=jpeg bench.jpeg_images=128 data.gpu_aug=true
# The built-in Fashion-MNIST configuration (ViT-T/4, depth 6, 32 px, batch 128, bf16)
run bench.warmup=2 bench.steps=12 bench.repeats=3
