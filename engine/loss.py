"""Vocab-parallel cross-entropy and the global-token normalisation of I-5.

The logits of a micro-batch are split over tp along the vocabulary: ``logits_TV [T, V/tp]``.
The softmax max, the normaliser and the target logit are reduced over the tp group, so no rank
ever holds the full ``[T, V]``. Vocabulary padding rows (ids >= the real vocab size) are masked out
of the softmax, so the loss does not depend on the padding, i.e. on tp.
"""
from __future__ import annotations

import torch

from engine.fused_loss import IGNORE_INDEX, linear_cross_entropy
from engine.parallel.comm import all_reduce_, all_reduce_max_


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, vocab_start, vocab_size, group):
        # one fp32 working tensor [T, V/tp] beside the logits: the fp32 copy of bf16 logits (or a
        # clone of fp32 ones) is shifted and exponentiated in place and becomes the saved softmax
        x = logits.float()
        private = x is not logits  # bf16 logits: x is a copy, ours to change in place
        real = vocab_size - vocab_start  # real ids in this slice (may be <= 0 or > local_vocab)
        local_vocab = x.shape[-1]
        if real < local_vocab:
            x = x if private else x.clone()
            private = True
            x[:, max(real, 0):] = float("-inf")
        shift = x.amax(-1).clamp_min(torch.finfo(torch.float32).min)
        all_reduce_max_(shift, group)

        local_ids = labels - vocab_start
        here = (local_ids >= 0) & (local_ids < local_vocab)
        safe_ids = local_ids.clamp(0, local_vocab - 1)
        target = torch.where(here, x.gather(-1, safe_ids[:, None]).squeeze(-1) - shift, 0.0)
        all_reduce_(target, group)
        exp = (x.sub_(shift[:, None]) if private else x - shift[:, None]).exp_()
        del x
        sum_exp = all_reduce_(exp.sum(-1), group)

        valid = labels != IGNORE_INDEX
        loss = torch.where(valid, torch.log(sum_exp) - target, 0.0)
        softmax = exp.div_(sum_exp[:, None])
        ctx.save_for_backward(softmax, safe_ids, here & valid, valid)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, safe_ids, hit, valid = ctx.saved_tensors
        grad = softmax
        # the target's -1, on this rank's slice only (a scatter on the logits' device: no index
        # tensor from the host, no sync)
        grad.scatter_add_(-1, safe_ids[:, None], hit.float().neg_()[:, None])
        grad.mul_((grad_loss * valid)[:, None])
        return grad.to(ctx.logits_dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits_TV: torch.Tensor, labels_T: torch.Tensor, vocab_start: int,
                                 vocab_size: int, tp_group) -> torch.Tensor:
    """Per-token losses ``[T]`` (fp32, 0 where the label is ``IGNORE_INDEX``), identical on every tp
    rank; the gradient flows to this rank's logits slice only."""
    return _VocabParallelCrossEntropy.apply(logits_TV, labels_T, vocab_start, vocab_size, tp_group)


def head_losses(model, x_tH: torch.Tensor, labels_T: torch.Tensor) -> torch.Tensor:
    """Per-token losses ``[T]`` of the output layer and cross-entropy applied to the final hidden
    states of the last stage (``model.final_hidden``): fused and chunked
    (engine/fused_loss.py) unless ``model.loss_chunk_tokens`` is 0, then whole logits."""
    group = model.mesh.group("tp")
    if model.loss_chunk_tokens > 0:
        return linear_cross_entropy(x_tH, model.output_weight, labels_T, model.vocab_start, model.cfg.vocab_size,
                                    group, model.loss_chunk_tokens)
    return vocab_parallel_cross_entropy(model.logits(x_tH), labels_T, model.vocab_start, model.cfg.vocab_size, group)


def token_loss_sum(model, batch, hidden=None) -> torch.Tensor:
    """Sum of token cross-entropies of one micro-batch on this rank (the numerator of I-5);
    ``hidden`` is the previous pipeline stage's output when the model is a later stage."""
    return model.token_losses(batch, hidden).sum()
