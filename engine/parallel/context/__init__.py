"""Context parallelism: sequence layout, zigzag ring, Ulysses, and their 2D composition.

``make_core_attention(mesh)`` returns the attention the model calls with this rank's q/k/v
(``[t, H/tp, D]``, ``[t, G/tp, D]``) and its :class:`~.layout.CPBatch`:

* hp > 1: Ulysses all-to-all in the hp group (scatter heads, gather the ring rank's stream);
* rp > 1: zigzag ring attention over the rp group on that stream; rp = 1: local attention;
* all-to-all back.

``ring`` is hp = 1, ``ulysses`` is rp = 1, ``hybrid`` is both (LoongTrain's 2D attention); the
placement of hp and rp ranks is the mesh's business.
"""
from __future__ import annotations

from engine.parallel.context.ring import DoubleRing, ring_attention
from engine.parallel.context.ulysses import heads_to_seq, kv_for_heads, seq_to_heads


def make_core_attention(mesh, ring_window: int | None = None):
    """The core attention of this rank's mesh position (None when cp = 1: the model's default).

    The double ring's window is the mesh's (``ParallelMesh.build(ring_window=...)``), which owns
    its inner and outer groups; ``ring_window``, when given (the config's), must agree with it."""
    if mesh.cp == 1:
        return None
    if ring_window is not None and (ring_window or mesh.rp) != (mesh.ring_window or mesh.rp):
        raise ValueError(f"parallel.ring_window={ring_window} but the mesh was built with ring_window="
                         f"{mesh.ring_window}; pass ring_window={ring_window} to ParallelMesh.build")
    # rp = 1 (Ulysses) is a ring of one rank: only its local causal step runs
    ring = DoubleRing(mesh.ranks("rp"), mesh.index("rp"), mesh.ring_window,
                      inner_group=mesh.group("rp_inner"), outer_group=mesh.group("rp_outer"))
    return CoreAttention(mesh.hp, mesh.group("hp"), mesh.index("hp"), ring)


class CoreAttention:
    """hp-way Ulysses around a (double) ring over the rp ranks: the 2D attention of one SP group
    (the mesh's cp group, or one of FlexSP's per-step groups)."""

    def __init__(self, hp: int, hp_group, hp_index: int, ring: DoubleRing):
        self.hp, self.hp_group, self.hp_index, self.ring = hp, hp_group, hp_index, ring

    def __call__(self, q, k, v, batch, prefix=None):
        hp, group = self.hp, self.hp_group
        q = seq_to_heads(q, group, hp)
        k = seq_to_heads(kv_for_heads(k, hp), group, hp)
        v = seq_to_heads(kv_for_heads(v, hp), group, hp)
        if prefix is not None and hp > 1:  # this hp rank's KV heads of the (all-token) prefix
            k_pre, v_pre, cu = prefix
            k_pre, v_pre = (_head_slice(kv_for_heads(t, hp), hp, self.hp_index) for t in (k_pre, v_pre))
            prefix = (k_pre, v_pre, cu)
        return heads_to_seq(ring_attention(q, k, v, batch.meta, self.ring, prefix=prefix), group, hp)


def _head_slice(kv_TGD, hp: int, index: int):
    t, g, d = kv_TGD.shape
    return kv_TGD.view(t, hp, g // hp, d)[:, index]
