"""Which meshes fit, fastest first, and the longest sequence a mesh holds.

A mesh is (tp, cp = hp·rp, pp, dp) with tp·cp·pp·dp = the number of GPUs, under meshtron's rules
(engine/config/checks.py): tp divides the query heads, the KV heads and the MLP width and stays
inside a node; tp·hp divides the heads and the KV heads per tp rank divide or are a multiple of hp;
pp ≤ layers (split evenly, or first and last stages smaller); the global batch divides over dp
(and over dp·pp for the interleaved schedule); fsdp2 in bf16 has no pipeline; DPO no Seq1F1B.
"""
from __future__ import annotations

import dataclasses

from engine.model.sharding import stage_layers
from engine.plan.devices import ALLOCATOR_FRAGMENTATION
from engine.plan.memory import Breakdown, Mesh, Run, micro_batches, rank_memory
from engine.plan.models import ModelSpec
from engine.plan.timing import step_time


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def mesh_problem(m: ModelSpec, mesh: Mesh, run: Run, gpus_per_node: int = 8) -> str | None:
    """Why ``mesh`` cannot run ``m`` (None when it can): the flag to change and the rule."""
    H, G, tp, hp = m.num_attention_heads, m.num_query_groups, mesh.tp, mesh.hp
    if H % tp or G % tp or m.ffn_hidden_size % tp:
        return f"--tp {tp} must divide the {H} heads, {G} KV heads and MLP width {m.ffn_hidden_size}"
    if tp > gpus_per_node:
        return f"--tp {tp} spans more than one node of {gpus_per_node} GPUs"
    if mesh.cp % hp or H % (tp * hp):
        return f"--hp {hp} must divide --cp {mesh.cp}, and tp·hp must divide the {H} heads"
    if hp > 1 and (G // tp) % hp and hp % (G // tp):
        return f"--hp {hp}: the {G // tp} KV heads per tp rank neither divide nor are a multiple of hp"
    if mesh.pp > m.num_layers:
        return f"--pp {mesh.pp} is more than the {m.num_layers} layers"
    try:
        stage_layers(m.num_layers, mesh.pp, mesh.vpp)
    except ValueError as e:
        return f"--pp {mesh.pp}: {e}"
    if run.global_batch_size and run.global_batch_size % (mesh.dp * run.micro_batch_size):
        return f"--global-batch {run.global_batch_size} does not divide over dp={mesh.dp}"
    if run.sharding == "fsdp2" and run.bf16 and mesh.pp > 1:
        return "--sharding fsdp2 with bf16 runs without pipeline stages (engine/config/checks.py); use --pp 1"
    if run.recipe == "dpo" and run.pp_schedule == "seq1f1b":
        return "--recipe dpo does not run with --pp-schedule seq1f1b"
    if run.pp_schedule == "interleaved" and micro_batches(run, mesh) % mesh.pp:
        return f"--pp-schedule interleaved needs the micro-batches per dp rank to be a multiple of pp={mesh.pp}"
    return None


def candidate_meshes(m: ModelSpec, gpus: int, run: Run, gpus_per_node: int = 8, vpp: int = 1,
                     **fixed: int | None) -> list[Mesh]:
    """Every valid mesh on ``gpus`` GPUs; ``fixed`` pins some of tp, cp, hp, pp (None = free)."""
    out = []
    for tp in divisors(gpus):
        for cp in divisors(gpus // tp):
            for hp in divisors(cp):
                for pp in divisors(gpus // (tp * cp)):
                    mesh = Mesh(tp, cp, hp, pp, gpus // (tp * cp * pp), vpp if pp > 1 else 1)
                    pinned = all(v is None or getattr(mesh, k) == v for k, v in fixed.items())
                    if pinned and mesh_problem(m, mesh, run, gpus_per_node) is None:
                        out.append(mesh)
    return out


@dataclasses.dataclass
class Candidate:
    mesh: Mesh
    memory: Breakdown
    time: dict[str, float]


def plan(m: ModelSpec, gpus: int, run: Run, gpu_memory_gib: float, device, gpus_per_node: int = 8,
         vpp: int = 1, fragmentation: float = ALLOCATOR_FRAGMENTATION, **fixed) -> tuple[list[Candidate], int]:
    """``(meshes that fit, fastest first; number of valid meshes tried)``."""
    meshes = candidate_meshes(m, gpus, run, gpus_per_node, vpp, **fixed)
    fits = []
    for mesh in meshes:
        mem = rank_memory(m, mesh, run, gpu_memory_gib, fragmentation)
        if mem.fits:
            fits.append(Candidate(mesh, mem, step_time(m, mesh, run, device, gpus_per_node)))
    fits.sort(key=lambda c: (c.time["total"], c.memory.total))
    return fits, len(meshes)


def max_seq_len(m: ModelSpec, mesh: Mesh, run: Run, gpu_memory_gib: float,
                fragmentation: float = ALLOCATOR_FRAGMENTATION, limit: int = 2**26) -> int:
    """Longest ``seq_len`` (a multiple of the mesh's padding unit, 2·cp·tp or tp) whose peak fits;
    0 when not even one unit does. Memory grows with seq_len, so a binary search finds it."""
    unit = 2 * mesh.cp * mesh.tp if mesh.cp > 1 else mesh.tp

    def fits(k: int) -> bool:
        return rank_memory(m, mesh, dataclasses.replace(run, seq_len=k * unit), gpu_memory_gib, fragmentation).fits

    lo, hi = 0, 1
    while fits(hi):
        lo, hi = hi, 2 * hi
        if hi * unit > limit:
            return lo * unit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * unit
