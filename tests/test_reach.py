"""The issue's reach goals, by the planner's search (``meshtron-plan --max-seq-len``): on 80 GB H100s
with 2 TiB of host memory per node, the longest trainable sequence meets each goal, and the shipped
configs/reach/*.yaml are exactly what ``--emit-config`` writes for them. Each was confirmed by
``meshtron-plan --simulate`` (the README's table records the simulated peaks; one of them is
simulated again here, the others take minutes each)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# (model, GPUs, recipe, goal in tokens) — the goals
GOALS = [("llama3-8b", 1, "sft", 600_000), ("llama3-8b", 8, "sft", 4_000_000), ("llama3-70b", 8, "sft", 250_000),
         ("llama3-70b", 32, "sft", 4_000_000), ("qwen2.5-7b", 8, "dpo", 1_000_000),
         ("qwen2.5-72b", 32, "sft", 1_000_000), ("qwen2.5-72b", 32, "dpo", 256_000)]


def _plan(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.plan.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("model,gpus,recipe,goal", GOALS, ids=[f"{m}-{g}-{r}" for m, g, r, _ in GOALS])
def test_goal_met_and_shipped_config_is_the_plan(model, gpus, recipe, goal, tmp_path):
    emitted = tmp_path / "plan.yaml"
    out = _plan("--model", model, "--gpus", str(gpus), "--recipe", recipe, "--gpu", "h100", "--max-seq-len",
                "--json", "--emit-config", str(emitted))
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.splitlines()[-1])
    assert got["max_seq_len"] >= goal, got
    assert got["peak_gib"] < 80 and got["host_gib_per_node"] <= 2048, got
    shipped = ROOT / "configs" / "reach" / f"{model}-{gpus}gpu-{recipe}.yaml"
    assert yaml.safe_load(shipped.read_text()) == yaml.safe_load(emitted.read_text()), \
        f"{shipped.name} is not what meshtron-plan --max-seq-len --emit-config writes now; regenerate it"


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MESHTRON_ALL_SIMS") != "1",
                    reason="minutes on 2 cores; simulated with MESHTRON_ALL_SIMS=1 (CI plans all seven and "
                           "simulates the reach variant at 16k in test_simulate_configs)")
def test_simulation_confirms_llama3_8b_on_8_gpus():
    """The 4M-token Llama-3-8B run on 8 GPUs, simulated: it fits, within 5 % of the planner."""
    out = subprocess.run([sys.executable, "-m", "engine.plan.cli", "--simulate",
                          str(ROOT / "configs" / "reach" / "llama3-8b-8gpu-sft.yaml"), "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=1200)
    report = json.loads(out.stdout.splitlines()[-1])
    assert out.returncode == 0 and report["fits"], out.stdout[-2000:] + out.stderr[-2000:]
    assert abs(report["planner_gib"] / report["peak_gib"] - 1) <= 0.05, report
    assert report["nccl_violations"] == [] and report["host_syncs_per_step"] <= report["host_sync_allowance"]
