"""tools/bench_memory.py: the saved-bytes hook against a hand count, and the CLI end to end (small
sizes, --check): exit 0, the table, and a JSON last line whose meshes all computed the same loss;
per recompute mode (--recompute all, at cp = 1 and Ulysses cp = 2): every mode's figures scale with
cp (within --check's 10 %), and on every mesh full < attention-cached < selective < none."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "bench_memory.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("bench_memory", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_saved_bytes_counts_each_storage_once_without_parameters():
    tool = load_tool()
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(16, 8, requires_grad=True)
    counter = tool.SavedBytes(lin, record_sites=True)
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        y = lin(x)                          # saves x (512 B) and the weight (a parameter: free)
        z = y[:, :4] * y[:, 4:]             # saves two views of y's storage: 512 B once
        loss = (z * lin.weight[0, :4]).sum()  # saves z (256 B) and a view of the weight (free)
    loss.backward()
    assert counter.total == 512 + 512 + 256
    assert sum(n for n, _ in counter.sites.values()) == counter.total


def test_cli_check_small():
    cmd = [sys.executable, str(TOOL), "--seq", "2048", "--layers", "1", "--hidden", "64", "--ffn", "128",
           "--vocab", "256", "--tp", "1", "2", "--cp", "1", "4", "--check"]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert any(line.split()[:5] == ["recompute", "tp", "cp", "world", "tokens"] for line in lines), proc.stdout
    assert any(line.startswith("check:") and line.endswith("ok") for line in lines), proc.stdout
    report = json.loads(lines[-1])
    rows = {(r["tp"], r["cp"]): r for r in report["rows"]}
    assert set(rows) == {(1, 1), (1, 4), (2, 1), (2, 4)}
    assert rows[(1, 4)]["ratio"] <= 1.10 / 4
    assert len(rows[(2, 4)]["rank_bytes"]) == 8
    ref = rows[(1, 1)]["loss"]
    for row in rows.values():  # every mesh ran the same step (I-5), so the figures compare like with like
        assert abs(row["loss"] - ref) <= 1e-5 * abs(ref), (row, ref)


def test_cli_recompute_modes():
    cmd = [sys.executable, str(TOOL), "--seq", "1024", "--layers", "2", "--hidden", "64", "--ffn", "128",
           "--vocab", "256", "--tp", "1", "--cp", "1", "2", "--sp-mode", "ulysses", "--recompute", "all"]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["recompute"] == ["none", "full", "selective", "attention-cached"]
    rows = {(r["recompute"], r["cp"]): r for r in report["rows"]}
    assert len(rows) == 8 and not report["skipped"]
    for cp in (1, 2):
        saved = [rows[(m, cp)]["max_bytes"] for m in ("full", "attention-cached", "selective", "none")]
        assert saved == sorted(saved) and len(set(saved)) == 4, (cp, saved)
        for mode in report["recompute"]:
            assert rows[(mode, cp)]["vs_none"] == rows[(mode, cp)]["max_bytes"] / rows[("none", cp)]["max_bytes"]
    for mode in report["recompute"]:  # each mode splits its activations over cp (--check's 10 %)
        assert 0.5 <= rows[(mode, 2)]["ratio"] <= 0.5 * 1.10, (mode, rows[(mode, 2)]["ratio"])
    ref = rows[("none", 1)]["loss"]
    for row in rows.values():  # every mode and mesh ran the same step
        assert abs(row["loss"] - ref) <= 1e-5 * abs(ref), (row, ref)


def test_cli_vs_transformers_small():
    """--vs-transformers at tiny shapes: the same weights and tokens give transformers' loss and
    gradients, and the JSON last line carries the figures (peak memory deterministic, time not)."""
    cmd = [sys.executable, str(TOOL), "--vs-transformers", "--seq", "256", "--vocab", "1000", "--hidden", "64",
           "--ffn", "172", "--heads", "4", "--kv-heads", "2", "--loss-chunk", "64", "--repeats", "1"]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"meshtron_peak_gib", "transformers_peak_gib", "memory_ratio", "speed_ratio",
            "loss_rel_diff"} <= report.keys(), report
    assert report["loss_rel_diff"] <= 1e-5 and report["grad_rel_diff"] <= 1e-5, report
    assert 0 < report["meshtron_peak_gib"] < report["transformers_peak_gib"], report  # chunks of 64 of 256 logits
    ratio = report["meshtron_peak_gib"] / report["transformers_peak_gib"]  # the GiB figures are rounded
    assert abs(report["memory_ratio"] - ratio) <= 0.05 * ratio, report
    assert report["speed_ratio"] == report["meshtron_tokens_per_s"] / report["transformers_tokens_per_s"] > 0
