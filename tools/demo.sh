#!/usr/bin/env bash
# The main job, from a fresh machine with only Python: bash tools/demo.sh
# Trains the tiny Llama-family model on generated data on 4 CPU processes (tp=2 x dp=2), then
# the same config as one process, and shows that both runs produced the same losses (I-5).
set -euo pipefail
source "$(dirname "$0")/env.sh"
STEPS=${STEPS:-20}
OUT=${OUT:-runs/demo}
echo "== meshtron demo: tp=2 x dp=2 on 4 CPU processes, $STEPS steps =="
NPROC_PER_NODE=4 tools/launch.sh configs/tiny.yaml parallel.tp=2 parallel.dp=2 \
  train.steps="$STEPS" train.output_dir="$OUT/tp2_dp2" 2> >(grep -v -e Warning -e 'return func' >&2)
echo "== the same global batches on one process =="
meshtron-train configs/tiny.yaml train.steps="$STEPS" train.output_dir="$OUT/single"
python tools/compare_metrics.py "$OUT/single/metrics.jsonl" "$OUT/tp2_dp2/metrics.jsonl"
