"""Ulysses: all-to-all between "tokens split, all heads" and "all tokens, heads split" over hp.

Legend: t tokens of this hp rank (a contiguous slice of its ring rank's stream), S = hp·t the
stream, H / G query / KV heads of this tp rank, D head dim.
``seq_to_heads``: ``[t, H, D] → [S, H/hp, D]``; ``heads_to_seq`` is its inverse, and each is the
other's backward. KV heads: with G ≥ hp each hp rank gets G/hp real KV heads; with G < hp (hp a
multiple of G) every KV head is replicated hp/G times first, so hp rank i gets the KV head of its
query heads (``h // (H/G)``), and the replicas' gradients are summed back by autograd.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from engine.parallel.comm import COUNTER, Conjugate


def _all_to_all(x_P: torch.Tensor, group) -> torch.Tensor:
    """Chunk i of dim 0 goes to hp rank i; chunk j of the result came from hp rank j."""
    x_P = x_P.contiguous()
    out = torch.empty_like(x_P)
    COUNTER.record("all_to_all", group, x_P.numel() * x_P.element_size())
    dist.all_to_all_single(out, x_P, group=group)
    return out


def _seq_to_heads(x, group, hp):
    t, h, d = x.shape
    parts = x.view(t, hp, h // hp, d).transpose(0, 1)           # [hp, t, H/hp, D]
    return _all_to_all(parts, group).reshape(hp * t, h // hp, d)


def _heads_to_seq(x, group, hp):
    s, hh, d = x.shape
    parts = _all_to_all(x.view(hp, s // hp, hh, d), group)       # [hp, t, H/hp, D]
    return parts.transpose(0, 1).reshape(s // hp, hp * hh, d)


def seq_to_heads(x_tHD: torch.Tensor, group, hp: int) -> torch.Tensor:
    """Gather the stream, scatter heads: ``[t, H, D] → [hp·t, H/hp, D]`` (backward: inverse a2a)."""
    if hp == 1:
        return x_tHD
    return Conjugate.apply(x_tHD, lambda x: _seq_to_heads(x, group, hp), lambda g: _heads_to_seq(g, group, hp))


def heads_to_seq(x_SHD: torch.Tensor, group, hp: int) -> torch.Tensor:
    """Scatter the stream, gather heads: ``[S, H/hp, D] → [S/hp, H, D]`` (backward: inverse a2a)."""
    if hp == 1:
        return x_SHD
    return Conjugate.apply(x_SHD, lambda x: _heads_to_seq(x, group, hp), lambda g: _seq_to_heads(g, group, hp))


def kv_for_heads(kv_tGD: torch.Tensor, hp: int) -> torch.Tensor:
    """KV heads ready for :func:`seq_to_heads`: unchanged when G % hp == 0, else each head
    replicated hp/G times (gradients of the replicas sum back through repeat_interleave)."""
    g = kv_tGD.shape[1]
    if g % hp == 0:
        return kv_tGD
    assert hp % g == 0, f"hp={hp} and {g} KV heads: one must divide the other (checked by config)"
    return kv_tGD.repeat_interleave(hp // g, dim=1)
