"""Failure behaviour of a CPU world (issue: fail loudly, early and cleanly).

* a rank that raises mid-step: every rank exits non-zero within seconds, the traceback is
  printed once (by the failing rank), the others name it in one line;
* a rank SIGKILLed mid-run: the others exit non-zero, bounded by the collective timeout;
* the ranks are started by hand (RANK / WORLD_SIZE / MASTER_ADDR, as ``srun`` would), not by
  torchrun, so nothing but meshtron itself stops the survivors.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from engine.spawn import free_port

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def start_world(world: int, args: list[str], fault: str, tmp_path) -> list[subprocess.Popen]:
    port, procs = free_port(), []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", MESHTRON_FAULT=fault)
        env.pop("TORCHELASTIC_RESTART_COUNT", None)
        err = open(tmp_path / f"rank{rank}.err", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "engine.cli", TINY, *args], cwd=ROOT, env=env,
                                      stdout=subprocess.DEVNULL, stderr=err))
    return procs


def wait_all(procs, limit: float) -> tuple[list[int], float]:
    """Exit codes, and seconds from the first exit to the last (the others' reaction time)."""
    deadline, first, codes = time.monotonic() + limit, None, [None] * len(procs)
    while None in codes and time.monotonic() < deadline:
        for i, p in enumerate(procs):
            if codes[i] is None and p.poll() is not None:
                codes[i] = p.returncode
                first = first or time.monotonic()
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.kill()
    assert None not in codes, f"ranks still running after {limit}s: {codes}"
    return codes, time.monotonic() - first


ARGS = ["parallel.dp=2", "parallel.tp=2", "train.steps=8", "checkpoint.save_final=false", "dist.timeout_s=60",
        "dist.abort_poll_s=0.5"]


def test_a_raising_rank_stops_the_world_and_is_reported_once(tmp_path):
    procs = start_world(4, ARGS + [f"train.output_dir={tmp_path / 'run'}"], "raise@2/1", tmp_path)
    codes, spread = wait_all(procs, 180)
    assert all(c != 0 for c in codes), codes
    assert spread < 15, f"the others took {spread:.1f}s to stop"
    errs = [(tmp_path / f"rank{r}.err").read_text() for r in range(4)]
    assert sum(e.count("Traceback") for e in errs) == 1, errs
    assert "injected failure (MESHTRON_FAULT) at step 2 on rank 1" in errs[1]
    for r in (0, 2, 3):
        assert "stopping: rank 1: RuntimeError: injected failure" in errs[r], errs[r]


def test_a_killed_rank_stops_the_world(tmp_path):
    procs = start_world(4, ARGS + [f"train.output_dir={tmp_path / 'run'}"], "kill@2/2", tmp_path)
    codes, spread = wait_all(procs, 180)
    assert codes[2] == -9 and all(c not in (0, None) for c in codes), codes
    assert spread < 60 + 15, f"the others took {spread:.1f}s to stop"
    errs = [(tmp_path / f"rank{r}.err").read_text() for r in range(4)]
    assert sum(e.count("Traceback") for e in errs) <= 1, errs  # the first survivor to notice explains
