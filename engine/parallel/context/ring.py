"""Zigzag ring attention over the rp group (causal, packed documents, GQA).

Legend: S tokens of this ring rank's stream (layout.py), H query heads, G KV heads (only the
model's real KV heads travel), D head dim.

Forward, step i = 0 … rp−1, holding the K/V block of ring rank ``src = r − i``:
  i = 0      causal attention of the whole stream on its own block;
  src < r    every query against the block's *front* half (earlier chunks), non-causal;
  src > r    only the *back* half of the queries against the whole block, non-causal.
Partial (out, lse) merge in fp32 with the stable form
``out ← out − σ(lse_b − lse)·(out − out_b)``, ``lse ← lse − log σ(lse − lse_b)``.
K/V move to the next ring rank while the current block is computed: 2·(rp−1) blocks per pass.

Backward recomputes each block's contribution from the merged (out, lse) — the kernel contract's
backward — with K/V travelling the same way; the dK/dV of a remote block accumulate in a buffer
that travels one hop behind its block and arrives at the owner after step rp−1: 2·(rp−1) blocks.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from engine.kernels.dispatch import backward as attention_backward
from engine.kernels.dispatch import forward as attention_forward
from engine.parallel import p2p


class RingComm:
    """Send to the next ring rank and receive from the previous one: each exchange is one p2p
    batch (:func:`engine.parallel.p2p.exchange`), every ring rank posting the same batches in
    the same order, so they pair without tags and without relying on buffered sends."""

    def __init__(self, group, ranks: list[int], index: int):
        self.group, self.size, self.index = group, len(ranks), index
        self.next, self.prev = ranks[(index + 1) % len(ranks)], ranks[(index - 1) % len(ranks)]
        if group is not None and len(ranks) > 1:  # I-7: a group a rank uses is one it belongs to
            members = dist.get_process_group_ranks(group)
            assert set(ranks) <= set(members), f"ring ranks {ranks} are not all in the group {members}"

    def exchange(self, tensors: list[torch.Tensor], kind: str, step: str = "ring exchange"):
        """Start sending ``tensors`` to next / receiving their like from prev; returns
        ``(wait, received)`` — call ``wait()`` before reading ``received``. ``step`` names the
        exchange in p2p errors."""
        received = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in tensors]
        batch = p2p.exchange([(t, self.next) for t in tensors], [(buf, self.prev) for buf in received],
                             self.group, step=step, kind=kind)
        return batch.wait, received


def _merge(out, lse, out_b, lse_b, rows=None):
    """Merge a partial (out_b, lse_b) into the fp32 accumulators (only ``rows`` when given)."""
    if rows is not None:
        o, l = out[rows], lse[:, rows]
        _merge(o, l, out_b, lse_b)
        out[rows], lse[:, rows] = o, l
        return
    w = torch.sigmoid(lse_b - lse).transpose(0, 1).unsqueeze(-1)  # [S, H, 1]
    out.sub_(w * (out - out_b.float()))
    lse.sub_(F.logsigmoid(lse - lse_b))


def _kind(src: int, r: int) -> str:
    """How block ``src`` meets ring rank ``r``'s queries (zigzag): self, front or back."""
    return "self" if src == r else ("front" if src < r else "back")


def _block_forward(kind, q, kv, meta, scale, out, lse):
    """One ring step's partial attention, merged into ``out``/``lse``. Document boundaries and
    their longest lengths come from ``meta`` (host ints: no device read, I-9)."""
    cu, half, n, m = meta.cu_seqlens, meta.half_cu_seqlens, meta.max_len, meta.half_max_len
    if kind == "self":
        o, l = attention_forward(q, kv[0], kv[1], cu, cu, n, n, causal=True, scale=scale)
        out.copy_(o.float())
        lse.copy_(l)
    elif kind == "front":
        o, l = attention_forward(q, kv[0][meta.front_idx], kv[1][meta.front_idx], cu, half, n, m,
                                 causal=False, scale=scale)
        _merge(out, lse, o, l)
    else:
        o, l = attention_forward(q[meta.back_idx], kv[0], kv[1], half, cu, m, n, causal=False, scale=scale)
        _merge(out, lse, o, l, rows=meta.back_idx)


def _block_backward(kind, dout, q, kv, out, lse, meta, scale, dq):
    """Adds this block's dQ into ``dq``; returns the block's (dK, dV) in fp32."""
    cu, half, front, back = meta.cu_seqlens, meta.half_cu_seqlens, meta.front_idx, meta.back_idx
    n, m = meta.max_len, meta.half_max_len
    dk = torch.zeros(kv[0].shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros_like(dk)
    if kind == "self":
        a, b, c = attention_backward(dout, q, kv[0], kv[1], out, lse, cu, cu, n, n, causal=True, scale=scale)
        dq += a.float()
        dk += b.float()
        dv += c.float()
    elif kind == "front":
        a, b, c = attention_backward(dout, q, kv[0][front], kv[1][front], out, lse, cu, half, n, m,
                                     causal=False, scale=scale)
        dq += a.float()
        dk[front] += b.float()
        dv[front] += c.float()
    else:
        a, b, c = attention_backward(dout[back], q[back], kv[0], kv[1], out[back], lse[:, back],
                                     half, cu, m, n, causal=False, scale=scale)
        dq[back] += a.float()
        dk += b.float()
        dv += c.float()
    return dk, dv


class DoubleRing:
    """The rp ring ranks as ``rp / window`` windows of ``window`` consecutive ring ranks.

    Inner rings circulate K/V inside a window; between rounds every window passes the block it
    started the round with to the same position of the next window (the *outer* ring), while the
    inner steps compute. ``window = 0`` or ``rp`` is the plain ring. Per pass every rank receives
    rp − 1 blocks: (rp/window)·(window − 1) inner + (rp/window − 1) outer.

    The two rings run on their own process groups — ``inner_group``: this rank's window,
    ``outer_group``: the ranks at this rank's position in every window (the mesh's ``rp_inner``
    and ``rp_outer``) — because NCCL runs the ops of one communicator in order: on a shared group
    the outer exchange, posted first, would hold every inner step behind it instead of
    overlapping them.
    """

    def __init__(self, ranks: list[int], index: int, window: int = 0, *, inner_group, outer_group=None):
        rp = len(ranks)
        self.rp, self.r = rp, index
        self.w = window or rp
        self.nw = rp // self.w
        self.win, self.pos = divmod(index, self.w)
        w0 = self.win * self.w
        self.inner = RingComm(inner_group, ranks[w0:w0 + self.w], self.pos)
        outer_ranks = [ranks[x * self.w + self.pos] for x in range(self.nw)]
        assert self.nw == 1 or outer_group is not None, "a double ring needs its outer ring's group"
        self.outer = RingComm(outer_group, outer_ranks, self.win)
        self.outer_back = RingComm(outer_group, outer_ranks[::-1], self.nw - 1 - self.win)

    def src(self, rnd: int, step: int) -> int:
        """Ring rank whose K/V block this rank holds at inner ``step`` of outer round ``rnd``."""
        window = (self.win - rnd) % self.nw
        return window * self.w + (self.pos - step) % self.w


def ring_forward(q, k, v, meta, ring: DoubleRing, scale):
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.zeros(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
    kv = [k, v]
    for rnd in range(ring.nw):
        outer = ring.outer.exchange(kv, "ring_kv", f"ring forward, outer round {rnd}") if rnd < ring.nw - 1 else None
        for step in range(ring.w):
            inner = (ring.inner.exchange(kv, "ring_kv", f"ring forward, round {rnd} step {step}")
                     if step < ring.w - 1 else None)
            _block_forward(_kind(ring.src(rnd, step), ring.r), q, kv, meta, scale, out, lse)
            if inner is not None:
                wait, kv = inner
                wait()
        if outer is not None:
            wait, kv = outer
            wait()
    return out, lse


def _round_backward(dout, q, kv, out, lse, meta, ring: DoubleRing, rnd: int, scale, dq):
    """One outer round of the backward pass: K/V circulate the inner ring; each block's dK/dV
    accumulator travels one hop behind it and, after window − 1 hops, reaches the rank that
    started the round with that block. Returns that (round-start) block's dK/dV."""
    pending = None
    for step in range(ring.w):
        exchange = (ring.inner.exchange(kv, "ring_kv", f"ring backward, round {rnd} step {step}")
                    if step < ring.w - 1 else None)
        dk_b, dv_b = _block_backward(_kind(ring.src(rnd, step), ring.r), dout, q, kv, out, lse, meta,
                                     scale, dq)
        if step == 0:
            dk_start, dv_start = dk_b, dv_b
        else:
            if pending is not None:
                wait, acc = pending
                wait()
                dk_b += acc[0]
                dv_b += acc[1]
            pending = ring.inner.exchange([dk_b, dv_b], "ring_dkv", f"ring backward dK/dV, round {rnd} step {step}")
        if exchange is not None:
            wait, kv = exchange
            wait()
    if pending is not None:
        wait, acc = pending
        wait()
        dk_start += acc[0]
        dv_start += acc[1]
    return dk_start, dv_start


def ring_backward(dout, q, k, v, out, lse, meta, ring: DoubleRing, scale):
    """Outer rounds run in reverse (nw−1 … 0): a round's dK/dV total for its start block goes
    back along the outer ring to the window that processes the same block one round earlier,
    and round 0's block is this rank's own."""
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    kv, acc_pending = [k, v], None
    if ring.nw > 1:
        wait, kv = ring.outer_back.exchange([k, v], "ring_kv", "ring backward, outer K/V to the last round")
        wait()
    for rnd in reversed(range(ring.nw)):
        prefetch = (ring.outer_back.exchange(kv, "ring_kv", f"ring backward, outer prefetch for round {rnd - 1}")
                    if rnd >= 2 else None)
        dk_r, dv_r = _round_backward(dout, q, kv, out, lse, meta, ring, rnd, scale, dq)
        if acc_pending is not None:
            wait, acc = acc_pending
            wait()
            dk_r += acc[0]
            dv_r += acc[1]
        if rnd > 0:
            acc_pending = ring.outer_back.exchange([dk_r, dv_r], "ring_dkv", f"ring backward dK/dV, outer round {rnd}")
            if prefetch is not None:
                wait, kv = prefetch
                wait()
            else:
                kv = [k, v]
    return dq.to(q.dtype), dk_r.to(k.dtype), dv_r.to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, k_pre, v_pre, meta, ring, scale, cu_pre):
        out, lse = ring_forward(q, k, v, meta, ring, scale)
        if k_pre is not None:  # Seq1F1B: every earlier unit's keys of the same document, all visible
            o, l = attention_forward(q, k_pre, v_pre, meta.cu_seqlens, cu_pre, meta.max_len, meta.prefix_max_len,
                                     causal=False, scale=scale)
            _merge(out, lse, o, l)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, k_pre, v_pre, cu_pre)
        ctx.meta, ctx.ring, ctx.scale = meta, ring, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, k_pre, v_pre, cu_pre = ctx.saved_tensors
        dout = dout.contiguous()
        dq, dk, dv = ring_backward(dout, q, k, v, out, lse, ctx.meta, ctx.ring, ctx.scale)
        dk_pre = dv_pre = None
        if k_pre is not None:
            meta = ctx.meta
            a, dk_pre, dv_pre = attention_backward(dout, q, k_pre, v_pre, out, lse, meta.cu_seqlens, cu_pre,
                                                   meta.max_len, meta.prefix_max_len, causal=False, scale=ctx.scale)
            dq = dq + a
        return dq, dk, dv, dk_pre, dv_pre, None, None, None, None


def ring_attention(q_SHD, k_SGD, v_SGD, meta, ring: DoubleRing, scale=None, prefix=None):
    """Causal zigzag (double) ring attention of this ring rank's stream; ``[S, H, D]`` out.

    ``prefix = (k_pre, v_pre, cu_pre)``: keys/values that every query of a document sees in full
    (Seq1F1B's earlier units), grouped per document like ``meta.cu_seqlens`` (longest group:
    ``meta.prefix_max_len``); merged through lse in the same pass, with their gradients returned.
    Every kernel call gets its longest document lengths from ``meta`` as host ints (I-9)."""
    k_pre, v_pre, cu_pre = prefix if prefix is not None else (None, None, None)
    return _RingAttention.apply(q_SHD, k_SGD, v_SGD, k_pre, v_pre, meta, ring, scale, cu_pre)
