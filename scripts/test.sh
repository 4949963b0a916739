#!/usr/bin/env bash
# Runs the test suite; installs the requirements first when any is missing. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure_requirements.sh
# Tests run on the CPU with tiny configs; a visible GPU would only change timings.
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-}
# One pytest-xdist worker per core, at most 4 (the longest file alone takes a quarter of the suite, and each worker
# holds about 1.5 GB); a test file stays on one worker, so its module fixtures are built once. Files go out in
# collection order, the slow ones first (tests/conftest.py).
WORKERS=${TEST_WORKERS:-$("$PYTHON" -c "import os
cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
print(min(4, cores))")}
exec "$PYTHON" -m pytest -q -n "$WORKERS" --dist loadfile --no-loadscope-reorder "$@"
