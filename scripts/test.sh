#!/usr/bin/env bash
# Runs the test suite; installs the requirements first when any is missing. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch, torchvision, av, omegaconf, lpips, timm, einops, scipy, tensorboard, tqdm, pytest" 2>/dev/null; then
  echo "installing requirements..."
  "$PYTHON" -m pip install -q -r requirements.txt -r requirements-dev.txt
fi
# Tests run on the CPU with tiny configs; a visible GPU would only change timings.
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-}
exec "$PYTHON" -m pytest -q "$@"
