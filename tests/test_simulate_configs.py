"""The shipped configs fit the GPUs they name, by meshtron-plan and by ``meshtron-plan --simulate``
at full scale; and meshtron-plan's per-rank peak agrees with the simulated one within 5 % (I-11)
for every shipped config and for variants over tp, cp (each mode), pp (each schedule), recompute,
sharding, offload, recipe and the memory levers (unfused loss, tiled MLP, activation offload,
fsdp2 offload, precomputed DPO reference, and all of them at once as --max-seq-len picks them).

The variants run at real widths (llama3-8b's layer and vocabulary) with few layers, twice: short
sequences, where the loss's vocabulary-sized tensors set the peak, and long ones, where the saved
activations do. The full-scale simulations of the shipped configs take minutes (``slow``; CI runs
them)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import load_config, validate
from engine.plan import simulate
from engine.plan.devices import ALLOCATOR_FRAGMENTATION, GIB, usable_bytes

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
TOLERANCE = 0.05  # I-11: planner vs simulated peak, per rank

GPU_NAMES = {"a100": "A100", "a800": "A800", "h100": "H100", "h200": "H200"}


def _config(path: Path, overrides: list[str] = ()):
    cfg = load_config(str(path), list(overrides))
    return validate(cfg, simulate.world_size(cfg), files=False)


def _sim_overrides(cfg) -> list[str]:
    """FlexSP's groups change every step: its config is simulated in the static ring mode."""
    return ["parallel.sp_mode=ring"] if cfg.parallel.sp_mode == "flexsp" else []


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_names_its_hardware_and_fits_by_the_planner(path):
    text = path.read_text()
    header = [line for line in text.splitlines() if line.startswith("# Hardware:")]
    assert header, f"{path.name}: no '# Hardware:' comment naming the GPU"
    cfg = _config(path)
    assert cfg.hardware.gpus > 0, f"{path.name}: hardware.gpus is not set"
    assert GPU_NAMES[cfg.hardware.gpu] in header[0] or "CPU" in header[0], header[0]
    spec, mesh, run = simulate.planner_inputs(cfg)
    from engine.plan.memory import stage_memory

    peak = max(sum(stage_memory(spec, mesh, run, s)[0].values()) for s in range(mesh.pp))
    usable = usable_bytes(simulate.gpu_memory_gib(cfg), mesh.communicators(), ALLOCATOR_FRAGMENTATION)
    assert peak <= usable, f"{path.name}: meshtron-plan says {peak / GIB:.1f} GiB > {usable / GIB:.1f} GiB usable"


def _simulate_cli(path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "engine.plan.cli", "--simulate", str(path), *args, "--json"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    try:
        return out, json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return out, None


def _check_report(name: str, report: dict) -> list[str]:
    """What is wrong with a simulation report: errors, breaches, syncs, the planner's distance."""
    bad = [f"{name}: {e}" for e in report["errors"]]
    bad += [f"{name}: NCCL breach {v}" for v in report["nccl_violations"]]
    bad += [f"{name} rank {r['rank']}: {r['host_syncs']} host syncs per step (allowed {r['host_sync_allowance']}): "
            f"{r['host_sync_sites']}" for r in report["ranks"]
            if "error" not in r and r["host_syncs"] > r["host_sync_allowance"]]
    for r in report["ranks"]:
        if "error" in r:
            continue
        gap = r["planner_bytes"] / r["peak_bytes"] - 1
        if abs(gap) > TOLERANCE:
            bad.append(f"{name} rank {r['rank']}: planner {r['planner_bytes'] / GIB:.2f} GiB vs simulated "
                       f"{r['peak_bytes'] / GIB:.2f} GiB ({gap:+.1%})")
    return bad


# CI simulates every shipped config in the steady state (--steady-state: the micro-batches that
# reach the step's peak, 2 without a pipeline, 2·pp with one; test_steady_state_is_the_whole_steps_peak
# shows the peak is the whole step's); MESHTRON_ALL_SIMS=1 runs every micro-batch of each step, and
# the 64k variants and the reach config (as before a release; ~20 min more on 2 cores).
ALL_SIMS = os.environ.get("MESHTRON_ALL_SIMS") == "1"
_ALL_ONLY = pytest.mark.skipif(not ALL_SIMS, reason="simulated with MESHTRON_ALL_SIMS=1")
SHIPPED = [p for p in CONFIGS if not p.stem.startswith("tiny")]


@pytest.mark.slow
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_config_fits_in_simulation(path):
    """The step (its steady state in CI, all of it with MESHTRON_ALL_SIMS=1), optimizer step and
    checkpoint save of the first and the last pipeline stage's first rank at the configured
    shapes: fits, no NCCL breach, at most 4 host syncs, the planner (given the whole config)
    within 5 % of each simulated rank."""
    cfg = _config(path)
    out, report = _simulate_cli(path, *_sim_overrides(cfg), *([] if ALL_SIMS else ["--steady-state"]))
    assert report is not None, out.stdout[-3000:] + out.stderr[-3000:]
    assert not _check_report(path.stem, report), _check_report(path.stem, report)
    assert report["fits"] and out.returncode == 0, out.stdout[-3000:]


def test_tiny_configs_simulate():
    """The CPU configs at their hardware section's world: the same checks, seconds each. They are
    fp32 (CPU); on a GPU they would train in bf16, through the flash kernel — fp32 attention takes
    the reference kernel, a correctness path that reads each document's bounds on the host."""
    bad = []
    for path in CONFIGS:
        if path.stem.startswith("tiny"):
            out, report = _simulate_cli(path, "train.bf16=true", *_sim_overrides(_config(path)))
            if report is None:
                bad.append(f"{path.stem}: no report: {out.stderr[-2000:]}")
                continue
            bad += _check_report(path.stem, report)
            if not report["fits"]:
                bad.append(f"{path.stem}: does not fit")
    assert not bad, bad


# the steady state against whole steps: every schedule, and DPO, with more micro-batches than it keeps
STEADY = {
    "pp1": ["train.global_batch_size=6"],
    "pp1-dpo": ["recipe=dpo", "train.global_batch_size=6"],
    "pp2-1f1b": ["parallel.pp=2", "parallel.cp=2", "train.global_batch_size=8"],
    "pp2-interleaved": ["parallel.pp=2", "parallel.cp=2", "parallel.pp_schedule=interleaved", "parallel.vpp=2",
                        "model.num_layers=4", "train.global_batch_size=8"],
    "pp2-seq1f1b": ["parallel.pp=2", "parallel.cp=2", "parallel.pp_schedule=seq1f1b", "parallel.seq_chunks=2",
                    "train.global_batch_size=8"],
}


def test_steady_state_is_the_whole_steps_peak():
    """``--steady-state`` runs 2 micro-batches (2·pp with a pipeline) of a step of 6 or 8: each
    simulated rank's peak bytes by category and host syncs equal the whole step's, to the byte but
    for DPO's per-pair metrics (a few bytes a pair: one 512-byte allocator block at most here)."""
    bad = []
    for name, overrides in STEADY.items():
        config = ROOT / "configs" / ("llama3-8b-dpo-32k.yaml" if "dpo" in name else "llama3-8b-sft-64k.yaml")
        cfg = _config(config, ["hardware.gpus=8", "model.num_layers=2", "data.seq_len=4096",
                               "train.recompute=none", "optim.sharding=none"] + overrides)
        whole, steady = simulate.simulate(cfg), simulate.simulate(cfg, steady=True)
        assert steady["micro_batches"] < whole["micro_batches"] == whole["configured_micro_batches"], name
        for a, b in zip(whole["ranks"], steady["ranks"]):
            assert "error" not in a and "error" not in b, (name, a.get("traceback"), b.get("traceback"))
            gap = {k: a["categories"][k] - b["categories"][k] for k in a["categories"]}
            slack = 512 if "dpo" in name else 0
            if a["host_syncs"] != b["host_syncs"] or any(not 0 <= g <= slack for g in gap.values()):
                bad.append(f"{name} rank {a['rank']}: whole step {a['categories']} ({a['host_syncs']} syncs), "
                           f"steady state {b['categories']} ({b['host_syncs']} syncs)")
    assert not bad, "\n".join(bad)


# -- the planner over variants ----------------------------------------------------------------------
VARIANTS = {
    "tp8": ["parallel.tp=8", "parallel.cp=1"],
    "cp4-ring": [],
    "cp4-ulysses": ["parallel.sp_mode=ulysses"],
    "cp4-hybrid": ["parallel.sp_mode=hybrid", "parallel.hp=2"],
    "pp2-1f1b": ["parallel.pp=2", "parallel.cp=2"],
    "pp2-interleaved": ["parallel.pp=2", "parallel.cp=2", "parallel.pp_schedule=interleaved", "parallel.vpp=2"],
    "pp2-seq1f1b": ["parallel.pp=2", "parallel.cp=2", "parallel.pp_schedule=seq1f1b", "parallel.seq_chunks=2"],
    "recompute-full": ["train.recompute=full"],
    "recompute-selective": ["train.recompute=selective"],
    "recompute-attention-cached": ["train.recompute=attention-cached"],
    "zero1": ["optim.sharding=zero1"],
    "zero1-offload": ["optim.sharding=zero1", "optim.offload=true"],
    "fsdp2": ["optim.sharding=fsdp2"],
    "dpo": ["recipe=dpo"],
    "loss-unfused": ["train.loss_chunk_tokens=0"],
    "tile-mlp": ["train.tile_mlp=8"],
    "offload-activations": ["train.recompute=full", "train.offload_activations=true", "train.offload_keep_layers=2"],
    "fsdp2-offload": ["optim.sharding=fsdp2", "optim.offload=true"],
    "dpo-precompute": ["recipe=dpo", "dpo.precompute_reference=true"],
    "reach": ["parallel.tp=1", "parallel.cp=8", "parallel.sp_mode=ulysses", "train.recompute=full",
              "train.tile_mlp=11", "train.offload_activations=true", "optim.sharding=fsdp2", "optim.offload=true"],
}
# llama3-8b's widths on 8 GPUs (tp2 × cp4 unless a variant says otherwise), recompute none,
# no sharding: short sequences (the loss's [T, V/tp] tensors set the peak) and long ones (the
# saved activations do)
BASES = {
    "short": ["hardware.gpus=8", "model.num_layers=4", "data.seq_len=16384", "train.global_batch_size=4",
              "train.recompute=none", "optim.sharding=none"],
    "long": ["hardware.gpus=8", "model.num_layers=16", "data.seq_len=65536", "train.global_batch_size=2",
             "train.recompute=none", "optim.sharding=none"],
}


@pytest.mark.parametrize("base", [b if b == "short" else pytest.param(b, marks=_ALL_ONLY) for b in sorted(BASES)])
def test_planner_agrees_with_simulation_over_variants(base):
    bad = []
    for name, overrides in VARIANTS.items():
        config = ROOT / "configs" / ("llama3-8b-dpo-32k.yaml" if name == "dpo" else "llama3-8b-sft-64k.yaml")
        cfg = _config(config, BASES[base] + overrides)
        report = simulate.simulate(cfg)
        bad += _check_report(f"{base}/{name}", report)
    assert not bad, "\n".join(bad)
