"""What the host knows so the device is never asked (I-9), and which GPU a rank takes.

* Every micro-batch carries its longest document (``max_seqlen``; ring streams and their halves
  in ``CPMeta``; Seq1F1B units their key ranges) and its loss-token count as host ints, equal to
  what the tensors say, kept by ``.to()``.
* A step's global valid-token count from the data alone (``step_valid_tokens``) equals the sum
  over every dp×cp rank's micro-batches, for packed and unpacked synthetic data and SFT records.
* FlexSP's plan survives its int64 encoding and the broadcast from global rank 0 (gloo, 4 ranks),
  also when it is larger than the first buffer; Seq1F1B's host-side cp gather order (whose rank's
  slice comes where in the prefix all-gather) is the order a real all-gather produces, for ring,
  Ulysses and both hybrid placements.
* ``engine.cli.local_device_index``: LOCAL_RANK, else SLURM_LOCALID, else a clear error on a
  multi-GPU node with several processes; 0 with one visible GPU.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.harness import run_world
from tests.test_tp_exact import make_cfg

DATA = Path(__file__).resolve().parents[1] / "configs" / "data" / "tiny"


def _max_len(cu: torch.Tensor) -> int:
    return int(cu.diff().max()) if cu.numel() > 1 else 0


def test_batches_carry_host_facts():
    from engine import train as T
    from engine.loss import IGNORE_INDEX
    from engine.mesh import ParallelMesh

    class Where:  # the mesh coordinates rank_micro_batches reads, for every cp rank in turn
        def __init__(self, cp, hp, rank):
            self.cp, self.hp, self.rp, self.tp, self.dp = cp, hp, cp // hp, 1, 1
            self.coords = {"rp": rank // hp, "hp": rank % hp, "dp": 0}
            self.device = torch.device("cpu")

        def index(self, axis):
            return self.coords[axis]

    cfg = make_cfg(["data.seq_len=128", "data.min_doc_len=3", "data.max_doc_len=50", "train.global_batch_size=2",
                    "parallel.dp=1"], 1)
    data = T.build_dataset(cfg)
    for mb in T.host_micro_batches(data, 0, cfg, ParallelMesh.single()):
        assert mb.max_seqlen == _max_len(mb.cu_seqlens) > 0
        assert mb.num_valid == int((mb.labels != IGNORE_INDEX).sum())
        moved = mb.to("cpu")
        assert (moved.max_seqlen, moved.num_valid) == (mb.max_seqlen, mb.num_valid)
    for cp, hp in ((2, 1), (4, 2)):
        for rank in range(cp):
            for mb in T.host_micro_batches(data, 0, cfg, Where(cp, hp, rank)):
                m = mb.meta
                assert (mb.max_seqlen, m.max_len, m.half_max_len) == (
                    _max_len(mb.cu_seqlens), _max_len(m.cu_seqlens), _max_len(m.half_cu_seqlens))
                assert mb.num_valid == int((mb.labels != IGNORE_INDEX).sum())
                assert mb.to("cpu").meta.half_max_len == m.half_max_len
    from engine.parallel.pipeline.seqchunks import split_units

    full = data.sequence(0)
    for unit in split_units(full, [48, 48, 32]):
        assert (unit.max_seqlen, unit.max_seqlen_k) == (_max_len(unit.cu_seqlens), _max_len(unit.cu_seqlens_k))


@pytest.mark.parametrize("kind", ["packed", "unpacked", "sft-packed", "sft-unpacked"])
def test_step_valid_tokens_is_the_sum_over_ranks(kind):
    from engine import train as T

    over = {"packed": ["data.seq_len=96", "data.min_doc_len=3", "data.max_doc_len=40"],
            "unpacked": ["data.pack=false", "data.seq_len=96", "data.min_doc_len=3", "data.max_doc_len=96"],
            "sft-packed": ["data.source=files", f"data.path={DATA / 'sft.jsonl'}",
                           f"data.tokenizer={DATA / 'tokenizer'}", "data.format=messages", "data.seq_len=256",
                           "model.vocab_size=512"],
            "sft-unpacked": ["data.source=files", f"data.path={DATA / 'sft.jsonl'}",
                             f"data.tokenizer={DATA / 'tokenizer'}", "data.format=messages", "data.seq_len=256",
                             "data.pack=false", "model.vocab_size=512"]}[kind]
    cfg = make_cfg(over + ["train.global_batch_size=6", "parallel.dp=1"], 1)
    data = T.build_dataset(cfg)
    for step in (0, 3):
        built = sum(data.sequence(i).num_valid for i in range(step * 6, step * 6 + 6))
        assert T.step_valid_tokens(data, step, cfg) == built > 0


def _plans():
    from engine.flexsp.runtime import Block, StepPlan

    small = StepPlan(((Block(0, 2, (3, 1)), Block(2, 1, ()), Block(3, 1, (0,))), (Block(0, 4, (2,)),)),
                     makespan=1.25e-3, solver="milp", solve_time_s=0.5)
    big = StepPlan(tuple((Block(0, 1, tuple(range(i, i + 40))),) for i in range(0, 4000, 40)),
                   makespan=float("inf"), solver="greedy", solve_time_s=0.0)
    return small, big


def _world(rank, world):
    """FlexSP's plan broadcast; Seq1F1B's host-side cp gather order against a real all-gather."""
    import engine.flexsp.runtime as R
    from engine.mesh import ParallelMesh
    from engine.parallel.comm import gather_shards
    from engine.parallel.pipeline.seqchunks import cp_gather_order

    plans = []
    for plan, capacity in zip(_plans(), (R._PLAN_CAPACITY, 1000)):
        R._PLAN_CAPACITY = capacity  # the big plan does not fit: the second broadcast carries the rest
        plans.append(R.broadcast_plan(plan if rank == 0 else None, torch.device("cpu")))
    orders = {}
    for hp, placement in ((1, "head-first"), (2, "head-first"), (2, "context-first"), (4, "head-first")):
        mesh = ParallelMesh.build(cp=4, hp=hp, placement=placement)
        mine = torch.tensor([mesh.index("rp"), mesh.index("hp")])
        gathered = [tuple(t.tolist()) for t in gather_shards(mine, mesh.group("cp"))]
        orders[(hp, placement)] = (cp_gather_order(mesh), gathered)
    return plans, orders


def test_plan_broadcast_and_cp_gather_order():
    from engine.flexsp.runtime import _decode_plan, _encode_plan

    small, big = _plans()
    assert len(_encode_plan(big)) > 1000
    for plan in (small, big):
        assert _decode_plan(_encode_plan(plan)) == plan
    for plans, orders in run_world(4, _world, timeout=300):
        assert plans == [small, big]
        for key, (host, gathered) in orders.items():
            assert host == gathered, key
    assert orders[(2, "context-first")][0] != [(r, h) for r in range(2) for h in range(2)]  # not the cp index order


@pytest.mark.parametrize("env,count,want", [
    ({"LOCAL_RANK": "3", "SLURM_LOCALID": "1", "WORLD_SIZE": "16"}, 8, 3),   # torchrun
    ({"SLURM_LOCALID": "5", "WORLD_SIZE": "16"}, 8, 5),                      # plain srun
    ({"SLURM_LOCALID": "5"}, 8, 5),
    ({"LOCAL_RANK": "3", "WORLD_SIZE": "16"}, 1, 0),   # one GPU per process (CUDA_VISIBLE_DEVICES)
    ({}, 8, 0),                                        # a single process
    ({"WORLD_SIZE": "1"}, 4, 0),
])
def test_local_device_index(env, count, want):
    from engine.cli import local_device_index

    assert local_device_index(env, count) == want


def test_local_device_index_errors():
    from engine.cli import local_device_index

    with pytest.raises(RuntimeError, match="LOCAL_RANK nor SLURM_LOCALID"):
        local_device_index({"WORLD_SIZE": "8"}, 8)
    with pytest.raises(RuntimeError, match="SLURM_LOCALID=9 but this process sees 8 GPUs"):
        local_device_index({"SLURM_LOCALID": "9", "WORLD_SIZE": "16"}, 8)
