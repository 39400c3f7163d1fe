"""Data-parallel axis: gradient reduction over dp×cp, the sharded-state collectives, and norms over
the whole mesh.

I-5: the loss of every micro-batch is already divided by the *global* number of valid tokens, so
gradients are **summed** over dp×cp, never averaged. Parameters replicated over tp (the norms)
receive partial gradients under sequence parallelism (each tp rank saw 1/tp of the tokens); they
are summed over tp as well, as Megatron does for its layernorm gradients.

I-10: gradients are summed in fp32 buffers (``main_grad``, engine/parallel/grads.py) whose
buckets reduce over dp×cp as soon as backward completes them: ``none`` all-reduces each bucket
(:func:`all_reduce_async`), ``zero1`` (engine/parallel/zero.py) reduce-scatters it into the
rank's shard of the same buffer (:func:`reduce_scatter_async`) and all-gathers the updated
parameters (:func:`all_gather_flat`); ``fsdp2`` (engine/parallel/fsdp.py) lets torch's
``fully_shard`` reduce-scatter per layer. Then the tp replicas and the tied-embedding copies are
summed (:func:`reduce_replicas`), on whole gradients or on the shards.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from engine.parallel.comm import COUNTER, _all_gather_tensor, _reduce_scatter_tensor, all_reduce_


def _coalesced_all_reduce(tensors: list[torch.Tensor], group, device: torch.device) -> None:
    """Sum ``tensors`` over ``group`` in one collective per dtype, run on ``device`` (the mesh's:
    FSDP2's offloaded gradient shards live on the host, I-7)."""
    if group is None or not tensors:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for same in by_dtype.values():
        flat = all_reduce_(_flatten_dense_tensors(same).to(device, non_blocking=True), group)
        flat = flat.to(same[0].device)  # back to the host in one copy where the gradients live there
        for t, r in zip(same, _unflatten_dense_tensors(flat, same)):
            t.copy_(r)


def reduce_replicas(params: list[torch.nn.Parameter], grads: list[torch.Tensor], mesh) -> None:
    """The sums that are not over dp×cp: tp-replicated gradients summed over tp, tied-embedding
    copies over the pipeline ends. Works on whole gradients or on the same
    dp×cp shard of them (the tp peers and both pipeline ends of a rank have the same dp×cp index, so
    they hold the same elements). Host-resident gradients (FSDP2 offload) are summed on the mesh's
    device and copied back."""
    _coalesced_all_reduce([g for p, g in zip(params, grads) if p.tp_dim is None], mesh.group("tp"), mesh.device)
    _coalesced_all_reduce([g for p, g in zip(params, grads) if getattr(p, "shared_embedding", False)],
                          mesh.group("pp_ends"), mesh.device)


def shard_index(group) -> int:
    """This rank's shard of a flat buffer split over ``group``: its rank in the process group,
    which is the slot that reduce-scatter and all-gather give it (not necessarily the mesh index)."""
    return 0 if group is None else dist.get_rank(group)


def all_reduce_async(flat: torch.Tensor, group):
    """Start summing a 1-D buffer over ``group`` in place; returns the work to ``wait()`` (None
    when there is no group). No autograd."""
    if group is None:
        return None
    COUNTER.record("all_reduce", group, flat.numel() * flat.element_size())
    return dist.all_reduce(flat, group=group, async_op=True)


def reduce_scatter_async(flat: torch.Tensor, group):
    """Start summing a 1-D buffer (numel a multiple of the group size) over ``group`` into this
    rank's slice of it, ``flat[r·S:(r+1)·S]`` with r = :func:`shard_index` — in place, as
    megatron-core's distributed optimizer does (NCCL and gloo accept the output aliasing its
    slot of the input). Returns the work to ``wait()`` (None without a group). No autograd."""
    if group is None:
        return None
    n = dist.get_world_size(group)
    assert flat.dim() == 1 and flat.numel() % n == 0, (flat.shape, n)
    size = flat.numel() // n
    r = dist.get_rank(group)
    COUNTER.record("reduce_scatter", group, flat.numel() * flat.element_size() * (n - 1) // n)
    return _reduce_scatter_tensor(flat[r * size:(r + 1) * size], flat, group=group, async_op=True)


def all_gather_flat(shard: torch.Tensor, flat: torch.Tensor, group) -> None:
    """Write every rank's ``shard`` into its slot of the 1-D buffer ``flat`` (in place); ``shard``
    must not alias ``flat``. No autograd."""
    if group is None:
        flat.copy_(shard)
        return
    n = dist.get_world_size(group)
    assert flat.numel() == shard.numel() * n, (flat.shape, shard.shape, n)
    COUNTER.record("all_gather", group, shard.numel() * shard.element_size() * (n - 1))
    _all_gather_tensor(flat, shard.contiguous(), group=group)


def global_grad_norm(params: list[torch.nn.Parameter], grads: list[torch.Tensor], mesh,
                     sharded: bool = False) -> torch.Tensor:
    """L2 norm of the full gradient of the whole model, identical on every rank.

    tp-sharded gradients are disjoint pieces (summed over tp); tp-replicated ones are counted on
    tp rank 0 only; pipeline stages hold disjoint layers (summed over pp). Unsharded, dp×cp
    replicas are identical after the reduction and are not summed; ``sharded`` means
    each ``grads[i]`` is this rank's disjoint dp×cp piece of ``params[i]``'s gradient (ZeRO-1,
    FSDP2), so the squares are summed over dp×cp as well: the norm of all shards together.
    """
    first_tp = mesh.index("tp") == 0
    last_stage_copy = mesh.pp > 1 and mesh.index("pp") == mesh.pp - 1
    counted = [g for p, g in zip(params, grads)
               if not (getattr(p, "shared_embedding", False) and last_stage_copy)  # counted on the first stage
               and (p.tp_dim is not None or first_tp)]
    # one fp32 norm per tensor (no float64 copy of a gradient), their squares summed in float64
    norms = torch._foreach_norm([g for g in counted if g.numel()]) if counted else []
    sq = torch.stack(norms).double().pow(2).sum() if norms else torch.zeros((), dtype=torch.float64)
    # offloaded shards live on the CPU; the collectives run where the mesh does (a pageable source:
    # non_blocking does not make the host wait for the device, and the copy is staged at once)
    sq = sq.to(mesh.device, non_blocking=True)
    all_reduce_(sq, mesh.group("tp"))
    all_reduce_(sq, mesh.group("pp"))
    if sharded:
        all_reduce_(sq, mesh.group("dp_cp"))
    return sq.sqrt().float()
