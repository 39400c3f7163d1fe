"""Megatron tensor parallelism with sequence-parallel activations.

Between TP regions activations are split along tokens (dim 0 of a ``[T, H]`` tensor) over the
tp group. A column-parallel linear all-gathers its input along tokens (backward: reduce-scatter)
and yields a slice of the output features; a row-parallel linear takes that slice and
reduce-scatters its partial sums back to a token slice (backward: all-gather). With tp = 1 every
collective is the identity and these are plain linears.

Sharded parameters carry ``tp_dim`` (the dim split over tp) and ``tp_parts`` (how many logical
blocks are split separately: 2 for ``linear_fc1`` = [gate; up], so TP rank r holds
[gate_r; up_r]). Replicated parameters have ``tp_dim = None``; under sequence parallelism their
gradients are partial per rank and are summed over tp by the gradient reducer.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.parallel.comm import all_gather_dim, reduce_scatter_along_dim, reduce_scatter_dim


def mark_tp(param: nn.Parameter, dim: int | None, parts: int = 1) -> nn.Parameter:
    """Record how ``param`` is split over the tp group (see module docstring)."""
    param.tp_dim, param.tp_parts = dim, parts
    return param


def shard_tensor(full: torch.Tensor, dim: int | None, parts: int, tp: int, rank: int) -> torch.Tensor:
    """This tp rank's shard of a full (canonical) tensor."""
    if dim is None or tp == 1:
        return full
    blocks = full.chunk(parts, dim)
    return torch.cat([b.chunk(tp, dim)[rank] for b in blocks], dim)


def unshard_tensor(shards: list[torch.Tensor], dim: int | None, parts: int) -> torch.Tensor:
    """Inverse of :func:`shard_tensor`: the full tensor from every tp rank's shard, in rank order."""
    if dim is None or len(shards) == 1:
        return shards[0]
    per_rank = [s.chunk(parts, dim) for s in shards]
    return torch.cat([torch.cat([r[p] for r in per_rank], dim) for p in range(parts)], dim)


class _SeqGatherLinear(torch.autograd.Function):
    """``linear(all_gather_tokens(x), W, b)`` that saves only this rank's token slice ``x`` and
    gathers it again in backward (as Megatron does): under sequence parallelism the activation
    memory of a column-parallel linear is 1/tp, not the full sequence."""

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        ctx.group, ctx.has_bias = group, bias is not None
        ctx.save_for_backward(x, weight)
        return F.linear(all_gather_dim(x, 0, group), weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        x_full = all_gather_dim(x, 0, ctx.group)
        dx = reduce_scatter_dim(dy @ weight, 0, ctx.group)
        dw = dy.reshape(-1, dy.shape[-1]).t() @ x_full.reshape(-1, x_full.shape[-1])
        db = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.has_bias else None
        return dx, dw, db, None


def gathered_linear(x: torch.Tensor, weight: torch.Tensor, bias, tp_group) -> torch.Tensor:
    """Column-parallel product of this rank's token slice: all-gather tokens, then ``x W^T + b``.
    Backward reduce-scatters the input gradient; only the token slice is kept for it."""
    if tp_group is None:
        return F.linear(x, weight, bias)
    return _SeqGatherLinear.apply(x, weight, bias, tp_group)


def _check_divisible(n: int, tp: int, what: str) -> int:
    if n % tp:
        raise ValueError(f"{what}={n} is not divisible by parallel.tp={tp}")
    return n // tp


class ColumnParallelLinear(nn.Module):
    """``y_r = gather_tokens(x) @ W_r^T (+ b_r)``: output features split over tp.

    Input: this rank's token slice ``[T/tp, in]``; output ``[T, out/tp]``. Backward
    reduce-scatters the input gradient over tokens.
    """

    def __init__(self, in_features: int, out_features: int, tp_group, tp: int, *,
                 bias: bool = False, parts: int = 1, dtype=torch.float32):
        super().__init__()
        self.tp_group = tp_group
        local = _check_divisible(out_features, tp * parts, "output features / parts") * parts
        self.weight = mark_tp(nn.Parameter(torch.empty(local, in_features, dtype=dtype)), 0, parts)
        self.bias = mark_tp(nn.Parameter(torch.zeros(local, dtype=dtype)), 0, parts) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gathered_linear(x, self.weight, self.bias, self.tp_group)


class RowParallelLinear(nn.Module):
    """``y = reduce_scatter_tokens(x_r @ W_r^T)``: input features split over tp.

    Input ``[T, in/tp]`` (a column-parallel output); output this rank's token slice
    ``[T/tp, out]``. Backward all-gathers the output gradient over tokens.
    """

    def __init__(self, in_features: int, out_features: int, tp_group, tp: int, *, dtype=torch.float32):
        super().__init__()
        self.tp_group = tp_group
        local = _check_divisible(in_features, tp, "input features")
        self.weight = mark_tp(nn.Parameter(torch.empty(out_features, local, dtype=dtype)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_scatter_along_dim(F.linear(x, self.weight), 0, self.tp_group)


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (vocabulary) are split over tp.

    Every tp rank sees all ``T`` token ids, looks up the ones in its vocabulary range (zeros
    elsewhere), and the partial rows are reduce-scattered to this rank's token slice
    ``[T/tp, H]`` — sum and sequence split in one collective.
    """

    def __init__(self, padded_vocab: int, hidden: int, tp_group, tp: int, tp_rank: int, *, dtype=torch.float32):
        super().__init__()
        self.tp_group = tp_group
        local = _check_divisible(padded_vocab, tp, "padded vocab size")
        self.vocab_start = tp_rank * local
        self.weight = mark_tp(nn.Parameter(torch.empty(local, hidden, dtype=dtype)), 0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local_ids = ids - self.vocab_start
        outside = (local_ids < 0) | (local_ids >= self.weight.shape[0])
        rows = F.embedding(local_ids.masked_fill(outside, 0), self.weight)
        rows = rows.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_scatter_along_dim(rows, 0, self.tp_group)
