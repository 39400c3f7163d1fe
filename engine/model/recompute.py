"""Activation recomputation (``train.recompute``): what a transformer layer keeps for backward.

Modes, per layer with input x (bench_memory.py prints what each saves):

``none``
    everything autograd saves (the layer's own functions save one tensor or none each).
``selective``
    the attention block up to its output projection — input norm, QKV projection, RoPE and the
    core attention with its context-parallel communication — runs again in backward; kept: x and
    the attention output (``linear_proj`` needs it). The attention kernel here is flash-style (it
    never stores the score matrix), so what this frees is the attention's inputs q, k, v (and
    Ulysses' all-to-all copies, the ring's fp32 output, Seq1F1B's gathered prefix), its lse and
    the norm output; the MLP keeps its activations.
``attention-cached``
    the whole layer runs again in backward except the attention itself: its output and lse are
    kept from the forward pass, so the rerun skips the O(S²) kernel and, under ring attention,
    all ring traffic (LoongTrain's Selective Checkpoint++). Kept: x, out, lse. Ulysses'
    all-to-alls of q, k, v and of the output run again (the backward needs them).
``full``
    the whole layer runs again in backward; kept: x.

Mechanism: torch's non-reentrant checkpoint (saved tensors are dropped and rebuilt on first use
in backward) around the region, which receives a :class:`Region` telling it whether it runs
for the first time or again. Tensors the region keeps (attention-cached's out and lse) are packed
with the saved-tensor hooks active where the region was entered, like the checkpoint's own
inputs, so hooks that count or offload saved tensors see them.

Exactness: a rerun repeats the same operations on the same values, so gradients equal those of
``none`` (the tests check this bitwise on one process, and mesh-exactness, I-5, for every mode).
RNG: the model has no dropout or other randomness, so a rerun needs no RNG state
(``preserve_rng_state=False``).
Communication: a rerun repeats its region's collectives (tp all-gather / reduce-scatter, Ulysses
all-to-all, ring p2p, the Seq1F1B prefix all-gather) in backward; every rank of a group reruns
the same regions in the same order, because backward visits layers in the same order everywhere.
Seq1F1B: the per-layer K/V cache is appended to on the first run only; a rerun rebuilds the same
keys from the cached leaves (:func:`extend_cache`, :func:`cache_prefix`), so the gradients that
later units left on those leaves still flow through the original graph.
"""
from __future__ import annotations

import torch
import torch.utils.checkpoint as tuc

MODES = ("none", "full", "selective", "attention-cached")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"recompute={mode!r} is not a recompute mode; use one of {', '.join(MODES)} "
                         f"(train.recompute)")
    return mode


class Region:
    """One checkpointed call of a layer region: its first run records, its reruns replay.

    ``stash``/``unstash`` keep the attention's ``(out, lse)`` of the first run for the reruns
    (attention-cached); ``note``/``recall`` carry plain values (Seq1F1B cache positions) from
    the first run to the reruns. Both are consumed in call order, which a rerun repeats.
    """

    def __init__(self, keeps_attention: bool):
        self.keeps_attention = keeps_attention
        self.replaying = False
        self._runs = 0
        self._stash: list = []
        self._notes: list = []
        self._cursor = self._note_cursor = 0
        # the hooks of whoever entered the region (None: none), for the tensors kept across it
        top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
        self._hooks = top(True) if top is not None else None

    def start(self) -> None:
        self.replaying = self._runs > 0
        self._runs += 1
        self._cursor = self._note_cursor = 0

    def stash(self, *tensors: torch.Tensor) -> None:
        assert not self.replaying
        pack = self._hooks[0] if self._hooks else (lambda t: t)
        self._stash.append([pack(t.detach()) for t in tensors])

    def unstash(self) -> list[torch.Tensor]:
        assert self.replaying, "unstash is for reruns"
        unpack = self._hooks[1] if self._hooks else (lambda t: t)
        packed = self._stash[self._cursor]
        self._cursor += 1
        return [unpack(p) for p in packed]

    def note(self, value):
        """First run: record ``value`` and return it; rerun: return what the first run recorded."""
        if not self.replaying:
            self._notes.append(value)
            return value
        value = self._notes[self._note_cursor]
        self._note_cursor += 1
        return value


def checkpoint(fn, *args, keep_attention: bool = False):
    """``fn(*args, region)`` whose saved tensors are rebuilt in backward by running it again."""
    region = Region(keep_attention)

    def run(*inner):
        region.start()
        return fn(*inner, region)

    return tuc.checkpoint(run, *args, use_reentrant=False, preserve_rng_state=False)


# -- Seq1F1B's K/V cache under recomputation ----------------------------------------------------
def extend_cache(cache, layer: int, k: torch.Tensor, v: torch.Tensor, region: Region | None):
    """``cache.extend(layer, k, v)`` on the first run; on a rerun the same keys/values (the cached
    leaves of the units before this one, then this unit's recomputed k/v) without touching the cache."""
    entries = cache.layers.get(layer, [])
    count = region.note(len(entries)) if region is not None else len(entries)
    if region is None or not region.replaying:
        return cache.extend(layer, k, v)
    earlier = entries[:count]
    return (torch.cat([e[1] for e in earlier] + [k]) if earlier else k,
            torch.cat([e[3] for e in earlier] + [v]) if earlier else v)


def cache_prefix(cache, layer: int, unit, k: torch.Tensor, v: torch.Tensor, region: Region | None):
    """``cache.prefix(layer, unit, k, v)`` (``unit``: the CPSeqUnit, with its prefix gather plan);
    on a rerun the entry it appends is removed again (the prefix it gathers — the entries of the
    earlier units — is the same, and its all-gather is repeated by every cp rank)."""
    entries = cache.layers.setdefault(layer, [])
    count = len(entries)
    try:
        return cache.prefix(layer, unit, k, v)
    finally:
        if region is not None and region.replaying:
            del entries[count:]


# -- attention-cached under context parallelism -------------------------------------------------
class _KeptRingAttention(torch.autograd.Function):
    """ring.py's ``_RingAttention`` (same saved tensors, same backward) whose forward runs the
    ring once and stashes ``(out, lse)`` in the region; a rerun takes them back and sends nothing."""

    @staticmethod
    def forward(ctx, q, k, v, k_pre, v_pre, meta, ring, scale, cu_pre, region):
        from engine.kernels.dispatch import forward as attention_forward
        from engine.parallel.context.ring import _merge, ring_forward

        if region.replaying:
            out, lse = region.unstash()
        else:
            out, lse = ring_forward(q, k, v, meta, ring, scale)
            if k_pre is not None:  # Seq1F1B: earlier units' keys of the same document, all visible
                o, l = attention_forward(q, k_pre, v_pre, meta.cu_seqlens, cu_pre, meta.max_len,
                                         meta.prefix_max_len, causal=False, scale=scale)
                _merge(out, lse, o, l)
            out = out.to(q.dtype)
            region.stash(out, lse)
        ctx.save_for_backward(q, k, v, out, lse, k_pre, v_pre, cu_pre)
        ctx.meta, ctx.ring, ctx.scale = meta, ring, scale
        return out.view_as(out)

    @staticmethod
    def backward(ctx, dout):
        from engine.parallel.context.ring import _RingAttention

        return (*_RingAttention.backward(ctx, dout), None)


def kept_core_attention(core, q, k, v, batch, prefix, region: Region) -> torch.Tensor:
    """``core(q, k, v, batch, prefix)`` — a :class:`~engine.parallel.context.CoreAttention`
    (hp-way Ulysses around a ring over rp ranks), or FlexSP's attention of the block in use —
    with the ring attention's ``(out, lse)`` kept in ``region``. The same composition as
    ``CoreAttention.__call__``; only the ring function differs."""
    from engine.parallel.context import CoreAttention, _head_slice
    from engine.parallel.context.ulysses import heads_to_seq, kv_for_heads, seq_to_heads

    core = getattr(core, "active", core)  # FlexSP: the attention of the block this micro-batch uses
    if not isinstance(core, CoreAttention):
        raise TypeError(f"train.recompute=attention-cached needs the core attention to be a CoreAttention, "
                        f"got {type(core).__name__}; use recompute=full or selective with it")
    hp, group = core.hp, core.hp_group
    q = seq_to_heads(q, group, hp)
    k = seq_to_heads(kv_for_heads(k, hp), group, hp)
    v = seq_to_heads(kv_for_heads(v, hp), group, hp)
    k_pre = v_pre = cu_pre = None
    if prefix is not None:
        k_pre, v_pre, cu_pre = prefix
        if hp > 1:  # this hp rank's KV heads of the (all-token) prefix
            k_pre, v_pre = (_head_slice(kv_for_heads(t, hp), hp, core.hp_index) for t in (k_pre, v_pre))
    out = _KeptRingAttention.apply(q, k, v, k_pre, v_pre, batch.meta, core.ring, None, cu_pre, region)
    return heads_to_seq(out, group, hp)
