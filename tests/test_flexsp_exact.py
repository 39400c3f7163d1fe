"""I-5 for FlexSP (parallel.sp_mode=flexsp): a batch of unpacked sequences whose lengths span two
orders of magnitude (4 … 400 tokens, long-tailed) trained for 3 steps on worlds of 4 and 8 gloo
processes gives the single-process loss, every gradient, the grad norm and the weights (same
models and tolerances as test_tp_exact.py: loss ≤ 1e-6 relative, gradients ≤ 1e-5, weights
≤ 3e-5 of each tensor's max).

Two kinds of plans: hand-written ones that exercise every shape the runtime must handle in one
step (a block of the whole pool, blocks of 2 and 1 side by side, idle blocks, several
micro-batches, hybrid Ulysses × ring blocks in both placements, and tp and dp around them), and
the planner's own (MILP and greedy) under a small token limit that forces mixed group sizes.
"""
from __future__ import annotations

import pytest

from tests.harness import run_world
from tests.test_tp_exact import MODELS, check_reports, compare, make_cfg, run_steps

DATA = ["data.pack=false", "data.min_doc_len=4", "data.max_doc_len=400", "data.seq_len=400",
        "train.global_batch_size=8"]


def hand_plan(num_ranks: int):
    """Every layout shape over ``num_ranks`` (4 or 8) pool ranks, sequences 0..7 of the step."""
    from engine.flexsp.runtime import Block, StepPlan

    def Group(start, size, seqs):
        return Block(start, size, tuple(seqs))

    if num_ranks == 4:
        mbs = [[Group(0, 4, [0, 1])],
               [Group(0, 2, [2, 3]), Group(2, 1, [4]), Group(3, 1, [5, 6])],
               [Group(0, 1, []), Group(1, 1, [7]), Group(2, 2, [])]]
    else:
        mbs = [[Group(0, 8, [0])],
               [Group(0, 4, [1, 2]), Group(4, 2, [3]), Group(6, 1, [4]), Group(7, 1, [])],
               [Group(0, 2, [5]), Group(2, 2, [6]), Group(4, 4, [7])]]
    return lambda step: StepPlan(tuple(map(tuple, mbs)), makespan=0.0, solver="hand", solve_time_s=0.0)


def flexsp_world(rank, world, meshes):
    """The single-process reference, then each (overrides, plan kind) in this world."""
    from engine.mesh import ParallelMesh

    report = {}
    for model_name, model_over in MODELS.items():
        ref = run_steps(make_cfg(model_over + DATA + ["parallel.dp=1"], 1), ParallelMesh.single())
        for mesh_over, kind in meshes:
            cfg = make_cfg(model_over + DATA + ["parallel.sp_mode=flexsp"] + mesh_over, world)
            p = cfg.parallel
            mesh = ParallelMesh.build(tp=p.tp, cp=p.cp, hp=p.hp, dp=p.dp, placement=p.placement)
            got = run_steps(cfg, mesh, hand_plan(p.dp * p.cp) if kind == "hand" else None)
            key = (model_name, " ".join(mesh_over), kind)
            report[key] = compare(got, ref)
            if kind == "planner":  # the solver (on rank 0, overlapped with training) really mixed sizes
                sizes = {g.size for plan in got["plans"] for mb in plan.micro_batches for g in mb if g.seqs}
                assert len(sizes) >= 2 and len(got["plans"]) == 3, (key, sizes)
    return report


PLANNED = ["flexsp.max_tokens_per_rank=160", "flexsp.solve_time_s=2"]
MESHES = {
    4: [(["parallel.cp=4"], "hand"),
        (["parallel.cp=4", "parallel.hp=2"], "hand"),
        (["parallel.cp=4", "parallel.hp=4", "parallel.placement=context-first"], "hand"),
        (["parallel.cp=2", "parallel.dp=2", "parallel.hp=2"], "hand"),
        (["parallel.cp=4", "parallel.hp=2"] + PLANNED, "planner"),
        (["parallel.cp=4", "flexsp.solver=greedy"] + PLANNED, "planner")],
    8: [(["parallel.cp=4", "parallel.dp=2", "parallel.hp=2"], "hand"),
        (["parallel.cp=4", "parallel.tp=2", "parallel.hp=2"], "hand"),
        (["parallel.cp=8", "parallel.hp=2"] + PLANNED, "planner")],
}


@pytest.mark.parametrize("world", sorted(MESHES))
def test_flexsp_mesh_exact(world):
    check_reports(run_world(world, flexsp_world, MESHES[world], timeout=1200))


def test_long_tailed_lengths_span_two_orders_of_magnitude():
    """The batches above really are long-tailed: the planner's problem, not a uniform one."""
    from engine.data.synthetic import SyntheticDocuments

    data = SyntheticDocuments(300, 4, 400, seed=1234)
    lengths = sorted(data.length(i) for i in range(512))
    assert lengths[0] < 8 and lengths[-1] > 300  # two orders of magnitude
    median, top = lengths[len(lengths) // 2], lengths[int(0.9 * len(lengths)):]
    assert median < 20 and sum(top) > 0.4 * sum(lengths)  # short median, tokens in the tail
    for i in (0, 7, 100):
        assert data.sequence(i).num_tokens == data.length(i)
