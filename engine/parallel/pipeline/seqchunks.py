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


class KVCache:
    """K/V of one micro-batch's units on one model chunk, per layer, in unit order."""

    def __init__(self):
        self.layers: dict[int, list[tuple[torch.Tensor, ...]]] = {}

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
