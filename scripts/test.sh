#!/usr/bin/env bash
# Runs the test suite; installs the requirements first when any is missing. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure_requirements.sh
# Tests run on the CPU with tiny configs; a visible GPU would only change timings.
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-}
# One pytest-xdist worker per core; a test file stays on one worker, so its module fixtures are built once. Files
# go out in collection order, the slow ones first (tests/conftest.py).
exec "$PYTHON" -m pytest -q -n "${TEST_WORKERS:-auto}" --dist loadfile --no-loadscope-reorder "$@"
