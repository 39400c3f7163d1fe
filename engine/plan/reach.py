"""The longest trainable sequence on N GPUs: search the mesh AND the memory levers.

A lever trades speed for memory (engine/plan/memory.py models each, engine/plan/timing.py its
cost): ``recompute`` (full keeps only each layer's input), ``tile_mlp`` (the MLP's ``[T, f/tp]``
one tile at a time), the fused loss (always on here: it is never slower, tools/bench_memory.py),
``offload_activations`` with ``offload_keep_layers`` (layer inputs in host memory, the first K
layers of each chunk kept on the GPU), optimizer sharding with ``offload`` (zero1: the optimizer's
shard in host memory; fsdp2: parameters, gradients and optimizer states there) and, for DPO,
``precompute_reference`` (no reference weights in training).

Two passes. (1) For every valid mesh, the most frugal settings — recompute full, tiles, every
state and every layer input that can live in host memory in host memory, K the most layers the
GPU still holds — give the mesh's longest sequence by binary search; the best mesh is the one
with the longest (ties: the faster step). No lever setting holds more than the frugal one, so
this is the longest any setting reaches on that mesh. (2) At that length, every combination of
levers that still fits (device and host memory) is timed, and the fastest is the answer: a lever
is on only where the sequence needs it.
"""
from __future__ import annotations

import dataclasses
import itertools
import math

from engine.plan.devices import ALLOCATOR_FRAGMENTATION, GIB
from engine.plan.memory import Breakdown, Mesh, Run, rank_memory
from engine.plan.models import ModelSpec
from engine.plan.search import candidate_meshes
from engine.plan.timing import step_time


@dataclasses.dataclass(frozen=True)
class Budget:
    gpu_memory_gib: float
    host_memory_gib_per_node: float = 2048.0
    gpus_per_node: int = 8
    fragmentation: float = ALLOCATOR_FRAGMENTATION


@dataclasses.dataclass
class Reach:
    seq_len: int
    mesh: Mesh
    run: Run
    memory: Breakdown
    time: dict[str, float]

    def host_gib_per_node(self, gpus_per_node: int) -> float:
        return self.memory.host * min(gpus_per_node, self.mesh.world) / GIB

    def settings(self) -> dict:
        """The meshtron config keys of this run (``meshtron-plan --emit-config`` writes them)."""
        r, m = self.run, self.mesh
        return {"tp": m.tp, "cp": m.cp, "hp": m.hp, "pp": m.pp, "dp": m.dp, "recompute": r.recompute,
                "tile_mlp": r.tile_mlp, "loss_chunk_tokens": r.loss_chunk, "offload_activations": r.offload_activations,
                "offload_keep_layers": r.offload_keep_layers, "sharding": r.sharding, "offload": r.offload,
                "precompute_reference": r.precompute_reference}


def auto_tiles(m: ModelSpec) -> int:
    """MLP tiles that bring a tile's ``[t, 3f]`` intermediates down to the layer input's ``[T, h]``."""
    return max(2, math.ceil(3 * m.ffn_hidden_size / m.hidden_size))


def _memory(m: ModelSpec, mesh: Mesh, run: Run, budget: Budget) -> Breakdown:
    return rank_memory(m, mesh, run, budget.gpu_memory_gib, budget.fragmentation, budget.host_memory_gib_per_node,
                       budget.gpus_per_node)


def _chunk_layers(m: ModelSpec, mesh: Mesh) -> int:
    return math.ceil(m.num_layers / (mesh.pp * mesh.vpp))


def fit_keep_layers(m: ModelSpec, mesh: Mesh, run: Run, budget: Budget) -> Run | None:
    """``run`` with the most ``offload_keep_layers`` that still fit (the GPU holds as many layer
    inputs as it can, the host the rest); None when no K fits. Without activation offload:
    ``run`` if it fits."""
    if not run.offload_activations:
        return run if _memory(m, mesh, run, budget).fits else None
    lo, hi = -1, _chunk_layers(m, mesh)  # device memory grows with K, host memory shrinks
    while hi - lo > 1:
        mid = (lo + hi) // 2
        mem = _memory(m, mesh, dataclasses.replace(run, offload_keep_layers=mid), budget)
        if mem.total <= mem.device:
            lo = mid
        else:
            hi = mid
    if lo < 0:
        return None
    best = dataclasses.replace(run, offload_keep_layers=lo)
    return best if _memory(m, mesh, best, budget).fits else None


def frugal(m: ModelSpec, mesh: Mesh, run: Run) -> Run:
    """The settings that hold the most on ``mesh``."""
    fsdp_ok = not (run.bf16 and mesh.pp > 1)
    return dataclasses.replace(run, recompute="full", tile_mlp=auto_tiles(m), loss_chunk=run.loss_chunk or 1024,
                               offload_activations=True, sharding="fsdp2" if fsdp_ok else "zero1", offload=True,
                               precompute_reference=run.recipe == "dpo")


def longest(m: ModelSpec, mesh: Mesh, run: Run, budget: Budget, limit: int = 2**27) -> tuple[int, Run | None]:
    """``(seq_len, settings)``: the longest multiple of the mesh's padding unit that ``run``'s
    levers (K chosen per length) fit; ``(0, None)`` when not even one unit does."""
    unit = 2 * mesh.cp * mesh.tp if mesh.cp > 1 else mesh.tp

    def fitted(k: int) -> Run | None:
        return fit_keep_layers(m, mesh, dataclasses.replace(run, seq_len=k * unit), budget)

    lo, hi, best = 0, 1, None
    while (r := fitted(hi)) is not None:
        lo, hi, best = hi, 2 * hi, r
        if hi * unit > limit:
            return lo * unit, best
    while hi - lo > 1:
        mid = (lo + hi) // 2
        r = fitted(mid)
        if r is not None:
            lo, best = mid, r
        else:
            hi = mid
    return lo * unit, best


def lever_settings(m: ModelSpec, run: Run, shardings: list[str], recomputes: list[str], offload_only: bool):
    """Every combination of levers pass (2) tries."""
    dpo = [True, False] if run.recipe == "dpo" else [False]
    for rc, sharding, offload, act, tiles, pre in itertools.product(recomputes, shardings, (False, True),
                                                                  (False, True), (1, auto_tiles(m)), dpo):
        if (offload and sharding == "none") or (offload_only and not offload):
            continue
        if act and rc != "full":
            continue  # the other modes keep more than the input, and offloading it all is slow
        yield dataclasses.replace(run, recompute=rc, sharding=sharding, offload=offload, offload_activations=act,
                                  tile_mlp=tiles, precompute_reference=pre, loss_chunk=run.loss_chunk or 1024)


def search(m: ModelSpec, gpus: int, run: Run, budget: Budget, device, shardings: list[str], recomputes: list[str],
           offload_only: bool = False, vpp: int = 1, **pinned) -> tuple[Reach | None, list[tuple[Mesh, int]]]:
    """The longest sequence over meshes and levers, with the fastest settings that hold it; also
    every mesh's longest under its frugal settings (for the table)."""
    per_mesh = []
    best = None
    for mesh in candidate_meshes(m, gpus, dataclasses.replace(run, sharding="zero1"), budget.gpus_per_node, vpp, **pinned):
        base = frugal(m, mesh, run)
        if base.sharding not in shardings:
            base = dataclasses.replace(base, sharding=next((s for s in ("zero1", "fsdp2") if s in shardings), "none"))
            base = dataclasses.replace(base, offload=base.sharding != "none")
        if base.recompute not in recomputes:
            base = dataclasses.replace(base, recompute=recomputes[0], offload_activations=recomputes[0] == "full")
        n, fitted = longest(m, mesh, base, budget)
        per_mesh.append((mesh, n))
        if fitted is None:
            continue
        t = step_time(m, mesh, fitted, device, budget.gpus_per_node)["total"]
        if best is None or (n, -t) > (best[0], -best[3]):
            best = (n, mesh, fitted, t)
    if best is None:
        return None, per_mesh
    n, mesh, fitted, _ = best
    options = []
    for r in lever_settings(m, dataclasses.replace(run, seq_len=n), shardings, recomputes, offload_only):
        if r.sharding == "fsdp2" and r.bf16 and mesh.pp > 1:
            continue
        r = fit_keep_layers(m, mesh, r, budget)
        if r is not None:
            options.append((step_time(m, mesh, r, device, budget.gpus_per_node)["total"], r))
    t, r = min(options, key=lambda o: o[0]) if options else (None, fitted)
    return Reach(n, mesh, r, _memory(m, mesh, r, budget), step_time(m, mesh, r, device, budget.gpus_per_node)), per_mesh
