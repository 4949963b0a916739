#!/usr/bin/env bash
# Sourced by scripts/demo.sh and scripts/test.sh, or run alone: checks that $PYTHON (default python3) can import the
# packages of requirements.txt and requirements-dev.txt. When some are missing it says which, and into which
# interpreter it installs them, then runs `$PYTHON -m pip install -r requirements.txt -r requirements-dev.txt`.
# CMD_NO_INSTALL=1 installs nothing: it prints what is missing and fails (exit 1).
# The packages are looked up without importing them: importing torch, diffusers and transformers would cost ~10 s.
PYTHON=${PYTHON:-python3}
_cmd_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The import names; NAME:PIP-NAME where pip knows the package by another name.
if ! _cmd_missing=$("$PYTHON" -c "
import importlib.util
names = 'torch torchvision av numpy omegaconf lpips einops scipy tensorboard tqdm safetensors diffusers transformers'
names += ' ruff pytest xdist:pytest-xdist'
missing = [name.partition(':')[2] or name for name in names.split()
           if importlib.util.find_spec(name.partition(':')[0]) is None]
print(' '.join(missing))"); then
  echo "error: cannot run PYTHON=$PYTHON to check the requirements" >&2
  exit 1
fi
if [ -n "$_cmd_missing" ]; then
  _cmd_where=$("$PYTHON" -c "import sys; print(sys.executable)")
  if [ -n "${CMD_NO_INSTALL:-}" ] && [ "${CMD_NO_INSTALL}" != 0 ]; then
    echo "error: $_cmd_where lacks $_cmd_missing; CMD_NO_INSTALL is set, so nothing is installed: install them with" \
      "'$PYTHON -m pip install -r requirements.txt -r requirements-dev.txt' or set PYTHON to an interpreter that" \
      "has them" >&2
    exit 1
  fi
  echo "installing requirements.txt and requirements-dev.txt into $_cmd_where (missing: $_cmd_missing;" \
    "CMD_NO_INSTALL=1 stops instead, PYTHON=... picks another interpreter)"
  "$PYTHON" -m pip install -q -r "$_cmd_root/requirements.txt" -r "$_cmd_root/requirements-dev.txt"
fi
