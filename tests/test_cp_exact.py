"""I-5 for context parallelism: whole-model loss, every gathered gradient, the grad norm and the
weights after 3 AdamW steps equal the single-process run for every sp_mode, alone and combined
with tp = 2 and dp = 2, in worlds of 4 and 8 (same models, data and tolerances as
test_tp_exact.py: loss ≤ 1e-6 relative, tensors ≤ 1e-5 of their max)."""
from __future__ import annotations

import pytest

from tests.harness import run_world
from tests.test_tp_exact import MODELS, check, compare, make_cfg, run_steps


def world_checks(rank, world, meshes):
    from engine.mesh import ParallelMesh

    report = {}
    for model_name in ("llama-gqa", "qwen2-bias-tied"):
        over = MODELS[model_name]
        ref = run_steps(make_cfg(over + ["parallel.dp=1"], 1), ParallelMesh.single())
        for mesh_over in meshes:
            cfg = make_cfg(over + mesh_over, world)
            p = cfg.parallel
            mesh = ParallelMesh.build(tp=p.tp, cp=p.cp, hp=p.hp, dp=p.dp, placement=p.placement)
            report[(model_name, " ".join(mesh_over))] = compare(run_steps(cfg, mesh), ref)
    return report


MESHES = {
    4: [["parallel.cp=2", "parallel.tp=2"], ["parallel.cp=2", "parallel.dp=2"],
        ["parallel.cp=2", "parallel.sp_mode=ulysses", "parallel.tp=2"],
        ["parallel.cp=2", "parallel.sp_mode=ulysses", "parallel.dp=2"],
        ["parallel.cp=4", "parallel.sp_mode=hybrid", "parallel.hp=2"],
        ["parallel.cp=4", "parallel.sp_mode=hybrid", "parallel.hp=2", "parallel.placement=context-first"],
        ["parallel.cp=4", "parallel.ring_window=2"]],
    8: [["parallel.cp=4", "parallel.sp_mode=hybrid", "parallel.hp=2", "parallel.tp=2"],
        ["parallel.cp=4", "parallel.sp_mode=hybrid", "parallel.hp=2", "parallel.dp=2"],
        ["parallel.cp=4", "parallel.sp_mode=ulysses", "parallel.tp=2"],
        ["parallel.cp=2", "parallel.tp=2", "parallel.dp=2"]],
}


@pytest.mark.parametrize("world", sorted(MESHES))
def test_cp_mesh_exact(world):
    reports = run_world(world, world_checks, MESHES[world], timeout=1200)
    for rank, report in enumerate(reports):
        for key, worst in report.items():
            if rank == 0:
                print(key, {k: f"{v:.2e}" for k, v in worst.items()})
            check(worst, key)
