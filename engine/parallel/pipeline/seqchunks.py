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

from engine.data.packing import PackedBatch
from engine.parallel.comm import gather_along_dim, gather_shards
from engine.parallel.context.layout import CPBatch, split_for_cp


class KVCache:
    """K/V of one micro-batch's units on one model chunk, per layer, in unit order.

    With context parallelism (``cp_group``) each rank caches its own zigzag slice of every unit;
    a unit's prefix is all-gathered over cp (its backward reduce-scatters the prefix gradient to
    the owners) and regrouped per document of the unit (padding dropped)."""

    def __init__(self, cp_group=None, doc_of: torch.Tensor | None = None):
        self.layers: dict[int, list[tuple[torch.Tensor, ...]]] = {}
        self.cp_group, self.doc_of = cp_group, doc_of
        self.token_index: list[torch.Tensor] = []   # per unit: micro-batch index of each local token (-1: pad)
        self.piece_docs: list[torch.Tensor] = []    # per unit: document of each ring-stream piece (-1: pad)
        self._plans: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def prefix(self, layer: int, unit: int, k: torch.Tensor, v: torch.Tensor):
        """Cache this unit's K/V; return ``(k_pre, v_pre, cu_pre)`` of the earlier units, grouped
        per document piece of this unit's ring stream (None for the first unit)."""
        entries = self.layers.setdefault(layer, [])
        entries.append((k, k.detach().requires_grad_(True), v, v.detach().requires_grad_(True)))
        if unit == 0:
            return None
        perm, cu = self._plan(unit)
        k_all = gather_along_dim(torch.cat([e[1] for e in entries[:unit]]), 0, self.cp_group)
        v_all = gather_along_dim(torch.cat([e[3] for e in entries[:unit]]), 0, self.cp_group)
        return k_all[perm], v_all[perm], cu

    def _plan(self, unit: int):
        if unit not in self._plans:
            index = torch.cat(gather_shards(torch.cat(self.token_index[:unit]), self.cp_group))
            docs = torch.where(index >= 0, self.doc_of[index.clamp(min=0)], -1)
            rows, counts = [], []
            for d in self.piece_docs[unit].tolist():
                r = ((docs == d) & (index >= 0)).nonzero().squeeze(1) if d >= 0 else index.new_zeros(0)
                rows.append(r[index[r].argsort()])
                counts.append(r.numel())
            cu = torch.tensor([0] + counts, device=index.device).cumsum(0).to(torch.int32)
            self._plans[unit] = (torch.cat(rows), cu)
        return self._plans[unit]

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
        to its cached K/V."""
        roots, grads = [], []
        for entries in self.layers.values():
            k, k_leaf, v, v_leaf = entries[unit]
            for t, leaf in ((k, k_leaf), (v, v_leaf)):
                if leaf.grad is not None:
                    roots.append(t)
                    grads.append(leaf.grad)
        return roots, grads


@dataclass
class SeqUnit(PackedBatch):
    """One unit of a micro-batch: its tokens/labels/positions and the key ranges (``cu_seqlens``
    are the unit's query pieces per document, ``cu_seqlens_k`` the matching key ranges counted
    from ``k_start``), plus the micro-batch's cache."""

    cu_seqlens_k: torch.Tensor = None
    k_start: int = 0
    cache: KVCache = None

    def to(self, device) -> "SeqUnit":
        return SeqUnit(self.tokens.to(device), self.labels.to(device), self.position_ids.to(device),
                       self.cu_seqlens.to(device), self.cu_seqlens_k.to(device), self.k_start, self.cache)


@dataclass
class CPSeqUnit(CPBatch):
    """A Seq1F1B unit under context parallelism: this rank's zigzag slice of the unit."""

    unit: int = 0
    cache: KVCache = None

    def to(self, device) -> "CPSeqUnit":
        base = CPBatch.to(self, device)
        return CPSeqUnit(base.tokens, base.labels, base.position_ids, base.cu_seqlens, base.meta, self.unit,
                         self.cache)


def split_units_cp(batch: PackedBatch, lengths: list[int], *, rp: int, hp: int, tp: int, ring_rank: int,
                   head_rank: int, cp_group) -> list[CPSeqUnit]:
    """Cut a full micro-batch into units of the given token counts, then lay each unit out over
    the cp ranks (I-3; documents cut at unit boundaries are pieces of the same document)."""
    if sum(lengths) != batch.num_tokens:
        raise ValueError(f"unit lengths {lengths} add up to {sum(lengths)}, not {batch.num_tokens} tokens")
    cu = batch.cu_seqlens.long()
    doc_of = torch.searchsorted(cu[1:], torch.arange(batch.num_tokens), right=True)
    cache, units, b = KVCache(cp_group, doc_of), [], 0
    where = dict(rp=rp, hp=hp, tp=tp, ring_rank=ring_rank, head_rank=head_rank)
    for j, n in enumerate(lengths):
        e = b + n
        bounds = sorted({b, e} | {x for x in cu.tolist() if b < x < e})
        pieces = torch.tensor(bounds) - b
        piece = PackedBatch(batch.tokens[b:e], batch.labels[b:e], batch.position_ids[b:e], pieces.to(torch.int32))
        index = PackedBatch(torch.arange(b, e) + 1, piece.labels, piece.position_ids, piece.cu_seqlens)
        local = split_for_cp(piece, **where)
        cache.token_index.append(split_for_cp(index, **where).tokens - 1)
        docs = doc_of[torch.tensor(bounds[:-1])]
        extra = local.meta.cu_seqlens.numel() - 1 - docs.numel()  # the layout's padding document
        cache.piece_docs.append(torch.cat([docs, torch.full((extra,), -1, dtype=torch.long)]))
        units.append(CPSeqUnit(local.tokens, local.labels, local.position_ids, local.cu_seqlens, local.meta, j, cache))
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
        units.append(SeqUnit(batch.tokens[b:e], batch.labels[b:e], batch.position_ids[b:e], cu_q, cu_k,
                             k_start, cache))
        b = e
    return units
