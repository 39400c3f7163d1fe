"""Apple's cut-cross-entropy (``pip install meshtron[gpu]``) behind the fused loss's contract.

:func:`engine.fused_loss.linear_cross_entropy` sends CUDA tensors here when the package is
installed: its Triton kernels compute the same per-token losses and gradients as the chunked torch
path (which stays the reference it is tested against, and the path of every CPU run) without
even a chunk of logits in global memory. Vocabulary parallelism: CCE's ``VocabParallelOptions``
takes this rank's contiguous vocabulary range and reduces the log-sum-exp and the target logit
over the tp group itself. The tokens are all-gathered over tp here with :func:`gather_along_dim`,
whose backward reduce-scatters the token gradient, so CCE must not also all-reduce it
(``reduce_e_grad=False``). Padded vocabulary rows are cut off the classifier (``stop`` is the last
real id), which masks them out of the softmax as the torch path does.
"""
from __future__ import annotations

import dataclasses

import torch

from engine.parallel.comm import gather_along_dim


def cce_linear_cross_entropy(x_tH: torch.Tensor, weight_VH: torch.Tensor, labels_T: torch.Tensor,
                             vocab_start: int, vocab_size: int, tp_group) -> torch.Tensor:
    from cut_cross_entropy import linear_cross_entropy
    from cut_cross_entropy.vocab_parallel import VocabParallelOptions

    real = min(weight_VH.shape[0], vocab_size - vocab_start)
    options = None
    if tp_group is not None and torch.distributed.get_world_size(tp_group) > 1:
        kwargs = dict(start=vocab_start, stop=vocab_start + real, group=tp_group)
        if "reduce_e_grad" in {f.name for f in dataclasses.fields(VocabParallelOptions)}:
            kwargs["reduce_e_grad"] = False
        options = VocabParallelOptions(**kwargs)
    x_TH = gather_along_dim(x_tH, 0, tp_group)
    return linear_cross_entropy(x_TH, weight_VH[:real], labels_T, reduction="none",
                                vocab_parallel_options=options).float()


def cce_usable(weight_VH: torch.Tensor, vocab_size: int, tp: int) -> bool:
    """Every tp rank holds at least one real vocabulary row (decided from global sizes, so all
    ranks agree and take the same path)."""
    return vocab_size > (tp - 1) * weight_VH.shape[0]
