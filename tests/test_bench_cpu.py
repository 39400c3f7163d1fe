"""tools/bench_cpu.py at a tiny size, and the CPU attention paths the benchmark's figures rest on.

The CLI: exit 0, the table, and a last line of JSON with meshtron's ``tokens_per_s`` (> 0),
transformers' figure and their ratio, and step-0 losses that agree to 1e-5 relative (both sides
ran the same model, weights and batch); ``--no-hf --recompute`` runs meshtron alone.
The report names meshtron's attention kernel per shape bucket (measured into a temporary cache
directory here, then read back from it by a second run).
The kernels: the blocked attention path equals the fused CPU kernel in fp32 — out, lse, dq, dk, dv
within 1e-5 of each tensor's max — on a long causal GQA document, for non-causal attention and for
two packed documents; pinned by ``MESHTRON_CPU_ATTN``, the contract runs the pinned kernel.
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "bench_cpu.py"
TINY = ["--layers", "1", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--ffn", "128", "--vocab", "256",
        "--seq", "256", "--threads", "1", "--steps", "2"]


def run_tool(args, env=None):
    proc = subprocess.run([sys.executable, str(TOOL), *args], check=False, cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    return lines, json.loads(lines[-1])


def test_cli_tiny_against_transformers(tmp_path):
    env = {**os.environ, "MESHTRON_CACHE_DIR": str(tmp_path)}
    env.pop("MESHTRON_CPU_ATTN", None)
    lines, report = run_tool(TINY, env)
    assert any(line.split()[:2] == ["system", "tokens/s"] for line in lines), lines
    assert report["tokens_per_s"] > 0 and report["hf_tokens_per_s"] > 0
    assert report["ratio"] == pytest.approx(report["tokens_per_s"] / report["hf_tokens_per_s"])
    assert report["cpu_ratio"] == pytest.approx(report["cpu_tokens_per_s"] / report["hf_cpu_tokens_per_s"])
    assert report["loss0_rel_diff"] <= 1e-5, report
    assert report["meshtron"]["loss0"] == pytest.approx(report["transformers"]["loss0"], rel=1e-5)
    assert len(report["meshtron"]["step_s"]) == len(report["transformers"]["step_s"]) == 2
    assert report["tokens_per_s"] == pytest.approx(256 / report["meshtron"]["median_step_s"])
    assert report["config"]["seq"] == 256 and report["config"]["threads"] == 1
    kernels = report["attention_kernels"]
    bucket = "backward float32 causal q=256 k=256 heads=4/2 dim=16 threads=1"
    assert kernels[bucket]["source"] == "measured", kernels
    assert kernels[bucket]["choice"] in ("fused", "blocked") and set(kernels[bucket]["seconds"]) == {"fused", "blocked"}
    assert any(line.strip().startswith(bucket) for line in lines), lines
    _, again = run_tool(TINY + ["--no-hf", "--steps", "1"], env)  # a later run reads the cache
    assert {k: (d["choice"], d["source"]) for k, d in again["attention_kernels"].items()} == {
        k: (d["choice"], "cache") for k, d in kernels.items()}


def test_cli_meshtron_alone_with_recompute():
    env = {**os.environ, "MESHTRON_CPU_ATTN": "blocked"}
    _, report = run_tool(TINY + ["--no-hf", "--recompute", "attention-cached"], env)
    assert report["tokens_per_s"] > 0 and "hf_tokens_per_s" not in report
    assert report["config"]["recompute"] == "attention-cached"
    assert {d["choice"] for d in report["attention_kernels"].values()} == {"blocked"}
    assert {d["source"] for d in report["attention_kernels"].values()} == {"pinned"}


# -- the attention paths -----------------------------------------------------------------------
def rel(got, ref):
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max())


@pytest.mark.parametrize("case", ["long-causal", "non-causal", "two-docs"])
def test_blocked_path_equals_fused_kernel(monkeypatch, case):
    from engine.kernels import reference as A

    if A._FUSED is None:
        pytest.skip("this torch has no fused CPU flash-attention kernel")
    lens, causal = {"long-causal": ([1100], True), "non-causal": ([700], False),
                    "two-docs": ([300, 1030], True)}[case]
    g = torch.Generator().manual_seed(len(lens))
    t = sum(lens)
    q, do = torch.randn(t, 8, 32, generator=g), torch.randn(t, 8, 32, generator=g)
    k, v = torch.randn(t, 2, 32, generator=g), torch.randn(t, 2, 32, generator=g)
    scale = 32 ** -0.5
    cu = torch.tensor([0] + lens).cumsum(0).tolist()
    for s0, s1 in itertools.pairwise(cu):
        qs, ks, vs, dos = q[s0:s1], k[s0:s1], v[s0:s1], do[s0:s1]
        o_ref, l_ref = A._FUSED[0](A._bhld(qs), A._bhld(ks), A._bhld(vs), 0.0, causal, scale=scale)
        o_ref, l_ref = A._thd(o_ref), l_ref[0]
        grads_ref = [A._thd(x) for x in A._FUSED[1](A._bhld(dos), A._bhld(qs), A._bhld(ks), A._bhld(vs),
                                                      A._bhld(o_ref), l_ref[None].contiguous(), 0.0, causal,
                                                      scale=scale)]
        out = torch.zeros_like(qs)
        lse = torch.full(l_ref.shape, float("-inf"))
        A._blocked_forward(qs, ks, vs, causal, scale, out, lse)
        assert rel(out, o_ref) <= 1e-5 and rel(lse, l_ref) <= 1e-5
        grads = [torch.zeros_like(x) for x in (qs, ks, vs)]
        A._blocked_backward(dos, qs, ks, vs, o_ref, l_ref, causal, scale, *grads)
        for name, got, ref in zip(("dq", "dk", "dv"), grads, grads_ref):
            assert rel(got, ref) <= 1e-5, (name, rel(got, ref))
    # and through the contract: each document's backward takes the pinned kernel
    cu_t = torch.tensor(cu, dtype=torch.int32)
    monkeypatch.setenv(A.KERNEL_ENV, "fused")
    _, lse = A.attention_forward(q, k, v, cu_t, cu_t, causal=causal)
    n = lens[-1]
    assert A._backward_fused(q, k, causal, lse[:, cu[-2]:], n, n)
    monkeypatch.setenv(A.KERNEL_ENV, "blocked")
    assert not A._backward_fused(q, k, causal, lse[:, cu[-2]:], n, n)
