"""Local (single-rank) variable-length attention with log-sum-exp, with autograd: DESIGN §6.

The kernel contract is ``forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, causal, scale)
-> (out, lse)`` and ``backward(dout, q, k, v, out, lse, ...) -> (dq, dk, dv)``;
:mod:`engine.kernels.dispatch` picks its implementation per call (flash kernels on CUDA, the
pure-torch kernels of :mod:`engine.kernels.reference` elsewhere, those tuned by measurement on CPU).
Context-parallel modes call only the contract, so a GPU kernel can replace the reference without
touching them. This module sits above both: ``local_attention`` and ``_LocalAttention`` are the
model's entry, and ``attention_forward``/``attention_backward`` (the reference) are re-exported here
for the callers that test against them.

Legend: T tokens (documents packed back to back), H query heads, G KV heads, D head dim.
``q [Tq, H, D]``, ``k/v [Tk, G, D]``, ``out [Tq, H, D]``, ``lse [H, Tq]`` fp32; ``cu_seqlens`` int32
``[num_docs + 1]``.
"""
from __future__ import annotations

import torch

from engine.kernels import dispatch
from engine.kernels.reference import attention_backward, attention_forward

__all__ = ["attention_backward", "attention_forward", "local_attention"]


class _LocalAttention(torch.autograd.Function):
    """Autograd over the kernel contract; the implementation is chosen by ``dispatch`` (flash
    kernels on CUDA, the reference kernels elsewhere). ``max_q``/``max_k``: the longest document
    of ``cu_q``/``cu_k`` as Python ints from the host (the flash kernels need them; None reads
    them off the device tensors, a host sync per call).

    ``keep`` (activation recomputation, engine/model/recompute.py): on the first run the
    ``(out, lse)`` are stashed in it; when the region runs again they are taken back instead of
    computed, so the saved tensors are the same and the kernel does not run twice."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, keep=None):
        if keep is not None and keep.replaying:
            out, lse = keep.unstash()
        else:
            out, lse = dispatch.forward(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, scale=scale)
            if keep is not None:
                keep.stash(out, lse)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.causal, ctx.scale, ctx.max_q, ctx.max_k = causal, scale, max_q, max_k
        return out.view_as(out)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        dq, dk, dv = dispatch.backward(dout.contiguous(), q, k, v, out, lse, cu_q, cu_k, ctx.max_q, ctx.max_k,
                                       causal=ctx.causal, scale=ctx.scale)
        return dq, dk, dv, None, None, None, None, None, None, None


def local_attention(q, k, v, cu_seqlens, causal=True, scale=None, keep=None, max_len=None):
    """Varlen self-attention of packed documents on one rank (autograd through the contract);
    ``max_len``: the longest document of ``cu_seqlens`` (a host int; see :class:`_LocalAttention`)."""
    return _LocalAttention.apply(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, causal, scale, keep)
