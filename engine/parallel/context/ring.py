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

from engine.kernels.attention import attention_backward, attention_forward
from engine.parallel.comm import COUNTER


class RingComm:
    """Send to the next ring rank and receive from the previous one, asynchronously."""

    def __init__(self, group, ranks: list[int], index: int):
        self.group, self.size, self.index = group, len(ranks), index
        self.next, self.prev = ranks[(index + 1) % len(ranks)], ranks[(index - 1) % len(ranks)]

    def exchange(self, tensors: list[torch.Tensor], kind: str):
        """Start sending ``tensors`` to next / receiving their like from prev; returns
        ``(wait, received)`` — call ``wait()`` before reading ``received``."""
        received = [torch.empty_like(t) for t in tensors]
        ops = []
        for t, buf in zip(tensors, received):
            COUNTER.record(kind, self.group, t.numel() * t.element_size())
            ops.append(dist.P2POp(dist.isend, t.contiguous(), self.next, self.group))
            ops.append(dist.P2POp(dist.irecv, buf, self.prev, self.group))
        reqs = dist.batch_isend_irecv(ops)

        def wait():
            for req in reqs:
                req.wait()
        return wait, received


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


def _block(step_src: int, r: int, meta):
    """Which queries and keys of a block take part: ('self'|'front'|'back')."""
    return "self" if step_src == r else ("front" if step_src < r else "back")


def ring_forward(q, k, v, meta, comm: RingComm, scale):
    r = comm.index
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.zeros(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
    cu, half = meta.cu_seqlens, meta.half_cu_seqlens
    kv = [k, v]
    for step in range(comm.size):
        pending = comm.exchange(kv, "ring_kv") if step < comm.size - 1 else None
        kind = _block((r - step) % comm.size, r, meta)
        if kind == "self":
            o, l = attention_forward(q, kv[0], kv[1], cu, cu, causal=True, scale=scale)
            out.copy_(o.float())
            lse.copy_(l)
        elif kind == "front":
            o, l = attention_forward(q, kv[0][meta.front_idx], kv[1][meta.front_idx], cu, half,
                                     causal=False, scale=scale)
            _merge(out, lse, o, l)
        else:
            o, l = attention_forward(q[meta.back_idx], kv[0], kv[1], half, cu, causal=False, scale=scale)
            _merge(out, lse, o, l, rows=meta.back_idx)
        if pending is not None:
            wait, kv = pending
            wait()
    return out.to(q.dtype), lse


def ring_backward(dout, q, k, v, out, lse, meta, comm: RingComm, scale):
    r = comm.index
    cu, half, front, back = meta.cu_seqlens, meta.half_cu_seqlens, meta.front_idx, meta.back_idx
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    kv, acc_pending, acc = [k, v], None, None
    for step in range(comm.size):
        pending = comm.exchange(kv, "ring_kv") if step < comm.size - 1 else None
        kind = _block((r - step) % comm.size, r, meta)
        dk_b = torch.zeros(kv[0].shape, dtype=torch.float32, device=q.device)
        dv_b = torch.zeros_like(dk_b)
        if kind == "self":
            a, b, c = attention_backward(dout, q, kv[0], kv[1], out, lse, cu, cu, causal=True, scale=scale)
            dq += a.float()
            dk_b += b.float()
            dv_b += c.float()
        elif kind == "front":
            a, b, c = attention_backward(dout, q, kv[0][front], kv[1][front], out, lse, cu, half,
                                         causal=False, scale=scale)
            dq += a.float()
            dk_b[front] += b.float()
            dv_b[front] += c.float()
        else:
            a, b, c = attention_backward(dout[back], q[back], kv[0], kv[1], out[back], lse[:, back],
                                         half, cu, causal=False, scale=scale)
            dq[back] += a.float()
            dk_b += b.float()
            dv_b += c.float()
        if step == 0:
            dk_own, dv_own = dk_b, dv_b
        else:
            if acc_pending is not None:  # the accumulator of this block, one hop behind it
                acc_pending()
                dk_b += acc[0]
                dv_b += acc[1]
            acc_pending, acc = comm.exchange([dk_b, dv_b], "ring_dkv")
        if pending is not None:
            wait, kv = pending
            wait()
    if acc_pending is not None:  # own block's remote contributions, home after rp−1 hops
        acc_pending()
        dk_own += acc[0]
        dv_own += acc[1]
    return dq.to(q.dtype), dk_own.to(k.dtype), dv_own.to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, meta, comm, scale):
        out, lse = ring_forward(q, k, v, meta, comm, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.meta, ctx.comm, ctx.scale = meta, comm, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(dout.contiguous(), q, k, v, out, lse, ctx.meta, ctx.comm, ctx.scale)
        return dq, dk, dv, None, None, None


def ring_attention(q_SHD, k_SGD, v_SGD, meta, comm: RingComm, scale=None):
    """Causal zigzag ring attention of this ring rank's stream; ``[S, H, D]`` out."""
    return _RingAttention.apply(q_SHD, k_SGD, v_SGD, meta, comm, scale)
