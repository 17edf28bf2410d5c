#!/usr/bin/env bash
# The quickstart demo: install, build Fashion-MNIST shards, pretrain a tiny CLIP on the CPU,
# then print its zero-shot accuracy on the 10k held-out test images.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=${PYTHON:-python3}
$PY -m vlp.data.build fashion-mnist data/fashion-mnist --split train
$PY train.py --config configs/demo.yaml --resume latest "$@"
$PY -m vlp.eval zeroshot --checkpoint runs/demo --dataset fashion-mnist --split test
