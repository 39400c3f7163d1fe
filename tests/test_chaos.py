"""tools/chaos.py on a short setting: a world of 2 (cp2, zero1) under torchrun --max-restarts, hit
by a hang (SIGSTOP of a rank: the other gives up within dist.timeout_s), a full disk during a
checkpoint write (ENOSPC: one clear error, the previous checkpoint resumed) and a SIGKILL in the
optimizer step (seed 15 draws these three); every fault recovered and the final weights, optimizer
state and RNG bit-identical to an uninterrupted run. About 1.5 minutes on 2 cores."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_chaos_short_run_recovers_every_fault_bitwise(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "chaos.py"), "--world", "2", "--steps", "12",
                           "--faults", "3", "--seed", "15", "--output-dir", str(tmp_path / "chaos")],
                          cwd=ROOT, capture_output=True, text=True, timeout=400, check=False)
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    result = json.loads(lines[-1])
    assert result["faults"] == 3 and result["recovered"] == 3, lines
    assert result["hangs"] == 0 and result["final_bitwise_equal"] is True, lines
    table = "\n".join(lines)
    for kind in ("stop", "enospc-in-save", "kill-optimizer"):
        assert kind in table, table
    # the full disk: one clear error, on the rank that hit it, and no traceback
    errors = [p.read_text() for p in (tmp_path / "chaos" / "chaos" / "logs").glob("*/attempt_1/*/*.log")]
    assert sum(e.count("error: checkpoint of step 4 not written: no space left on device") for e in errors) == 1


def test_fault_specs_and_schedule():
    """MESHTRON_FAULT's attempt suffix, and a schedule whose fault i lies at or after the point
    attempt i resumes from (steps in firing order), NaN steps on every attempt."""
    sys.path.insert(0, str(ROOT / "tools"))
    import chaos

    from engine import faults

    assert faults.parse("kill-forward@3/1#2,nan@4#*,raise@5") == [
        ("kill-forward", 3, 3, 1, 2), ("nan", 4, 4, None, None), ("raise", 5, 5, None, 0)]
    args = chaos.parse_args(["--seed", "3"])
    schedule = chaos.draw_schedule(args, disk=True)
    assert len(schedule) == 12 and {f["kind"] for f in schedule} == set(chaos.ALL_KINDS)
    keys = [f["key"] for f in schedule if f["attempt"] is not None]
    assert keys == sorted(keys) and [f["attempt"] for f in schedule[:len(keys)]] == list(range(len(keys)))
    assert all(f["rank"] == 0 for f in schedule if f["kind"] == "enospc-in-save")
    nan_steps = {f["step"] for f in schedule if f["kind"] == "nan"}
    assert not nan_steps & {f["step"] for f in schedule if f["attempt"] is not None}
