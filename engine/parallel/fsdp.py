"""FSDP2: torch's ``fully_shard`` of parameters, gradients and optimizer states over dp×cp.

Every transformer layer, then every model chunk (embedding, final norm, output layer), is wrapped
with ``fully_shard`` on a 1-D DeviceMesh built from the mesh's existing dp×cp process group (no new
group, I-1; one dp×cp rank: see the end). At rest each rank holds dim-0 shards (``Shard(0)``, padded
when uneven) of its tp-local parameters as DTensors, and gets sharded gradients; a layer's
parameters are all-gathered in its forward and again in its backward and freed after each.
meshtron's tp sharding is its own and stays outside FSDP: the DTensors live on the dp×cp mesh only,
and the ``tp_dim`` / ``tp_parts`` / ``shared_embedding`` marks are carried over to the new
parameter objects.

What had to be set for I-5 and for gloo (torch 2.13, CPU):
- gradients must be *summed* over dp×cp: FSDP2 averages by default (``ReduceOp.AVG``), and
  ``set_gradient_divide_factor(1.0)`` alone makes ``_get_gradient_divide_factors``
  (fsdp/_fully_shard/_fsdp_collectives.py) pick ``ReduceOp.PREMUL_SUM(1)``, which ProcessGroupGloo
  rejects ("Cannot use ReduceOp.PREMUL_SUM with Gloo", raised in libtorch_cpu). With
  ``set_force_sum_reduction_for_comms(True)`` as well, the reduce-scatter is a plain ``SUM`` and the
  post-division by 1 is skipped. Both are set on every FSDP module (the setters are not recursive).
- the collectives FSDP2 needs on gloo are all-gather-into-tensor and reduce-scatter-tensor, both
  implemented by ProcessGroupGloo on torch 2.13; streams and events are no-ops on CPU.
- bf16 (``train.bf16``): the sharded parameters are fp32 (they are the master weights), the
  forward runs in bf16 (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``), so the
  gradients are reduced and accumulated in fp32 — the unsharded path's arithmetic.
Gradients of tp-replicated parameters and of the tied-embedding copies are then summed over tp and
over the pipeline ends on the local shards (engine/parallel/data.py), and the global norm sums the
squares of all shards.

Offload (``optim.offload``): every ``fully_shard`` gets ``CPUOffloadPolicy``, so the three things
FSDP2 shards live in host memory — the fp32 parameter shards (the masters), the gradient shards and
the AdamW moments (created by AdamW on the sharded parameters, hence host tensors too). The device
holds a layer's parameters only while it runs: each all-gather first copies the host shard to the
device (in the compute dtype), and each reduce-scatter's output shard is copied back to the host.
The optimizer step runs on the CPU, where the states are (fused AdamW: torch's CPU kernel): stepping
on the device would bring 16 bytes per parameter (master, gradient, two moments) over to it and
back every step, and need the room offload exists to free. The host shards are pinned on a CUDA
mesh, so the parameter copies do not block the host. The collectives still run on the device
(I-7): ``reduce_replicas`` moves its flat host sums to the mesh's device and back, the global
norm its sum of squares, :func:`full_tensor` all-gathers whole tensors there. With several micro-batches
per step, torch accumulates the gradient shards on the host: from the second micro-batch on each
shard's copy is blocking (the CPU add needs it), so the host waits once per parameter per
micro-batch — offload's price in host syncs (I-9), shown by ``meshtron-plan --simulate``.

One dp×cp rank (tp or pp only, or one GPU). Without offload there is nothing to shard and
:class:`engine.optim.MeshOptimizer` keeps the replicated state. With offload this state is still
used — FSDP2 on a DeviceMesh of one rank, whose "shards" are the whole tensors, so the parameters,
gradients and moments are host memory and the device holds only the gathered window (a layer at a
time, and its chunk's root parameters) — on a group of this rank alone: in a world of several ranks
the mesh's :meth:`engine.mesh.ParallelMesh.own_group` (made by every rank with the other groups);
in a single process, which has no process group (engine/cli.py starts none for one rank), the
default group of a world of one (gloo, nccl on a CUDA mesh) started here and destroyed again once
the last state using it is freed, so that an initialised ``torch.distributed`` changes nothing else
(engine/cli.py's end of a multi-rank run, tests that start worlds of their own). A one-rank mesh
inside a world of several (``ParallelMesh.single()`` under torchrun) has no such group: an error.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
import torch.distributed as dist

from engine.parallel.data import reduce_replicas

MARKS = ("tp_dim", "tp_parts", "shared_embedding")


def _chunk0(t: torch.Tensor, num: int, slot: int) -> torch.Tensor:
    """Slot ``slot`` of ``t`` split over dim 0 the way FSDP2 shards it (torch.chunk, missing
    trailing chunks empty)."""
    chunks = list(torch.chunk(t, num, dim=0))
    chunks += [t.new_empty((0,) + tuple(t.shape[1:]))] * (num - len(chunks))
    return chunks[slot]


@torch.no_grad()
def full_tensor(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The whole tensor of the dp×cp-sharded DTensor ``t``, all-gathered on ``device`` (the mesh's:
    an offloaded shard lives on the host, and I-7 wants every collective's tensors on the device)."""
    from torch.distributed.tensor import DTensor

    # one path on and off the device: .to() is a no-op where the shard already is on it
    local = t.to_local().to(device, non_blocking=True)
    return DTensor.from_local(local, t.device_mesh, t.placements, shape=t.shape, stride=t.stride()).full_tensor()


class _WorldOfOne:
    """Held by the states using the world of one this module started (module docstring); freeing
    the last holder destroys it."""

    live: "weakref.ref[_WorldOfOne] | None" = None


def _destroy_world(pg) -> None:
    if dist.is_initialized() and dist.group.WORLD is pg:  # not one started by someone else since
        dist.destroy_process_group()


def _one_rank_group(mesh) -> tuple[object, _WorldOfOne | None]:
    """``(group of this rank alone, holder of the world of one or None)`` for a mesh whose dp×cp
    axis has one rank."""
    if mesh.own_group() is not None:
        return mesh.own_group(), None
    holder = _WorldOfOne.live() if _WorldOfOne.live is not None else None
    if holder is not None:
        return dist.group.WORLD, holder
    if dist.is_initialized():
        if dist.get_world_size() > 1:
            raise ValueError(f"optim.sharding=fsdp2 with optim.offload=true on a one-rank mesh inside a world of "
                             f"{dist.get_world_size()} ranks: no group of this rank alone; build the mesh with "
                             f"ParallelMesh.build over the whole world")
        return dist.group.WORLD, None  # a world of one someone else started (the simulation's)
    backend = "cpu:gloo,cuda:nccl" if mesh.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    holder = _WorldOfOne()
    _WorldOfOne.live = weakref.ref(holder)
    weakref.finalize(holder, _destroy_world, dist.group.WORLD)
    return dist.group.WORLD, holder


class FSDPState:
    """AdamW on ``fully_shard``-ed parameters; the interface of the other state objects of
    :class:`engine.optim.MeshOptimizer` (reduce, adam_step, checkpoint_pieces, full_weights, …).
    With one dp×cp rank (offload only) the DeviceMesh has one rank (module docstring): keep the
    state alive as long as the model is used, as a single process's world of one lives as long."""

    sharded = True

    def __init__(self, model: torch.nn.ModuleList, cfg, mesh):
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard,
                                            register_fsdp_forward_method)

        self.model, self.cfg, self.mesh = model, cfg, mesh
        self.offload = cfg.offload
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.param_dtype = trainable[0].dtype
        self.mixed = any(p.dtype != torch.float32 for p in trainable)
        self.marks = {n: {k: getattr(p, k) for k in MARKS if hasattr(p, k)} for n, p in model.named_parameters()}
        if self.mixed:  # the sharded parameters become the fp32 masters
            for p in model.parameters():
                p.data = p.data.float()
        group, self._world = mesh.group("dp_cp"), None
        if group is None:  # one dp×cp rank: FSDP2 for its offload (module docstring)
            group, self._world = _one_rank_group(mesh)
        self.dm = DeviceMesh.from_group(group, mesh.device.type)
        self.num_shards, self.slot = dist.get_world_size(group), dist.get_rank(group)
        policy = MixedPrecisionPolicy(param_dtype=self.param_dtype if self.mixed else None,
                                      reduce_dtype=torch.float32, cast_forward_inputs=False)
        # pinned host shards on a CUDA mesh: the copies to and from the device do not block the host
        offload = CPUOffloadPolicy(pin_memory=mesh.device.type == "cuda") if cfg.offload else OffloadPolicy()
        self.modules = []
        for chunk in model:
            for layer in chunk.decoder.layers:
                fully_shard(layer, mesh=self.dm, mp_policy=policy, offload_policy=offload)
                self.modules.append(layer)
            fully_shard(chunk, mesh=self.dm, mp_policy=policy, offload_policy=offload)
            # the loss path enters the chunk through these methods, not forward (engine/loss.py):
            # FSDP2 must gather and reshard around them as it does around forward
            for method in ("final_hidden", "token_losses"):
                register_fsdp_forward_method(chunk, method)
            self.modules.append(chunk)
        for m in self.modules:
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
        self._mark(model.named_parameters())
        self.params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in self.params if p.ndim >= 2]
        no_decay = [p for p in self.params if p.ndim < 2]
        # fused, as the other states on CUDA (no foreach temporaries), and on the host shards when
        # offloaded (torch's fused AdamW has a CPU kernel; the default there is a per-tensor loop)
        fused = self.offload or all(p.is_cuda for p in self.params)
        self.adam = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None)

    def _mark(self, named) -> None:
        for n, p in named:
            for k, v in self.marks[n].items():
                setattr(p, k, v)

    # -- the step ------------------------------------------------------------------------------
    def reduce(self) -> tuple[list[torch.nn.Parameter], list[torch.Tensor]]:
        """FSDP2 already reduce-scattered over dp×cp in backward; sum the tp replicas and tied
        copies on the local shards. Returns ``(params, local gradient shards)``."""
        with torch.no_grad():
            for p in self.params:
                if p.grad is None:  # no gradient reached it: zeros, as unsharded
                    p.grad = torch.zeros_like(p)
            local = [p.grad.to_local() for p in self.params]
        reduce_replicas(self.params, local, self.mesh)
        return self.params, local

    def adam_step(self, lr: float) -> None:
        for group in self.adam.param_groups:
            group["lr"] = lr
        self.adam.step()
        self.discard()

    def discard(self) -> None:
        """Drop this step's gradients (after the update, or for a skipped step)."""
        for p in self.params:
            p.grad = None

    def full_grads(self) -> list[torch.Tensor]:
        """Whole local fp32 gradients aligned with ``params`` (all-gathered; for tests)."""
        return [full_tensor(p.grad, self.mesh.device) for p in self.params]

    # -- whole weights and checkpoints ---------------------------------------------------------
    @contextmanager
    def full_weights(self, writeback: bool = False):
        """Inside the block the model's parameters are whole plain tensors in the model dtype
        (all-gathered over dp×cp, with the tp marks), so code written for unsharded models —
        saving, exporting, loading a checkpoint — works unchanged. With ``writeback`` the values
        found at exit are copied into this rank's shards (loading weights). FSDP's own unshard is
        not used: it needs FSDP's lazy initialisation, i.e. a forward pass first."""
        sharded = dict(self.model.named_parameters())
        full = {}
        for name, p in sharded.items():
            full[name] = torch.nn.Parameter(full_tensor(p, self.mesh.device).to(self.param_dtype),
                                            requires_grad=p.requires_grad)
        self._swap(full)
        self._mark(full.items())
        try:
            yield
        finally:
            if writeback:
                with torch.no_grad():
                    for name, p in self.model.named_parameters():
                        sharded[name].to_local().copy_(_chunk0(p, self.num_shards, self.slot))
            self._swap(sharded)

    def _swap(self, params: dict) -> None:
        for name, p in params.items():
            owner, leaf = name.rsplit(".", 1)
            setattr(self.model.get_submodule(owner), leaf, p)

    def checkpoint_pieces(self) -> list[tuple[int, int, int, dict[str, torch.Tensor]]]:
        """Views for checkpoints (see engine/optim.py ``ReplicatedState.checkpoint_pieces``): this
        rank's dim-0 shard of every parameter (rows ``slot·ceil(R/D)`` on, as ``torch.chunk`` cuts
        them), which under bf16 is also the fp32 master, and its moments once stepped."""
        out = []
        for i, p in enumerate(self.params):
            local = p.to_local()
            rows = p.shape[0]
            start = min(self.slot * -(-rows // self.num_shards), rows) * (p.numel() // rows)
            roles = {"param": local.view(-1)}
            if self.mixed:
                roles["fp32_param"] = roles["param"]
            state = self.adam.state.get(p)
            if state:
                roles.update(exp_avg=state["exp_avg"].to_local().view(-1),
                             exp_avg_sq=state["exp_avg_sq"].to_local().view(-1))
            out.append((i, start, start + local.numel(), roles))
        return out

    def init_moments(self, step: int) -> None:
        """Zero AdamW moments (DTensors sharded like the parameters) at step count ``step``."""
        fused = bool(self.adam.defaults.get("fused"))
        for p in self.params:  # fused AdamW keeps the step count where the shard is
            self.adam.state[p] = {"step": torch.tensor(float(step), device=p.device if fused else "cpu"),
                                  "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}

    # -- accounting ----------------------------------------------------------------------------
    def state_tensors(self) -> list[torch.Tensor]:
        """AdamW moments held by this rank (their local shards); the fp32 masters under bf16 are
        the sharded parameters themselves and are counted as parameters."""
        return [t.to_local() if hasattr(t, "to_local") else t
                for s in self.adam.state.values() for t in s.values() if torch.is_tensor(t)]
