#!/usr/bin/env bash
# Sourced by the other scripts: installs requirements*.txt when a package is missing (a fresh machine). It looks the
# packages up without importing them: importing torch, diffusers and transformers would cost ~10 s per script start.
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "
import importlib.util, sys
names = 'torch torchvision av omegaconf lpips einops scipy tensorboard tqdm safetensors diffusers transformers pytest xdist'
sys.exit(any(importlib.util.find_spec(name) is None for name in names.split()))" 2>/dev/null; then
  echo "installing requirements (first run only)..."
  "$PYTHON" -m pip install -q -r requirements.txt -r requirements-dev.txt
fi
