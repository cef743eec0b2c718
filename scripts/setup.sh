#!/usr/bin/env bash
# Set up U-DiffusionNFT on a fresh machine (idempotent): torch, the package with its test extras,
# the CLIP BPE vocabulary, and Tesseract. Without a GPU it installs the CPU build of torch 2.13.0;
# on a GPU machine install your CUDA torch first (or let pip pick the registry's CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then pip_install torch; else pip_install torch==2.13.0; fi
fi
pip_install -e ".[test]"
# open-clip-torch ships the real CLIP BPE merges used by the offline tiny models; --no-deps because
# it would pull torchvision, which this project does not use.
"$PY" -c "import open_clip" 2>/dev/null || pip_install --no-deps open-clip-torch==3.3.0
if ! command -v tesseract >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq tesseract-ocr >/dev/null) \
      || echo "setup.sh: tesseract-ocr not installed; the Tesseract OCR scorer and its tests are skipped" >&2
  else
    echo "setup.sh: install tesseract-ocr for the Tesseract OCR scorer (its tests are skipped without it)" >&2
  fi
fi
