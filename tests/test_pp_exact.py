"""I-5 for pipeline parallelism: loss, every gradient, the grad norm and the weights after 3 AdamW
steps equal the single-process run for pp ∈ {2, 4} under 1F1B, interleaved and Seq1F1B (uniform
and compute-balanced units), and for pp = 2 combined with tp = 2, cp = 2 (ring, Ulysses; Seq1F1B × zigzag ring included), hybrid
cp = 4 and dp = 2
(tolerances of test_tp_exact.py). Tied embeddings split over stages stay equal."""
from __future__ import annotations

import pytest

from tests.harness import run_world
from tests.test_tp_exact import check_reports, mesh_world_checks

LAYERS = ["model.num_layers=8"]


MESHES = {
    2: [["parallel.pp=2"],
        ["parallel.pp=2", "parallel.pp_schedule=interleaved", "parallel.vpp=2"],
        ["parallel.pp=2", "parallel.pp_schedule=seq1f1b", "parallel.seq_chunks=2", "parallel.seq_partition=uniform"],
        ["parallel.pp=2", "parallel.pp_schedule=seq1f1b", "parallel.seq_chunks=4"],
        ["parallel.pp=2", "parallel.layers_per_stage=[3,5]"]],
    4: [["parallel.pp=4"],
        ["parallel.pp=4", "parallel.pp_schedule=interleaved", "parallel.vpp=2"],
        ["parallel.pp=4", "parallel.pp_schedule=seq1f1b", "parallel.seq_chunks=2"],
        ["parallel.pp=2", "parallel.tp=2"],
        ["parallel.pp=2", "parallel.tp=2", "parallel.pp_schedule=seq1f1b", "parallel.seq_chunks=2"],
        ["parallel.pp=2", "parallel.cp=2"],
        ["parallel.pp=2", "parallel.cp=2", "parallel.pp_schedule=seq1f1b", "parallel.seq_chunks=2"],
        ["parallel.pp=2", "parallel.cp=2", "parallel.sp_mode=ulysses", "parallel.pp_schedule=seq1f1b",
         "parallel.seq_chunks=3"],
        ["parallel.pp=2", "parallel.dp=2"]],
    8: [["parallel.pp=2", "parallel.cp=4", "parallel.sp_mode=hybrid", "parallel.hp=2",
         "parallel.pp_schedule=seq1f1b", "parallel.seq_chunks=2"],
        ["parallel.pp=2", "parallel.tp=2", "parallel.cp=2", "parallel.pp_schedule=seq1f1b",
         "parallel.seq_chunks=2"],
        ["parallel.pp=2", "parallel.tp=2", "parallel.dp=2", "parallel.pp_schedule=interleaved", "parallel.vpp=2"]],
}


@pytest.mark.parametrize("world", sorted(MESHES))
def test_pp_mesh_exact(world):
    check_reports(run_world(world, mesh_world_checks, MESHES[world], LAYERS, timeout=1500))
