#!/usr/bin/env bash
# The one-GPU label-efficiency study (python -m lab.device_study) on a bare GPU machine that reaches no
# package registry: it needs python3 with torch, torchvision, safetensors, tqdm, tensorboard and
# matplotlib there; the wheels of omegaconf, antlr4-python3-runtime and timm >= 1.0.31 (an image with
# timm 1.0.29 fails every fine-tuning: it records no model arguments) in .whl/; Fashion-MNIST's four .gz
# files in .fmnist/ (both git-ignored). Everything it measured comes back as one archive:
#   mkdir -p .whl .fmnist && cp /usr/share/datasets/fashion-mnist/*.gz .fmnist/
#   pip download --no-deps -d .whl omegaconf==2.3.0 timm==1.0.31 && pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3
#   OUT=/some/folder LAB_COMMIT=$(git rev-parse --short HEAD) bash lab/device_study.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p /usr/share/datasets/fashion-mnist && cp -n .fmnist/*.gz /usr/share/datasets/fashion-mnist/
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -c "import torch, timm, sys; print(sys.version.split()[0], torch.__version__, timm.__version__, torch.cuda.get_device_name(0))" \
  | tee "$OUT/versions.txt"
python3 -m lab.device_study "$@" 2>&1 | tee "$OUT/device_study.log"
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv >> "$OUT/nvidia-smi.txt" 2>&1
tar czf "$OUT/gpu_records.tar.gz" lab/records/recipe_sweep_gpu lab/records/study_labels_gpu runs/gpu/jobs.json \
  runs/gpu/logs $(find runs/gpu -name stages.json -o -name metrics.jsonl -o -name '*.yaml' -o -name results.json)
ls -la "$OUT"
