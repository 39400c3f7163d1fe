"""Data-parallel axis: gradient reduction over dp×cp, and norms over the whole mesh.

I-5: the loss of every micro-batch is already divided by the *global* number of valid tokens, so
gradients are **summed** over dp×cp, never averaged. Parameters replicated over tp (the norms)
receive partial gradients under sequence parallelism (each tp rank saw 1/tp of the tokens); they
are summed over tp first, as Megatron does for its layernorm gradients.
"""
from __future__ import annotations

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from engine.parallel.comm import all_reduce_


def _coalesced_all_reduce(tensors: list[torch.Tensor], group) -> None:
    """Sum ``tensors`` over ``group`` in one collective per dtype."""
    if group is None or not tensors:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for same in by_dtype.values():
        flat = all_reduce_(_flatten_dense_tensors(same), group)
        for t, r in zip(same, _unflatten_dense_tensors(flat, same)):
            t.copy_(r)


def reduce_gradients(params: list[torch.nn.Parameter], grads: list[torch.Tensor], mesh) -> None:
    """Sum ``grads`` (aligned with ``params``) over dp×cp, and tp-replicated ones over tp."""
    _coalesced_all_reduce([g for p, g in zip(params, grads) if p.tp_dim is None], mesh.group("tp"))
    _coalesced_all_reduce(grads, mesh.group("dp_cp"))
    # tied embeddings over pipeline stages: the first stage's embedding and the last stage's copy
    # are one weight; both get the sum of their gradients and stay equal
    _coalesced_all_reduce([g for p, g in zip(params, grads) if getattr(p, "shared_embedding", False)],
                          mesh.group("pp_ends"))


def global_grad_norm(params: list[torch.nn.Parameter], grads: list[torch.Tensor], mesh) -> torch.Tensor:
    """L2 norm of the full gradient of the whole model, identical on every rank.

    tp-sharded gradients are disjoint pieces (summed over tp); tp-replicated ones are counted on
    tp rank 0 only; pipeline stages hold disjoint layers (summed over pp); dp×cp replicas are
    identical after :func:`reduce_gradients` and are not summed.
    """
    first_tp = mesh.index("tp") == 0
    sq = torch.zeros((), dtype=torch.float64, device=grads[0].device if grads else None)
    last_stage_copy = mesh.pp > 1 and mesh.index("pp") == mesh.pp - 1
    for p, g in zip(params, grads):
        if getattr(p, "shared_embedding", False) and last_stage_copy:
            continue  # counted once, on the first stage
        if p.tp_dim is not None or first_tp:
            sq += g.double().pow(2).sum()
    all_reduce_(sq, mesh.group("tp"))
    all_reduce_(sq, mesh.group("pp"))
    return sq.sqrt().float()
