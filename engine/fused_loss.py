"""Fused, chunked, vocab-parallel output layer + cross-entropy: the logits never exist whole.

Legend: T tokens of the micro-batch on this cp rank (all tp ranks see all T), t = T/tp this
rank's sequence-parallel token slice, n = tokens of one chunk after the tp gather, H hidden,
V/tp this rank's vocabulary slice.

The unfused head (engine/loss.py, ``loss_chunk_tokens=0``) materialises ``logits [T, V/tp]`` in the
model dtype, one fp32 working copy and its gradient: for Qwen2.5 (V = 152,064) 0.6 GB per 1k
tokens per fp32 copy at tp = 1, the largest activation of a long-sequence step. Here the final
hidden states ``x [t, H]`` (the token slice, as sequence parallelism leaves them) go through the
output layer and the loss one chunk at a time:

forward, per chunk
    piece ``x[s:e]`` of this rank's slice is all-gathered over tp (``n = tp·(e−s)`` tokens: piece
    i of every rank's slice, a fixed permutation of tokens that the per-token outputs undo); its
    logits ``[n, V/tp]`` give this rank's max ``m``, ``Σ exp(logit − m)`` and the target logit
    (on the rank whose slice holds the label); one all-gather of those ``[3, n]`` statistics
    gives every tp rank the log-sum-exp and the target logit, so the loss is known and the
    logits are dropped. Kept for backward: ``x`` (the slice), the per-token lse, the labels.
backward, per chunk
    the chunk's logits are recomputed, ``softmax = exp(logit − lse)``, minus one at the target,
    times the incoming per-token gradient; ``dx = g W`` is reduce-scattered back to this rank's
    piece (the sum over the vocabulary slices, as the unfused ``_SeqGatherLinear`` does) and
    ``dW += gᵀ x`` accumulates in fp32 (I-10) across chunks.

Why recompute rather than produce the gradients in forward (Liger's choice): the gradient of
the per-token losses is not known in forward — DPO weights each sequence's tokens by a factor
computed from the whole pair's sums, and the pipeline schedules hold several micro-batches in
flight — and an in-forward ``dW [V/tp, H]`` plus ``dx [t, H]`` per micro-batch in flight would cost
more memory than the chunk it saves. Recomputing costs one extra ``[n, H]×[H, V/tp]`` product per
chunk, ~1/3 more output-layer FLOPs: 2–3 % of a 7B step.

The arithmetic per token is the unfused path's (fp32 softmax of the model-dtype logits, the
gradient cast to the model dtype before the matmuls), so both agree to fp32 round-off (tests).
No host sync: chunk bounds come from shapes. Padded vocabulary columns (ids ≥ ``vocab_size``) are
masked out of the softmax, as in the unfused path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.parallel.comm import all_gather_dim, reduce_scatter_dim

IGNORE_INDEX = -100
_FP32_MIN = torch.finfo(torch.float32).min


def _pieces(t: int, tp: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """Bounds of the pieces of this rank's slice of ``t`` tokens that make chunks of about
    ``chunk_tokens`` gathered tokens."""
    per = max(1, chunk_tokens // tp)
    return [(s, min(s + per, t)) for s in range(0, t, per)] or [(0, 0)]


def _chunk_logits(xg, weight, real: int) -> torch.Tensor:
    """fp32 logits of gathered tokens ``xg [n, H]`` over this vocabulary slice, padding at -inf."""
    z = F.linear(xg, weight).float()
    if real < z.shape[-1]:
        z[:, max(real, 0):] = float("-inf")
    return z


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, labels, vocab_start, vocab_size, group, chunk_tokens):
        tp = 1 if group is None else torch.distributed.get_world_size(group)
        t = x.shape[0]
        real = vocab_size - vocab_start
        local_vocab = weight.shape[0]
        labels_RT = labels.view(tp, t)
        lse_RT = torch.empty(tp, t, dtype=torch.float32, device=x.device)
        losses = torch.empty(tp * t, dtype=torch.float32, device=x.device)  # returned whole: not a view
        losses_RT = losses.view(tp, t)
        for s, e in _pieces(t, tp, chunk_tokens):
            z = _chunk_logits(all_gather_dim(x[s:e], 0, group), weight, real)
            lab = labels_RT[:, s:e].reshape(-1)
            local_ids = lab - vocab_start
            here = (local_ids >= 0) & (local_ids < local_vocab)
            target = torch.where(here, z.gather(-1, local_ids.clamp(0, local_vocab - 1)[:, None]).squeeze(-1), 0.0)
            m = z.amax(-1).clamp_min(_FP32_MIN)
            s_exp = z.sub_(m[:, None]).exp_().sum(-1)
            del z
            stats = all_gather_dim(torch.stack([m, s_exp, target]), 0, group).view(tp, 3, -1)
            big = stats[:, 0].amax(0)
            lse = big + torch.log((stats[:, 1] * torch.exp(stats[:, 0] - big)).sum(0))
            loss = torch.where(lab != IGNORE_INDEX, lse - stats[:, 2].sum(0), 0.0)
            lse_RT[:, s:e] = lse.view(tp, -1)
            losses_RT[:, s:e] = loss.view(tp, -1)
        ctx.save_for_backward(x, weight, labels, lse_RT)
        ctx.vocab_start, ctx.real, ctx.group, ctx.chunk_tokens = vocab_start, real, group, chunk_tokens
        return losses

    @staticmethod
    def backward(ctx, grad_loss):
        x, weight, labels, lse_RT = ctx.saved_tensors
        group, vocab_start = ctx.group, ctx.vocab_start
        tp, t, local_vocab = lse_RT.shape[0], x.shape[0], weight.shape[0]
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        labels_RT, grad_RT = labels.view(tp, t), grad_loss.view(tp, t)
        dx = torch.empty_like(x) if want_x else None
        pieces = _pieces(t, tp, ctx.chunk_tokens)
        # one chunk: the product lands in the weight's dtype, as unfused; several: summed in fp32
        dw = None
        for s, e in pieces:
            xg = all_gather_dim(x[s:e], 0, group)
            lab = labels_RT[:, s:e].reshape(-1)
            local_ids = lab - vocab_start
            hit = (local_ids >= 0) & (local_ids < local_vocab) & (lab != IGNORE_INDEX)
            p = _chunk_logits(xg, weight, ctx.real).sub_(lse_RT[:, s:e].reshape(-1)[:, None]).exp_()
            p.scatter_add_(-1, local_ids.clamp(0, local_vocab - 1)[:, None], hit.float().neg_()[:, None])
            p.mul_((grad_RT[:, s:e].reshape(-1) * (lab != IGNORE_INDEX))[:, None])
            g = p.to(weight.dtype)
            del p
            if want_x:
                dx[s:e] = reduce_scatter_dim(g @ weight, 0, group)
            if want_w:
                if dw is not None and dw.dtype == g.dtype:  # fp32: summed inside the product, no temporary
                    dw.addmm_(g.t(), xg)
                elif dw is not None:
                    dw.add_(g.t() @ xg)
                else:
                    dw = g.t() @ xg if len(pieces) == 1 else (g.t() @ xg).float()
            # this chunk's [n, V/tp] gradient goes before the next chunk's logits are made (held to
            # the next assignment, it and the [V/tp, H] product were the step's peak: fp32 2·n·V/tp + 2·V/tp·H)
            g = None
        if dw is not None:
            dw = dw.to(weight.dtype)
        return dx, dw, None, None, None, None, None


def linear_cross_entropy(x_tH: torch.Tensor, weight_VH: torch.Tensor, labels_T: torch.Tensor, vocab_start: int,
                         vocab_size: int, tp_group, chunk_tokens: int) -> torch.Tensor:
    """Per-token losses ``[T]`` (fp32, 0 where the label is ``IGNORE_INDEX``) of the output layer
    ``weight_VH`` (this rank's vocabulary slice, first id ``vocab_start``) applied to this rank's
    sequence-parallel token slice ``x_tH``; identical on every tp rank. Gradients flow to ``x_tH``
    (reduce-scattered over tp) and ``weight_VH``; see the module docstring."""
    if x_tH.is_cuda and _cce_available():
        from engine.kernels.cce import cce_linear_cross_entropy, cce_usable

        tp = 1 if tp_group is None else torch.distributed.get_world_size(tp_group)
        if cce_usable(weight_VH, vocab_size, tp):
            return cce_linear_cross_entropy(x_tH, weight_VH, labels_T, vocab_start, vocab_size, tp_group)
    return _ChunkedLinearCrossEntropy.apply(x_tH, weight_VH, labels_T, vocab_start, vocab_size, tp_group,
                                            chunk_tokens)


_CCE: bool | None = None


def _cce_available() -> bool:
    """Apple's cut-cross-entropy (the ``gpu`` extra), probed once; CPU runs never look."""
    global _CCE
    if _CCE is None:
        import importlib.util
        import os

        _CCE = (os.environ.get("MESHTRON_CCE", "1") != "0"
                and importlib.util.find_spec("cut_cross_entropy") is not None)
    return _CCE
