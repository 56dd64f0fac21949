#!/usr/bin/env bash
# The built-in default run: sets everything up, then pre-trains on Fashion-MNIST (936 steps) and
# prints one summary: retrieval accuracy, k-NN and linear probe of the teacher next to a random init.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/conmim pretrain "$@"
