#!/usr/bin/env bash
# Installs everything vlp needs on a fresh Debian machine (CPU or GPU): the Fashion-MNIST
# Debian package for the demo and tests, openclipart SVGs and an SVG rasterizer for the clipart
# scenes source, PyTorch, and vlp itself with its dev extras.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "[install] apt: dataset-fashion-mnist"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
if [ ! -d /usr/share/openclipart/svg ] || ! command -v rsvg-convert >/dev/null; then
  echo "[install] apt: openclipart-svg librsvg2-bin"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq openclipart-svg librsvg2-bin >/dev/null
fi

# headless browser for the test that renders the eval report (skipped if absent)
if ! command -v chromium-headless-shell >/dev/null && ! command -v chromium >/dev/null; then
  echo "[install] apt: chromium-headless-shell"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium-headless-shell >/dev/null \
    || echo "[install] chromium-headless-shell not installable; the report screenshot test will skip"
fi

PY=${PYTHON:-python3}
echo "[install] pip: torch, torchvision"
$PY -m pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
echo "[install] pip: vlp and its dependencies"
$PY -m pip install -q --disable-pip-version-check -e ".[dev]"
echo "[install] done"
