"""tools/bench_flexsp.py and tools/calibrate_flexsp.py end to end at small sizes: the benchmark's
table (shape, ratio ≥ 1 against the best static SP size, the lower bound under the plan) and its
JSON; the calibration's JSON loaded by the cost model (measured α for the measured model only)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import load_config, validate
from engine.flexsp.cost import CostModel

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "tools" / "bench_flexsp.py"
CALIBRATE = ROOT / "tools" / "calibrate_flexsp.py"
HEADER = ["device", "N", "dist", "seqs", "max_len", "static_s", "d", "flexsp_s", "ratio", "bound_s", "solver",
          "solve_s", "rounds", "bkt_err"]


def run(cmd, timeout=120):
    proc = subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_bench_quick_table():
    lines = run([BENCH, "--quick"]).strip().splitlines()
    head = next(i for i, line in enumerate(lines) if line.split() == HEADER)
    report = json.loads(lines[-1])["rows"]
    table = [line.split() for line in lines[head + 1:-1] if line.strip()]
    assert len(table) == len(report) == 6                              # a100 × N ∈ {8, 64} × 3 distributions
    assert {(r["N"], r["dist"]) for r in report} == {(n, d) for n in (8, 64)
                                                    for d in ("github", "commoncrawl", "wikipedia")}
    for cells, row in zip(table, report):
        assert len(cells) == len(HEADER) and cells[0] == row["device"] and int(cells[1]) == row["N"]
        assert float(cells[8]) == pytest.approx(row["ratio"], abs=6e-4)
        assert row["ratio"] >= 1.0, row                                  # never worse than the best static size
        assert row["static_s"] == min(row["static_by_d"].values())
        assert row["ratio"] == pytest.approx(row["static_s"] / row["flexsp_s"], rel=1e-12)
        assert row["bound_s"] <= row["flexsp_s"] * (1 + 1e-12)           # the work bound is a lower bound
        assert math.isfinite(row["static_s"]) and row["solve_s_max"] < 30


def test_bench_help():
    assert "--quick" in run([BENCH, "--help"])
    assert "--lengths" in run([CALIBRATE, "--help"])


def test_calibration_file_feeds_the_cost_model(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "calib.json"
    model = ["--layers", "1", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--ffn", "128", "--vocab", "256"]
    stdout = run([CALIBRATE, "--out", out, "--lengths", 128, 256, 512, 1024, 2048, "--repeats", 2, "--world", 2,
                  "--msg-mib", 0.0625, 0.25, *model], timeout=240)
    assert f"wrote {out}" in stdout
    calib = json.loads(out.read_text())
    fit = calib["fit"]
    assert calib["alpha1"] > 0 and calib["alpha2"] > 0 and len(fit["seconds"]) == 5
    errors = [abs(p - t) / t for p, t in zip(fit["predicted"], fit["seconds"])]
    assert max(errors) == pytest.approx(fit["max_rel_error"], rel=1e-9)
    assert set(calib["alltoall_bw"]) == set(calib["p2p_bw"]) == {"2"} and calib["intra_node_bw"] > 0
    assert calib["inter_node_bw"] <= calib["intra_node_bw"]              # a node boundary never speeds it up
    over = ["model.num_layers=1", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
            "model.ffn_hidden_size=128", "model.vocab_size=256", "parallel.sp_mode=flexsp", "parallel.cp=2",
            "parallel.hp=2", "parallel.dp=1", f"flexsp.cost_model={out}"]
    cost = CostModel.from_config(validate(load_config(None, over), 2))
    assert (cost.alpha1, cost.alpha2, cost.alpha_source) == (calib["alpha1"], calib["alpha2"], "measured")
    s = 1024                                                             # one rank: exactly the fitted curve
    assert cost.group_time([s], 1) == pytest.approx(fit["alpha1"] * s * s + fit["alpha2"] * s + fit["beta"], rel=1e-12)
    other = CostModel.from_config(validate(load_config(None, over + ["model.num_layers=2"]), 2))
    assert other.alpha_source == "derived"                               # another model: through the FLOP/s
    assert other.alpha1 == pytest.approx(2 * calib["alpha1"], rel=1e-9)
    assert other.max_tokens_per_rank() > 0
