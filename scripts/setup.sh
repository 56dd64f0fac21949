#!/usr/bin/env bash
# Set-up shared by scripts/test.sh and scripts/run_default.sh, safe to run again:
# Debian's Fashion-MNIST files, a virtual environment in .venv, conmim and its test, plotting, ONNX,
# webdataset, dense, array (TIFF) and lab (scikit-learn) extras.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import conmim, torch, torchvision, timm, pytest, matplotlib, onnx, onnxruntime, onnxscript, webdataset, pycocotools, tifffile, sklearn" 2>/dev/null; then
  .venv/bin/pip install -q --upgrade pip
  # torch/torchvision first and pinned to the builds this machine kind provides locally
  .venv/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1"
  .venv/bin/pip install -q -e ".[test,viz,onnx,webdataset,dense,arrays,lab]"
fi
# 100 labelled natural images for the 224-px tests (the package's own dependencies are not needed)
.venv/bin/python -c "import importlib.util as u; assert u.find_spec('foolbox')" 2>/dev/null \
  || .venv/bin/pip install -q --no-deps foolbox
