#!/usr/bin/env bash
# The first check on a machine with one CUDA GPU (under 8 minutes): the CUDA tests, flash vs
# reference attention in bf16, one training step of a ~1B model at 32k tokens against
# meshtron-plan --simulate's prediction, and tools/bench_gpu.py at 8k and 32k tokens; one JSON.
#
#   bash tools/gpu_check.sh [--out FILE] [--dry-run] [--only STEP ...]
#
# Uses the machine's own python (PYTHON, default python3) and torch: GPU machines keep their CUDA
# build (no virtual environment is made, nothing is downloaded). --dry-run prints the plan on any
# machine. See tools/gpu_check.py for the steps.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" tools/gpu_check.py "$@"
