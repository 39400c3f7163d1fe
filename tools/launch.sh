#!/usr/bin/env bash
# Launch meshtron-train under torchrun, on one node or many.
#
#   tools/launch.sh CONFIG.yaml [section.key=value ...]
#
# Environment (torchrun's meaning):
#   NPROC_PER_NODE  processes per node (default 1; on GPU nodes: the GPU count)
#   NNODES          number of nodes (default 1)
#   NODE_RANK       this node's index, 0..NNODES-1 (default 0)
#   MASTER_ADDR     address of node 0 (default 127.0.0.1)
#   MASTER_PORT     a free port on node 0 (default: any free port when NNODES=1, else 29500)
#   MAX_RESTARTS    torchrun --max-restarts (default 0)
#   PYTHON          interpreter with meshtron installed (default: python3 on PATH)
# Backend: gloo on CPU, NCCL when CUDA is available (dist.backend=auto).
set -euo pipefail

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
  sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi

NPROC_PER_NODE=${NPROC_PER_NODE:-1}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MAX_RESTARTS=${MAX_RESTARTS:-0}
PYTHON=${PYTHON:-python3}
if [[ -z "${MASTER_PORT:-}" ]]; then
  if [[ "$NNODES" == 1 ]]; then
    MASTER_PORT=$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("",0)); print(s.getsockname()[1])')
  else
    MASTER_PORT=29500
  fi
fi
# one compute thread per process unless the user says otherwise (CPU worlds share the cores)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

exec "$PYTHON" -m torch.distributed.run \
  --nproc-per-node "$NPROC_PER_NODE" --nnodes "$NNODES" --node-rank "$NODE_RANK" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" --max-restarts "$MAX_RESTARTS" \
  -m engine.cli "$@"
