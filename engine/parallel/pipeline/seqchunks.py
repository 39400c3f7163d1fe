"""Seq1F1B sequence units: a micro-batch cut into k token ranges, and the per-layer K/V cache.

Unit j of a packed micro-batch holds tokens ``[b_j, e_j)``. Its queries attend, document by
document, to every earlier key of the same document: keys ``[k_start, e_j)`` of the micro-batch,
where ``k_start`` is the first token of the first document that reaches into the unit. Keys and
values of earlier units come from :class:`KVCache` as detached leaves; their gradients collect
in ``leaf.grad`` while later units run backward, and the unit's own backward adds them to its
K/V (``extra_roots``) — so the chunked pass has exactly the gradients of the whole sequence.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.data.packing import PackedBatch
from engine.parallel.comm import gather_along_dim
from engine.parallel.context.layout import CPBatch, split_for_cp


class KVCache:
    """K/V of one micro-batch's units on one model chunk, per layer, in unit order.

    With context parallelism (``cp_group``) each rank caches its own zigzag slice of every unit;
    a unit's prefix is all-gathered over cp (its backward reduce-scatters the prefix gradient to
    the owners) and regrouped per document of the unit (padding dropped) by the unit's gather
    plan, which :func:`split_units_cp` computed on the host (no collective, no device read)."""

    def __init__(self, cp_group=None):
        self.layers: dict[int, list[tuple[torch.Tensor, ...]]] = {}
        self.cp_group = cp_group

    def prefix(self, layer: int, unit: "CPSeqUnit", k: torch.Tensor, v: torch.Tensor):
        """Cache this unit's K/V; return ``(k_pre, v_pre, cu_pre)`` of the earlier units, grouped
        per document piece of this unit's ring stream (None for the first unit)."""
        entries = self.layers.setdefault(layer, [])
        entries.append((k, k.detach().requires_grad_(True), v, v.detach().requires_grad_(True)))
        if unit.unit == 0:
            return None
        k_all = gather_along_dim(torch.cat([e[1] for e in entries[:unit.unit]]), 0, self.cp_group)
        v_all = gather_along_dim(torch.cat([e[3] for e in entries[:unit.unit]]), 0, self.cp_group)
        return k_all[unit.prefix_index], v_all[unit.prefix_index], unit.prefix_cu

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Keys/values of every unit so far: cached leaves of earlier units, then this unit's
        own ``k``/``v`` (still in the graph); caches detached leaves for the units to come."""
        entries = self.layers.setdefault(layer, [])
        k_all = torch.cat([e[1] for e in entries] + [k]) if entries else k
        v_all = torch.cat([e[3] for e in entries] + [v]) if entries else v
        entries.append((k, k.detach().requires_grad_(True), v, v.detach().requires_grad_(True)))
        return k_all, v_all

    def extra_roots(self, unit: int):
        """(tensors, grads) to add to unit ``unit``'s backward: the gradient later units gave
        to its cached K/V. Releases the unit's cache entries: units run backward last to first,
        so no later backward reads them, and a micro-batch's cache is gone once its first unit's
        backward has run (not kept, with its gradients, until the end of the step)."""
        roots, grads = [], []
        for entries in self.layers.values():
            k, k_leaf, v, v_leaf = entries[unit]
            entries[unit] = None
            for t, leaf in ((k, k_leaf), (v, v_leaf)):
                if leaf.grad is not None:
                    roots.append(t)
                    grads.append(leaf.grad)
        return roots, grads


@dataclass
class SeqUnit(PackedBatch):
    """One unit of a micro-batch: its tokens/labels/positions and the key ranges (``cu_seqlens``
    are the unit's query pieces per document, ``cu_seqlens_k`` the matching key ranges counted
    from ``k_start``; ``max_seqlen``/``max_seqlen_k`` their longest, host ints), plus the
    micro-batch's cache."""

    cu_seqlens_k: torch.Tensor = None
    k_start: int = 0
    cache: KVCache = None
    max_seqlen_k: int = 0


@dataclass
class CPSeqUnit(CPBatch):
    """A Seq1F1B unit under context parallelism: this rank's zigzag slice of the unit, and the
    gather plan of its prefix: ``prefix_index`` picks, from the earlier units' K/V all-gathered
    over cp, the rows of each document piece of this unit's ring stream in token order, and
    ``prefix_cu`` [pieces+1] bounds them (longest: ``meta.prefix_max_len``). None for unit 0."""

    unit: int = 0
    cache: KVCache = None
    prefix_index: torch.Tensor | None = None
    prefix_cu: torch.Tensor | None = None


def cp_gather_order(mesh) -> list[tuple[int, int]]:
    """``(ring rank, head rank)`` of every rank of this rank's cp group, in the order an
    all-gather over the group concatenates their slices (their process-group ranks)."""
    group = mesh.group("cp")
    ranks = sorted(mesh.ranks("cp"), key=lambda g: dist.get_group_rank(group, g))
    return [(mesh.layout.coords(g)["rp"], mesh.layout.coords(g)["hp"]) for g in ranks]


def _prefix_plan(held: list[torch.Tensor], doc_of: torch.Tensor, piece_docs: list[int]):
    """Host-side gather plan of a unit's prefix. ``held``: micro-batch index of every row of the
    all-gathered earlier units' K/V (-1: padding), ``piece_docs``: the document of each piece
    of the unit's ring stream (-1: the layout's padding document). Returns ``(index, cu, longest)``."""
    index = torch.cat(held)
    docs = torch.where(index >= 0, doc_of[index.clamp(min=0)], -1)
    rows, counts = [], []
    for d in piece_docs:
        r = (docs == d).nonzero().squeeze(1) if d >= 0 else index.new_zeros(0)
        rows.append(r[index[r].argsort()])
        counts.append(r.numel())
    cu = torch.tensor([0] + counts).cumsum(0).to(torch.int32)
    return torch.cat(rows), cu, max(counts, default=0)


def split_units_cp(batch: PackedBatch, lengths: list[int], *, rp: int, hp: int, tp: int, ring_rank: int,
                   head_rank: int, cp_group, cp_order: list[tuple[int, int]]) -> list[CPSeqUnit]:
    """Cut a full micro-batch into units of the given token counts, then lay each unit out over
    the cp ranks (I-3; documents cut at unit boundaries are pieces of the same document).

    The layout is a function of the micro-batch alone, so this rank computes every cp rank's
    token slices (``cp_order``: :func:`cp_gather_order`) and from them each unit's prefix gather
    plan, here on the host."""
    if sum(lengths) != batch.num_tokens:
        raise ValueError(f"unit lengths {lengths} add up to {sum(lengths)}, not {batch.num_tokens} tokens")
    cu = batch.cu_seqlens.long()
    doc_of = torch.searchsorted(cu[1:], torch.arange(batch.num_tokens), right=True)
    cache, units, b = KVCache(cp_group), [], 0
    held: list[list[torch.Tensor]] = [[] for _ in cp_order]  # per gather position: its units' token indices
    for j, n in enumerate(lengths):
        e = b + n
        bounds = sorted({b, e} | {x for x in cu.tolist() if b < x < e})
        pieces = torch.tensor(bounds) - b
        piece = PackedBatch(batch.tokens[b:e], batch.labels[b:e], batch.position_ids[b:e], pieces.to(torch.int32))
        index = PackedBatch(torch.arange(b, e) + 1, piece.labels, piece.position_ids, piece.cu_seqlens)
        local = split_for_cp(piece, rp=rp, hp=hp, tp=tp, ring_rank=ring_rank, head_rank=head_rank)
        docs = doc_of[torch.tensor(bounds[:-1])].tolist()
        extra = local.meta.cu_seqlens.numel() - 1 - len(docs)  # the layout's padding document
        plan = (None, None, 0)
        if j:
            plan = _prefix_plan([t for rank in held for t in rank], doc_of, docs + [-1] * extra)
        for position, (r, h) in enumerate(cp_order):
            held[position].append(split_for_cp(index, rp=rp, hp=hp, tp=tp, ring_rank=r, head_rank=h).tokens - 1)
        local.meta.prefix_max_len = plan[2]
        units.append(CPSeqUnit(local.tokens, local.labels, local.position_ids, local.cu_seqlens,
                               max_seqlen=local.max_seqlen, num_valid=local.num_valid, meta=local.meta, unit=j,
                               cache=cache, prefix_index=plan[0], prefix_cu=plan[1]))
        b = e
    return units


def split_units(batch: PackedBatch, lengths: list[int]) -> list[SeqUnit]:
    """Cut a micro-batch into units of the given token counts (they must add up to its length)."""
    if sum(lengths) != batch.num_tokens:
        raise ValueError(f"unit lengths {lengths} add up to {sum(lengths)}, not {batch.num_tokens} tokens")
    docs = list(zip(batch.cu_seqlens[:-1].tolist(), batch.cu_seqlens[1:].tolist()))
    cache, units, b = KVCache(), [], 0
    for n in lengths:
        e = b + n
        inside = [(s, t) for s, t in docs if s < e and t > b]
        k_start = inside[0][0]
        q_lens = [min(t, e) - max(s, b) for s, t in inside]
        k_lens = [min(t, e) - s for s, t in inside]
        cu_q = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
        cu_k = torch.tensor([0] + k_lens).cumsum(0).to(torch.int32)
        units.append(SeqUnit(batch.tokens[b:e], batch.labels[b:e], batch.position_ids[b:e], cu_q,
                             max_seqlen=max(q_lens), cu_seqlens_k=cu_k, k_start=k_start, cache=cache,
                             max_seqlen_k=max(k_lens)))
        b = e
    return units
