"""``meshtron-plan --simulate``: the watch on NCCL's rules and host syncs, the command line, and the
engine's own training step at small shapes (the shipped configs and the planner's agreement with
the simulation are in tests/test_simulate_configs.py).

Every simulation runs in a subprocess: the fake CUDA device it installs is process-wide.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "tests" / "sim_probe.py"


def run(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def simulate(*args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess, dict | None]:
    """``meshtron-plan --simulate ...``: the process and its JSON line (None if there is none)."""
    out = run(["-m", "engine.plan.cli", "--simulate", *args], timeout)
    lines = out.stdout.strip().splitlines()
    try:
        return out, json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        return out, None


def tagged_lines(tag: str) -> dict[int, str]:
    """Line numbers of tests/sim_probe.py carrying ``# <tag> name``."""
    out = {}
    for n, line in enumerate(PROBE.read_text().splitlines(), 1):
        m = re.search(rf"# {tag} (\S+)", line)
        if m:
            out[n] = m.group(1)
    return out


def test_watch_names_each_breach_and_sync_at_its_line():
    """A CPU tensor in a collective, a lone send and a collective on a foreign group are NCCL
    breaches at exactly their lines; .item()/float(), a boolean mask, a device-to-host and a
    blocking host-to-device copy are host syncs at theirs; a non-blocking copy and host tensors'
    values are not syncs, and host values stay real."""
    out = run([str(PROBE)], timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    line = re.compile(r"tests/sim_probe\.py:(\d+) ")
    breaches = {int(line.match(where).group(1)) for where in got["violations"]}
    assert breaches == set(tagged_lines("BREACH")), got["violations"]
    syncs = {int(line.match(where).group(1)): count for where, _, count in got["syncs"]}
    assert syncs == {n: 1 for n in tagged_lines("SYNC")}, got["syncs"]
    assert got["host_values"] == [3, 4, 5] and not got["unknown_host_values"], got


def test_tiny_run_report_and_exit_status():
    """The tiny config on one fake GPU: the JSON line's fields, a peak that is the sum of its
    categories, the planner beside it, no breach, at most 4 host syncs, exit 0 (it fits)."""
    out, report = simulate("configs/tiny.yaml", "parallel.dp=1", "train.bf16=true")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert set(report) >= {"config", "ranks", "peak_gib", "planner_gib", "host_gib", "host_syncs_per_step",
                           "nccl_violations", "fits", "seconds"}
    (rank,) = report["ranks"]
    assert rank["rank"] == 0 and report["fits"] is True and report["nccl_violations"] == []
    cats = rank["categories"]
    assert cats["total"] == sum(cats[k] for k in ("parameters", "gradients", "optimizer", "activations",
                                                  "temporaries"))
    assert report["peak_gib"] == cats["total"] / 2**30 > 0
    assert report["host_syncs_per_step"] <= 4, rank["host_sync_sites"]
    assert "peak" in out.stdout and "host syncs per step" in out.stdout  # the table before the JSON


@pytest.mark.parametrize("args,message", [
    (["configs/does-not-exist.yaml"], "does-not-exist.yaml"),
    (["configs/tiny.yaml", "hardware.gpus=0"], "hardware.gpus"),
    (["configs/tiny.yaml", "hardware.gpus=2", "--rank", "2"], "--rank 2"),
    (["configs/tiny.yaml", "hardware.gpus=2", "parallel.tp=3"], "parallel.tp"),
])
def test_bad_input_is_one_error_and_exit_2(args, message):
    out, report = simulate(*args, timeout=120)
    err = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and report is None, (out.returncode, out.stdout[-2000:], out.stderr[-2000:])
    assert len(err) == 1 and err[0].startswith("meshtron-plan: error: ") and message in err[0], err
