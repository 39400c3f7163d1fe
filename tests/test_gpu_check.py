"""tools/gpu_check.sh: --dry-run prints the plan (every step, its command and time limit) on a
machine without a GPU and runs nothing; without --dry-run and without a GPU it stops with one
message; its config fits one GPU by the planner and the simulation (tests/test_simulate_configs.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "tools/gpu_check.sh", *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})


def test_dry_run_prints_every_step_and_runs_nothing(tmp_path):
    out = tmp_path / "gpu_check.json"
    r = run("--dry-run", "--out", str(out))
    assert r.returncode == 0, r.stderr
    for step, what in (("cuda_tests", "-m cuda"), ("attention", "--only attention"), ("memory", "--only memory"),
                       ("bench", "bench_gpu.py --seq 8192,32768")):
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith(step)), None)
        assert line is not None, (step, r.stdout)
        assert what in r.stdout, (what, r.stdout)
    total = int(r.stdout.strip().splitlines()[-1].split("at most ")[1].split(" s")[0])
    assert total <= 480  # the 8-minute budget
    assert not out.exists()  # nothing ran, nothing written


def test_without_a_gpu_it_says_so():
    r = run(env={"CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode != 0 and "no CUDA device here" in r.stderr, r.stderr
