#!/usr/bin/env python3
"""The first GPU check: one CUDA GPU, under 8 minutes, one JSON of results (run by tools/gpu_check.sh).

    python tools/gpu_check.py [--out gpu_check.json] [--dry-run] [--only STEP ...]

Steps (each with its own time limit; a step that fails or times out is recorded and the rest run):

1. ``cuda_tests``: the test functions that need a CUDA device (``pytest -m cuda``).
2. ``attention``: torch's flash varlen kernel (and flash-attn, if installed) against the fp32
   reference of engine/kernels/attention.py on packed causal documents with GQA, bf16: the largest
   relative difference of the output, the log-sum-exp and dq, dk, dv (bf16 round-off expected:
   a few 1e-3).
3. ``memory``: one training step (forward, backward, optimizer) of configs/gpu-check-1b.yaml — a
   ~1B Llama at 32k tokens on one GPU — reading ``torch.cuda.max_memory_allocated``, and
   ``meshtron-plan --simulate`` of the same config: the simulation's peak must be within 5 % of
   the real one (I-11 at the source).
4. ``bench``: tools/bench_gpu.py at 8k and 32k tokens (meshtron vs transformers + sdpa).

``--dry-run`` prints the steps with their commands and limits and runs nothing (works on CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/gpu-check-1b.yaml"
GIB = 2**30


def steps(py: str) -> dict[str, dict]:
    """name -> {"cmd": argv or None (in-process), "limit": seconds, "what": text}."""
    return {
        "cuda_tests": {"cmd": [py, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"],
                       "limit": 150, "what": "the tests marked cuda (flash kernels, bench_gpu on the GPU)"},
        "attention": {"cmd": [py, __file__, "--only", "attention", "--inner"], "limit": 60,
                      "what": "flash vs reference attention in bf16: out, lse, dq, dk, dv"},
        "memory": {"cmd": [py, __file__, "--only", "memory", "--inner"], "limit": 150,
                   "what": f"one training step of {CONFIG} (max_memory_allocated) vs meshtron-plan --simulate"},
        "bench": {"cmd": [py, "tools/bench_gpu.py", "--seq", "8192,32768"], "limit": 120,
                  "what": "tools/bench_gpu.py at 8k and 32k tokens"},
    }


# -- in-process steps ------------------------------------------------------------------------------
def check_attention() -> dict:
    import torch

    from engine.kernels import attention, dispatch

    gen = torch.Generator(device="cuda").manual_seed(0)
    lens, heads, groups, dim = [4096, 1500, 8192, 77], 16, 4, 128
    total = sum(lens)
    cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
    q, k, v = (torch.randn(total, h, dim, device="cuda", generator=gen, dtype=torch.bfloat16)
               for h in (heads, groups, groups))
    dout = torch.randn(total, heads, dim, device="cuda", generator=gen, dtype=torch.bfloat16)
    ref_out, ref_lse = attention.attention_forward(q.float(), k.float(), v.float(), cu, cu, causal=True)
    ref_grads = attention.attention_backward(dout.float(), q.float(), k.float(), v.float(), ref_out, ref_lse,
                                             cu, cu, causal=True)
    out = {}
    for backend in dispatch.available_backends(q):
        if backend == "reference":
            continue
        os.environ[dispatch.ENV_VAR] = backend
        o, lse = dispatch.forward(q, k, v, cu, cu, max(lens), max(lens), causal=True)
        grads = dispatch.backward(dout, q, k, v, o, lse, cu, cu, max(lens), max(lens), causal=True)
        rel = {name: float((a.float() - b).abs().max() / b.abs().max())
               for name, a, b in (("out", o, ref_out), ("lse", lse, ref_lse), ("dq", grads[0], ref_grads[0]),
                                  ("dk", grads[1], ref_grads[1]), ("dv", grads[2], ref_grads[2]))}
        out[backend] = rel
    os.environ.pop(dispatch.ENV_VAR, None)
    worst = max((v for r in out.values() for v in r.values()), default=float("nan"))
    return {"backends": out, "worst": worst, "ok": bool(out) and worst < 2e-2}


def check_memory() -> dict:
    import torch

    from engine.config import load_config, validate
    from engine.mesh import ParallelMesh
    from engine.optim import MeshOptimizer
    from engine.plan.simulate import simulation_config
    from engine.train import build_dataset, build_model, forward_backward, rank_micro_batches

    cfg = simulation_config(validate(load_config(str(ROOT / CONFIG)), 1, files=False))
    mesh = ParallelMesh.single(torch.device("cuda", 0))
    model = build_model(cfg, mesh)
    opt = MeshOptimizer(model, cfg.optim, mesh, 1)
    batches = rank_micro_batches(build_dataset(cfg), 0, cfg, mesh)
    opt.restore_step(1, moments=True)  # a steady-state step, as --simulate measures it (moments exist)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    loss, _ = forward_backward(model, batches, mesh, cfg.parallel, grad_sync=opt.grad_sync)
    opt.step(loss)
    torch.cuda.synchronize()
    real = torch.cuda.max_memory_allocated()
    sim = subprocess.run([sys.executable, "-m", "engine.plan.cli", "--simulate", CONFIG, "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    report = json.loads(sim.stdout.strip().splitlines()[-1]) if sim.stdout.strip() else {}
    predicted = report.get("peak_gib", float("nan")) * GIB
    return {"max_memory_allocated_gib": real / GIB, "simulated_peak_gib": predicted / GIB,
            "planner_gib": report.get("planner_gib"), "relative_error": predicted / real - 1,
            "ok": abs(predicted / real - 1) <= 0.05, "simulation_stderr": sim.stderr[-2000:]}


# -- the driver --------------------------------------------------------------------------------------
def run_step(name: str, step: dict) -> dict:
    start = time.perf_counter()
    try:
        r = subprocess.run(step["cmd"], cwd=ROOT, capture_output=True, text=True, timeout=step["limit"],
                           env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    except subprocess.TimeoutExpired as e:
        return {"ok": False, "error": f"timed out after {step['limit']} s", "tail": (e.stdout or "")[-2000:],
                "seconds": time.perf_counter() - start}
    out = {"ok": r.returncode == 0, "returncode": r.returncode, "seconds": time.perf_counter() - start}
    lines = r.stdout.strip().splitlines()
    try:
        out["result"] = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        out["tail"] = r.stdout[-3000:]
    if r.returncode:
        out["stderr"] = r.stderr[-3000:]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu_check.json", help="where the JSON of results goes")
    ap.add_argument("--dry-run", action="store_true", help="print what would run; run nothing")
    ap.add_argument("--only", nargs="+", help="run these steps only")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    plan = steps(sys.executable)
    chosen = a.only or list(plan)
    unknown = [s for s in chosen if s not in plan]
    if unknown:
        ap.error(f"unknown step(s) {unknown}; the steps are {', '.join(plan)}")
    if a.inner:  # one in-process step; its JSON on the last line
        result = {"attention": check_attention, "memory": check_memory}[chosen[0]]()
        print(json.dumps(result))
        return 0 if result["ok"] else 1
    if a.dry_run:
        total = sum(plan[s]["limit"] for s in chosen)
        for name in chosen:
            print(f"{name:<11} {plan[name]['limit']:>4} s  {plan[name]['what']}\n            $ {' '.join(plan[name]['cmd'])}")
        print(f"at most {total} s in all; results to {a.out}")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (use --dry-run to see the plan)", file=sys.stderr)
        return 2
    start = time.perf_counter()
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "steps": {}}
    for name in chosen:
        print(f"[gpu_check] {name}: {plan[name]['what']}", file=sys.stderr, flush=True)
        results["steps"][name] = run_step(name, plan[name])
    results["seconds"] = time.perf_counter() - start
    results["ok"] = all(s["ok"] for s in results["steps"].values())
    Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results))
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
