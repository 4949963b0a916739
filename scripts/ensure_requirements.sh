#!/usr/bin/env bash
# Sourced by the other scripts: installs requirements*.txt when an import fails (a fresh machine).
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch, torchvision, av, omegaconf, lpips, einops, scipy, tensorboard, tqdm, safetensors, diffusers, transformers, pytest, xdist" 2>/dev/null; then
  echo "installing requirements (first run only)..."
  "$PYTHON" -m pip install -q -r requirements.txt -r requirements-dev.txt
fi
