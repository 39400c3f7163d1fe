#!/usr/bin/env bash
# Source me: create or reuse the virtual environment (MESHTRON_VENV, default .venv in the repo)
# and install meshtron with the extras the tests use (dev, tensorboard, wandb). CPU machines get
# torch 2.13's CPU build first, so nothing pulls a multi-GB CUDA torch; a machine that already has
# torch keeps its own.
set -euo pipefail
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MESHTRON_VENV=${MESHTRON_VENV:-$_root/.venv}
if [[ ! -x "$MESHTRON_VENV/bin/python" ]]; then
  echo "[meshtron] creating virtual environment $MESHTRON_VENV"
  python3 -m venv "$MESHTRON_VENV"
fi
# shellcheck disable=SC1091
source "$MESHTRON_VENV/bin/activate"
_stamp="$MESHTRON_VENV/.meshtron-installed"
if [[ ! -f "$_stamp" || "$_root/setup.py" -nt "$_stamp" ]]; then
  echo "[meshtron] installing dependencies into $MESHTRON_VENV"
  python -m pip install -q --upgrade pip
  python -c 'import torch' 2>/dev/null || python -m pip install -q torch==2.13.0
  python -m pip install -q -e "$_root[dev,tensorboard,wandb]"
  touch "$_stamp"
fi
cd "$_root"
