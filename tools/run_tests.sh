#!/usr/bin/env bash
# The test suite, from a fresh machine with only Python: bash tools/run_tests.sh [pytest args]
set -euo pipefail
source "$(dirname "$0")/env.sh"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec python -m pytest -q -ra --durations=40 --timeout 1200 tests "$@"
