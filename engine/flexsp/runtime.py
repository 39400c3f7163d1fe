"""FlexSP at run time (``parallel.sp_mode: flexsp``): per-step SP groups of different sizes.

The dp×cp ranks of a tp slice form a *pool* of N ranks, numbered in ``dp_cp`` order (cp index
fastest, so neighbouring pool ranks are neighbouring devices). Every step the planner
(:mod:`engine.flexsp.planner`) returns micro-batches; each micro-batch splits the pool into
aligned blocks of 2^i ranks and gives every block a list of the step's sequences. A block of
size d runs hybrid attention over its ranks: Ulysses over ``hp_d = min(d, parallel.hp)`` ranks
around a zigzag ring of ``rp_d = d / hp_d`` ranks (``parallel.placement`` decides which of the
two is contiguous), on its sequences packed with per-document attention (I-4) and laid out
exactly as the static cp modes lay out a micro-batch (:func:`split_for_cp`).

Process groups: every aligned block of every pool, with its hp and rp subgroups, is created
once at start-up (``2N − 1`` blocks per pool; all ranks create all groups in the same order, as
``new_group`` requires), then the attention switches between them per micro-batch.

Why the math does not change (I-5): documents never attend to each other, each token's loss is
divided by the step's global valid-token count, and gradients are summed over the pool
(the optimizer's fp32 `main_grad` buckets, engine/parallel/grads.py, as for dp×cp) — so which rank computed which
token is irrelevant up to summation order. Deadlock freedom: within a micro-batch the groups are
disjoint and every rank walks the micro-batches in the same order, so the collectives of
micro-batch k only wait for ranks that have finished micro-batch k − 1.

The plan of step i + 1 is solved on a background thread of global rank 0 while step i trains
(``flexsp.overlap``) and broadcast at the start of step i + 1 (the solver has a time limit, so
ranks must not solve independently: their plans could differ).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.data.packing import concat, valid_tokens
from engine.parallel.comm import all_reduce_
from engine.parallel.context import CoreAttention
from engine.parallel.context.layout import split_for_cp
from engine.parallel.context.ring import DoubleRing


@dataclass(frozen=True)
class Block:
    """One SP group of a planned micro-batch: pool ranks [start, start + size), its sequences
    (positions in the step's global batch)."""

    start: int
    size: int
    seqs: tuple[int, ...]


@dataclass(frozen=True)
class StepPlan:
    """What every rank runs in a step: micro-batches of blocks, plus the planner's figures."""

    micro_batches: tuple[tuple[Block, ...], ...]
    makespan: float
    solver: str
    solve_time_s: float

    @classmethod
    def of(cls, plan) -> "StepPlan":
        """Plain copy of a planner's plan (any object with those attributes)."""
        mbs = tuple(tuple(Block(int(g.start), int(g.size), tuple(int(i) for i in g.seqs)) for g in mb)
                    for mb in plan.micro_batches)
        return cls(mbs, float(plan.makespan), str(plan.solver), float(plan.solve_time_s))


@dataclass(frozen=True)
class GroupShape:
    """Where pool rank ``j`` of a block of ``size`` ranks sits in its hp × rp attention grid."""

    size: int
    hp: int
    head_first: bool

    @property
    def rp(self) -> int:
        return self.size // self.hp

    def coords(self, j: int) -> tuple[int, int]:
        """(ring rank, head rank) of block member ``j``."""
        if self.head_first:
            return j // self.hp, j % self.hp
        return j % self.rp, j // self.rp

    def member(self, ring_rank: int, head_rank: int) -> int:
        return ring_rank * self.hp + head_rank if self.head_first else head_rank * self.rp + ring_rank


def group_shape(size: int, max_hp: int, placement: str) -> GroupShape:
    """Ulysses degree min(size, max_hp) — both powers of two — and the ring for the rest."""
    return GroupShape(size, min(size, max_hp), placement == "head-first")


class FlexGroups:
    """The attention of every aligned block this rank belongs to, created once (collectively)."""

    def __init__(self, mesh, max_hp: int, placement: str):
        self.mesh, self.max_hp, self.placement = mesh, max_hp, placement
        pools = mesh.layout.groups("dp_cp") if mesh.layout.world_size > 1 else [[0]]
        self.num_ranks = len(pools[0])
        self.pool_index = mesh.index("dp_cp")
        self._attention: dict[tuple[int, int], CoreAttention] = {}
        size = 1
        while size <= self.num_ranks:
            shape = group_shape(size, max_hp, placement)
            for start in range(0, self.num_ranks - size + 1, size):
                for pool in pools:  # the same order on every rank
                    self._build(pool, start, shape)
            size *= 2

    def _build(self, pool: list[int], start: int, shape: GroupShape) -> None:
        members = pool[start:start + shape.size]
        hp_groups = [[members[shape.member(r, h)] for h in range(shape.hp)] for r in range(shape.rp)]
        rp_groups = [[members[shape.member(r, h)] for r in range(shape.rp)] for h in range(shape.hp)]
        made = {}
        for ranks in hp_groups + rp_groups:
            made[tuple(ranks)] = dist.new_group(ranks) if len(ranks) > 1 else None
        me = self.mesh.rank
        if me not in members:
            return
        ring_rank, head_rank = shape.coords(members.index(me))
        rp_ranks, hp_ranks = rp_groups[head_rank], hp_groups[ring_rank]
        ring = DoubleRing(rp_ranks, ring_rank, inner_group=made[tuple(rp_ranks)])  # a plain ring
        self._attention[(start, shape.size)] = CoreAttention(shape.hp, made[tuple(hp_ranks)], head_rank, ring)

    def attention(self, start: int, size: int) -> CoreAttention:
        return self._attention[(start, size)]

    def shape(self, size: int) -> GroupShape:
        return group_shape(size, self.max_hp, self.placement)


class FlexAttention:
    """The model's core attention under flexsp: the attention of the block in use."""

    def __init__(self, groups: FlexGroups):
        self.groups, self.active = groups, None

    def use(self, start: int, size: int) -> None:
        self.active = self.groups.attention(start, size)

    def __call__(self, q, k, v, batch, prefix=None):
        assert self.active is not None, "FlexAttention.use(start, size) before the forward"
        return self.active(q, k, v, batch, prefix)


class FlexSPRuntime:
    """Groups, attention and per-step plans of a flexsp run (one per process)."""

    def __init__(self, cfg, mesh, plan_fn=None):
        self.cfg, self.mesh = cfg, mesh
        self.groups = FlexGroups(mesh, cfg.parallel.hp, cfg.parallel.placement)
        self.attention = FlexAttention(self.groups)
        self._plan_fn = plan_fn  # tests: step -> Plan, instead of the solver
        self._async = None
        self.plans: list[StepPlan] = []  # every step's plan, on every rank

    # -- planning -------------------------------------------------------------------------------
    def step_indices(self, step: int) -> list[int]:
        gbs = self.cfg.train.global_batch_size
        return list(range(step * gbs, (step + 1) * gbs))

    def solve(self, dataset, step: int):
        """The plan of ``step`` (sequence ids are positions in :meth:`step_indices`)."""
        if self._plan_fn is not None:
            return self._plan_fn(step)
        from engine.flexsp.cost import CostModel
        from engine.flexsp.planner import plan_step

        f = self.cfg.flexsp
        if not hasattr(self, "_cost"):
            self._cost = CostModel.from_config(self.cfg)
        lengths = [sequence_length(dataset, i) for i in self.step_indices(step)]
        return plan_step(lengths, self.groups.num_ranks, self._cost, max_hp=self.cfg.parallel.hp,
                         buckets=f.buckets, solver=f.solver, time_limit=f.solve_time_s)

    def plan(self, dataset, step: int, last_step: int):
        """The plan of ``step``, the same on every rank; starts solving ``step + 1`` in the
        background when ``flexsp.overlap`` is on."""
        plan = None
        if self.mesh.rank == 0:
            if self._async is not None and self._async[0] == step:
                plan = self._async[1].result(step)
            else:
                plan = self.solve(dataset, step)
            if self.cfg.flexsp.overlap and step + 1 < last_step and self._plan_fn is None:
                from engine.flexsp.planner import AsyncPlanner

                if self._async is None:
                    self._async = [None, AsyncPlanner(lambda s: self.solve(dataset, s))]
                self._async[0] = step + 1
                self._async[1].submit(step + 1)
            plan = StepPlan.of(plan)
        if dist.is_initialized() and dist.get_world_size() > 1:
            plan = broadcast_plan(plan, self.mesh.device)
        self.plans.append(plan)
        return plan

    # -- one step -------------------------------------------------------------------------------
    def micro_batches(self, dataset, step: int, plan) -> list[tuple[int, int, object | None, int]]:
        """This rank's work per planned micro-batch, built on the host: ``(start, size, batch or
        None, valid)`` where ``batch`` is this rank's slice of its block's packed sequences (None:
        an idle block; CPU tensors, moved when it runs) and ``valid`` the block's valid tokens when
        this rank is the block's first member, else 0."""
        index, ids, out = self.groups.pool_index, self.step_indices(step), []
        for groups in plan.micro_batches:
            g = next(g for g in groups if g.start <= index < g.start + g.size)
            if not g.seqs:
                out.append((g.start, g.size, None, 0))
                continue
            full = concat([dataset.sequence(ids[s]) for s in g.seqs])
            shape = self.groups.shape(g.size)
            ring_rank, head_rank = shape.coords(index - g.start)
            batch = split_for_cp(full, rp=shape.rp, hp=shape.hp, tp=self.mesh.tp, ring_rank=ring_rank,
                                 head_rank=head_rank)
            out.append((g.start, g.size, batch, full.num_valid if index == g.start else 0))
        return out

    def forward_backward(self, model, dataset, step: int, plan) -> tuple[torch.Tensor, int]:
        """Gradients of Σ token losses / global valid tokens over this rank's planned work;
        returns (loss of the step as a 0-dim device tensor, valid tokens of the step). The valid
        count is the step's, counted on the host from the data (no collective, no device read,
        I-9); the loss is read by the caller, once, with what it logs."""
        work = self.micro_batches(dataset, step, plan)
        return self.run(model, work, valid_tokens(dataset, self.step_indices(step)))

    def run(self, model, work: list, num_valid: int) -> tuple[torch.Tensor, int]:
        """The device part of :meth:`forward_backward`: ``work`` from :meth:`micro_batches`,
        ``num_valid`` the step's global valid-token count (a host int)."""
        from engine.parallel.pipeline.runtime import PipelineRuntime

        divisor = torch.full((), float(num_valid), dtype=torch.float64, device=self.mesh.device)
        runtime = PipelineRuntime(list(model), self.mesh)
        total = torch.zeros((), dtype=torch.float64, device=self.mesh.device)
        for start, size, batch, _ in work:
            if batch is None:
                continue
            self.attention.use(start, size)
            total += runtime.run([[batch.to(self.mesh.device)]], divisor)
        return all_reduce_(total, self.mesh.group("dp_cp")), num_valid

    def close(self) -> None:
        if self._async is not None:
            close = getattr(self._async[1], "close", None)
            if close:
                close()


# -- the plan's broadcast ---------------------------------------------------------------------
_PLAN_CAPACITY = 1 << 15  # int64 words of the first broadcast: plans of up to ~30k blocks + sequences


def _encode_plan(plan: StepPlan) -> list[int]:
    """``[length, M, (B, (start, size, n, seqs…)…)…, makespan bits, solve time bits, solver bytes…]``."""
    words = [0, len(plan.micro_batches)]
    for groups in plan.micro_batches:
        words.append(len(groups))
        for g in groups:
            words += [g.start, g.size, len(g.seqs), *g.seqs]
    words += [struct.unpack("<q", struct.pack("<d", x))[0] for x in (plan.makespan, plan.solve_time_s)]
    words += list(plan.solver.encode())
    words[0] = len(words)
    return words


def _decode_plan(words: list[int]) -> StepPlan:
    it = iter(words[1:words[0]])
    mbs = []
    for _ in range(next(it)):
        groups = []
        for _ in range(next(it)):
            start, size, n = next(it), next(it), next(it)
            groups.append(Block(start, size, tuple(next(it) for _ in range(n))))
        mbs.append(tuple(groups))
    makespan, solve = (struct.unpack("<d", struct.pack("<q", next(it)))[0] for _ in range(2))
    return StepPlan(tuple(mbs), makespan, bytes(it).decode(), solve)


def broadcast_plan(plan: StepPlan | None, device) -> StepPlan:
    """Global rank 0's plan on every rank, as int64 words broadcast on the mesh's device (I-7):
    one broadcast of a fixed-size buffer and one device-to-host read on the receivers (a second
    pair only for a plan larger than the buffer), where ``broadcast_object_list`` needs two."""
    from engine.data.packing import to_device

    if dist.get_rank() == 0:
        words = _encode_plan(plan)
        head = torch.zeros(_PLAN_CAPACITY, dtype=torch.int64)
        head[:min(len(words), _PLAN_CAPACITY)] = torch.tensor(words[:_PLAN_CAPACITY], dtype=torch.int64)
        dist.broadcast(to_device(head, device), src=0)
        if len(words) > _PLAN_CAPACITY:
            dist.broadcast(to_device(torch.tensor(words[_PLAN_CAPACITY:], dtype=torch.int64), device), src=0)
        return plan
    buf = torch.empty(_PLAN_CAPACITY, dtype=torch.int64, device=device)
    dist.broadcast(buf, src=0)
    words = buf.tolist()  # the one host read of the plan
    if words[0] > _PLAN_CAPACITY:
        rest = torch.empty(words[0] - _PLAN_CAPACITY, dtype=torch.int64, device=device)
        dist.broadcast(rest, src=0)
        words += rest.tolist()
    return _decode_plan(words)


def sequence_length(dataset, index: int) -> int:
    """Tokens of sequence ``index``, without building it when the dataset can tell."""
    length = getattr(dataset, "length", None)
    return length(index) if length else dataset.sequence(index).num_tokens
