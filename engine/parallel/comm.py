"""Autograd-aware collectives shared by every parallel axis, and the communication counter.

Every function takes a process group that may be ``None`` (an axis of size 1): then it is the
identity and costs nothing. Each docstring states what the backward pass does, because that is
where sequence-parallel implementations go wrong (an in-place all-reduce is an identity to
autograd: loss matches, gradients silently do not).
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

import torch
import torch.distributed as dist


# -- communication accounting ----------------------------------------------------------------
class CommCounter:
    """Bytes and calls per (collective kind, group ranks), counted while ``active``."""

    def __init__(self):
        self.active = False
        self.calls: dict[tuple[str, tuple[int, ...]], int] = defaultdict(int)
        self.bytes: dict[tuple[str, tuple[int, ...]], int] = defaultdict(int)

    def record(self, kind: str, group, num_bytes: int) -> None:
        if self.active:
            key = (kind, tuple(dist.get_process_group_ranks(group)))
            self.calls[key] += 1
            self.bytes[key] += int(num_bytes)

    def total(self, kind: str | None = None, field: str = "bytes") -> int:
        table = self.bytes if field == "bytes" else self.calls
        return sum(v for (k, _), v in table.items() if kind is None or k == kind)

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()


COUNTER = CommCounter()


@contextmanager
def count_comm():
    """Count every collective issued inside the block; yields the (reset) counter."""
    COUNTER.reset()
    COUNTER.active = True
    try:
        yield COUNTER
    finally:
        COUNTER.active = False


# torch 2.13 renamed the tensor collectives (*_single); the GPU machines' 2.11 has only the old names
_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# -- raw collectives (no autograd) -----------------------------------------------------------
def all_reduce_(t: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce of a tensor that is NOT part of an autograd graph."""
    if _size(group) > 1:
        COUNTER.record("all_reduce", group, _nbytes(t))
        dist.all_reduce(t, op=op, group=group)
    return t


def _all_gather(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = _size(group)
    moved = t.movedim(dim, 0).contiguous()
    COUNTER.record("all_gather", group, _nbytes(moved) * (n - 1))
    out = torch.empty((n * moved.shape[0],) + moved.shape[1:], dtype=t.dtype, device=t.device)
    _all_gather_tensor(out, moved, group=group)
    return out.movedim(0, dim)


def _reduce_scatter(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = _size(group)
    moved = t.movedim(dim, 0).contiguous()
    if moved.shape[0] % n:
        raise ValueError(f"reduce-scatter of size {moved.shape[0]} along dim {dim} over {n} ranks")
    COUNTER.record("reduce_scatter", group, _nbytes(moved) * (n - 1) // n)
    out = torch.empty((moved.shape[0] // n,) + moved.shape[1:], dtype=t.dtype, device=t.device)
    _reduce_scatter_tensor(out, moved, group=group)
    return out.movedim(0, dim)


def all_gather_dim(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Raw all-gather along ``dim`` (no autograd), for autograd functions that re-gather."""
    return t if _size(group) == 1 else _all_gather(t, dim, group)


def reduce_scatter_dim(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Raw reduce-scatter (sum) along ``dim`` (no autograd)."""
    return t if _size(group) == 1 else _reduce_scatter(t, dim, group)


def _chunk(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = _size(group)
    if t.shape[dim] % n:
        raise ValueError(f"cannot split size {t.shape[dim]} along dim {dim} over {n} ranks")
    return t.chunk(n, dim)[dist.get_rank(group)].contiguous()


# -- autograd functions ----------------------------------------------------------------------
class Conjugate(torch.autograd.Function):
    """A collective whose backward is another collective: ``apply(x, forward_fn, backward_fn)``.

    Every tensor-moving op of the parallel axes is such a pair (all-gather / reduce-scatter,
    identity / all-reduce, all-to-all / inverse all-to-all), so one Function serves them all."""

    @staticmethod
    def forward(ctx, x, forward_fn, backward_fn):
        ctx.backward_fn = backward_fn
        return forward_fn(x)

    @staticmethod
    def backward(ctx, g):
        return ctx.backward_fn(g.contiguous()), None, None


def _identity(x):
    return x


def copy_to_group(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward; backward all-reduces (sums) the gradient over ``group``."""
    if _size(group) == 1:
        return x
    return Conjugate.apply(x, _identity, lambda g: all_reduce_(g.clone(), group))


def reduce_from_group(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce (sum) forward; identity backward (each rank's partial gets the full grad)."""
    if _size(group) == 1:
        return x
    return Conjugate.apply(x, lambda t: all_reduce_(t.contiguous().clone(), group), _identity)


def gather_along_dim(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """All-gather, concatenating rank slices along ``dim``; backward reduce-scatters (sums)."""
    if _size(group) == 1:
        return x
    return Conjugate.apply(x, lambda t: _all_gather(t, dim, group), lambda g: _reduce_scatter(g, dim, group))


def reduce_scatter_along_dim(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Sum over ranks, keep this rank's slice of ``dim``; backward all-gathers."""
    if _size(group) == 1:
        return x
    return Conjugate.apply(x, lambda t: _reduce_scatter(t, dim, group), lambda g: _all_gather(g, dim, group))


def split_along_dim(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Keep this rank's slice of a replicated tensor; backward all-gathers the slices."""
    if _size(group) == 1:
        return x
    return Conjugate.apply(x, lambda t: _chunk(t, dim, group), lambda g: _all_gather(g, dim, group))


def broadcast_(t: torch.Tensor, group, src: int = 0) -> torch.Tensor:
    """In-place broadcast from global rank ``src`` of a tensor outside the graph."""
    if _size(group) > 1:
        COUNTER.record("broadcast", group, _nbytes(t))
        dist.broadcast(t, src=src, group=group)
    return t


def all_reduce_max_(t: torch.Tensor, group) -> torch.Tensor:
    """In-place MAX all-reduce of a tensor outside the graph (e.g. a softmax shift)."""
    return all_reduce_(t, group, op=dist.ReduceOp.MAX)


def gather_shards(t: torch.Tensor, group) -> list[torch.Tensor]:
    """Every rank's ``t`` (same shape), in group-rank order; no autograd (checkpoints, tests)."""
    if _size(group) == 1:
        return [t]
    out = [torch.empty_like(t) for _ in range(_size(group))]
    COUNTER.record("all_gather", group, _nbytes(t) * (len(out) - 1))
    dist.all_gather(out, t.contiguous(), group=group)
    return out
