"""I-5 for context parallelism: whole-model loss, every gathered gradient, the grad norm and the
weights after 3 AdamW steps equal the single-process run for every sp_mode, alone and combined
with tp = 2 and dp = 2, in worlds of 4 and 8 (same models, data and tolerances as
test_tp_exact.py: loss ≤ 1e-6 relative, gradients ≤ 1e-5 and weights ≤ 3e-5 of their max)."""
from __future__ import annotations

import pytest

from tests.harness import run_world
from tests.test_tp_exact import check_reports, mesh_world_checks

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
    check_reports(run_world(world, mesh_world_checks, MESHES[world], timeout=1200))
