"""tools/bench_pipeline.py: the replay of the engine's schedules with equal unit costs gives the
analytic bubble exactly, and the CLI end to end at a tiny size (pp=2, m=4): exit 0, a row per
schedule, bubbles in [0, 1), the analytic column's formula, and a timeline file with m·vpp·k
forwards and as many backwards on every rank."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "bench_pipeline.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("bench_pipeline", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def formula(p: int, m: int, schedule: str, vpp: int, k: int) -> float:
    units = {"1f1b": m, "interleaved": vpp * m, "seq1f1b": k * m}[schedule]
    return (p - 1) / (units + p - 1)


@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (3, 6)])
@pytest.mark.parametrize("schedule,vpp,k", [("1f1b", 1, 1), ("interleaved", 2, 1), ("interleaved", 3, 1),
                                            ("seq1f1b", 1, 2), ("seq1f1b", 1, 4)])
def test_replay_of_equal_units_is_the_analytic_bubble(p, m, schedule, vpp, k):
    from engine.parallel.pipeline.schedules import build_schedule

    tool = load_tool()
    # a backward costs twice a forward; a unit is 1/(vpp·k) of a micro-batch on a stage
    timelines = [[{"kind": kind, "mb": mb, "chunk": c, "unit": j, "cpu": (1.0 if kind == "F" else 2.0) / (vpp * k)}
                  for kind, mb, c, j in build_schedule(schedule, p, r, m, vpp, k)] for r in range(p)]
    got = tool.replay(timelines, vpp)
    want = formula(p, m, schedule, vpp, k)
    assert got["bubble"] == pytest.approx([want] * p, abs=1e-12)
    assert got["step_s"] == pytest.approx(3.0 * m / (1 - want))
    assert tool.analytic_bubble(p, m, schedule, vpp, k) == pytest.approx(want, abs=1e-15)


def test_cli_tiny(tmp_path):
    p, m, vpp, ks = 2, 4, 2, (2, 4)
    out = tmp_path / "timeline.json"
    cmd = [sys.executable, str(TOOL), "--pp", str(p), "-m", str(m), "--vpp", str(vpp), "-k", *map(str, ks),
           "--layers", "4", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--ffn", "128",
           "--vocab", "256", "--seq", "128", "--timeline", str(out)]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    labels = ["1f1b", f"interleaved v={vpp}"] + [f"seq1f1b k={k}" for k in ks]
    header = next(i for i, line in enumerate(lines) if line.startswith("schedule"))
    assert [line[:16].strip() for line in lines[header + 1:header + 1 + len(labels)]] == labels, proc.stdout
    assert any("indicative" in line.lower() for line in lines), proc.stdout

    report = json.loads(lines[-1])
    assert [r["label"] for r in report["rows"]] == labels
    for row in report["rows"]:
        assert len(row["bubble"]) == p
        assert all(0.0 <= b < 1.0 for b in row["bubble"]), row
        assert all(0.0 <= b < 1.0 for b in row["replay"]["bubble"]), row
        assert row["mean_bubble"] == pytest.approx(sum(row["bubble"]) / p)
        assert row["analytic"] == pytest.approx(formula(p, m, row["schedule"], row["vpp"], row["k"]), abs=1e-15)
        assert row["step_s"] > 0

    timelines = json.loads(out.read_text())["schedules"]
    assert list(timelines) == labels
    for entry in timelines.values():
        expected = m * entry["vpp"] * entry["k"]
        assert len(entry["ranks"]) == p
        for actions in entry["ranks"]:
            kinds = [a["kind"] for a in actions]
            assert kinds.count("F") == kinds.count("B") == expected, (entry["schedule"], kinds)
            assert all(a["start"] >= 0 and a["wait"] >= 0 and a["compute"] >= 0 for a in actions)
