"""tools/bench_gpu.py: the whole path on CPU at a tiny size, its FLOP count, peak table and OOM cells.

The CLI with ``--device cpu``: exit 0, the table, a last line of JSON with a row per length and
system, tokens/s > 0, TFLOP/s and MFU that follow from the hand-counted parameters, and step-0
losses of meshtron and transformers that agree to 1e-5 relative at every length (same weights and
batch, fp32). Without CUDA and without ``--device cpu`` it exits non-zero with one message. An
out-of-memory error at one length gives an OOM cell and the next length still runs. On a machine
with CUDA the tiny model also runs there in bf16.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "bench_gpu.py"
LAYERS, HIDDEN, HEADS, KV_HEADS, FFN, VOCAB = 2, 64, 4, 2, 128, 256
TINY = ["--layers", str(LAYERS), "--hidden", str(HIDDEN), "--heads", str(HEADS), "--kv-heads", str(KV_HEADS),
        "--ffn", str(FFN), "--vocab", str(VOCAB), "--steps", "2", "--warmup", "1"]


def load_tool():
    spec = importlib.util.spec_from_file_location("bench_gpu", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(args, env=None):
    return subprocess.run([sys.executable, str(TOOL), *args], check=False, cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def tiny_param_counts() -> tuple[int, int]:
    """(all, without the input embedding) of the tiny Llama, counted by hand."""
    d = HIDDEN // HEADS
    layer = HIDDEN * (HEADS + 2 * KV_HEADS) * d + HEADS * d * HIDDEN + HIDDEN * 2 * FFN + FFN * HIDDEN + 2 * HIDDEN
    body = LAYERS * layer + HIDDEN + VOCAB * HIDDEN  # layers, final norm, untied output layer
    return body + VOCAB * HIDDEN, body


def test_step_flops_by_hand():
    tool = load_tool()
    # 6·N·T + 12·L·a·T²/2 with N = 1000, L = 2, a = 64, T = 128
    assert tool.step_flops(1000, 2, 64, 128) == 6 * 1000 * 128 + 6 * 2 * 64 * 128 * 128 == 13_350_912
    # the default ~1B model at 8k tokens: 6.39e13 for the matmuls + 1.10e13 for attention
    n = 16 * (2048 * 3072 + 2048 * 2048 + 3 * 2048 * 8192 + 2 * 2048) + 2048 + 32000 * 2048
    assert n == 1_038_682_112
    assert tool.step_flops(n, 16, 2048, 8192) == pytest.approx(6 * n * 8192 + 6 * 16 * 2048 * 8192**2)


def test_peak_table(monkeypatch):
    tool = load_tool()
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    for name, peak in (("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                       ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L4", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert tool.peak_flops(cuda, bf16, None) == peak, name
        assert tool.peak_flops(cuda, torch.float32, None) is None  # the table is bf16's
        assert tool.peak_flops(cuda, bf16, 500.0) == 500e12
    assert tool.peak_flops(torch.device("cpu"), torch.float32, None) is None
    assert tool.peak_flops(torch.device("cpu"), torch.float32, 0.1) == pytest.approx(0.1e12)


def test_cli_cpu_against_transformers():
    proc = run_tool(TINY + ["--device", "cpu", "--seq", "64,128", "--peak-tflops", "0.1"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert any(line.split()[:3] == ["tokens", "system", "tokens/s"] for line in lines), lines
    report = json.loads(lines[-1])
    num_params, nonembedding = tiny_param_counts()
    assert (report["num_params"], report["num_params_nonembedding"]) == (num_params, nonembedding)
    assert report["peak_flops"] == pytest.approx(0.1e12) and report["device"] == "CPU"
    rows = {(r["seq"], r["system"]): r for r in report["rows"]}
    assert sorted(rows) == [(64, "meshtron"), (64, "transformers"), (128, "meshtron"), (128, "transformers")]
    for (seq, system), r in rows.items():
        assert not r["oom"] and r["tokens_per_s"] > 0, r
        assert len(r["step_s"]) == 2 and r["tokens_per_s"] == pytest.approx(seq / r["median_step_s"])
        assert r["flops"] == 6 * nonembedding * seq + 6 * LAYERS * HIDDEN * seq * seq
        assert r["tflops"] == pytest.approx(r["flops"] / r["median_step_s"] / 1e12)
        assert r["mfu"] == pytest.approx(r["tflops"] / 0.1)
        assert r["peak_mem_gib"] is None  # no memory figure on CPU
        assert r["kernel"] == ("reference" if system == "meshtron" else "sdpa")
    for seq in (64, 128):  # every length starts both from the same weights
        mesh, hf = rows[seq, "meshtron"], rows[seq, "transformers"]
        assert mesh["loss0"] == pytest.approx(hf["loss0"], rel=1e-5)
        assert mesh["loss0_rel_diff"] <= 1e-5
        assert mesh["ratio"] == pytest.approx(mesh["tokens_per_s"] / hf["tokens_per_s"])
    assert rows[64, "meshtron"]["loss0"] != rows[128, "meshtron"]["loss0"]  # two different batches


def test_no_cuda_exits_with_message():
    proc = run_tool(TINY + ["--seq", "64"], env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode != 0
    assert "no CUDA device; pass --device cpu for a smoke run" in proc.stderr
    assert proc.stdout == ""


def test_out_of_memory_is_a_cell(monkeypatch, capsys):
    tool = load_tool()
    step = tool.bench_cpu.Meshtron.step

    def step_or_oom(self):
        if self.batches[0].num_tokens == 64:
            raise tool.OOM("CUDA out of memory (simulated)")
        return step(self)

    monkeypatch.setattr(tool.bench_cpu.Meshtron, "step", step_or_oom)
    assert tool.main(TINY + ["--device", "cpu", "--seq", "64,128", "--no-hf"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = {r["seq"]: r for r in json.loads(lines[-1])["rows"]}
    assert rows[64]["oom"] and rows[64]["tokens_per_s"] is None
    assert not rows[128]["oom"] and rows[128]["tokens_per_s"] > 0 and rows[128]["mfu"] is None
    assert any(line.split()[:3] == ["64", "meshtron", "OOM"] for line in lines), lines


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cli_cuda_tiny_bf16():
    proc = run_tool(["--layers", "2", "--hidden", "256", "--heads", "4", "--kv-heads", "2", "--ffn", "512",
                     "--vocab", "1024", "--seq", "512,1024", "--steps", "2"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(report["rows"]) == 4
    for r in report["rows"]:
        assert not r["oom"] and r["tokens_per_s"] > 0 and r["peak_mem_gib"] > 0, r
    for r in (r for r in report["rows"] if r["system"] == "meshtron"):
        assert r["loss0_rel_diff"] <= 2e-2, r
