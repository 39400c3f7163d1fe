"""Packed micro-batches in THD layout (documents back to back, no batch dimension).

I-2: labels are shifted before any split, inside each document: ``label[t] = token[t+1]``; the
last token of every document, padding and masked (prompt) tokens get ``IGNORE_INDEX``.
I-4: ``cu_seqlens`` marks document boundaries so packed documents never attend to each other.
Padding is a document of its own (it attends only to itself and carries no loss).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from engine.loss import IGNORE_INDEX


@dataclass
class PackedBatch:
    """One micro-batch: ``tokens``, ``labels``, ``position_ids`` are ``[T]`` int64; ``cu_seqlens``
    int32 ``[num_docs + 1]`` (padding segments count as documents)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()

    @property
    def num_valid(self) -> int:
        """Tokens that carry a loss (the denominator's contribution, I-5)."""
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def doc_lens(self) -> list[int]:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()

    def to(self, device) -> "PackedBatch":
        return PackedBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def document_arrays(tokens: list[int], loss_mask: list[bool] | None = None):
    """Labels and positions of one document (I-2). ``loss_mask[t]`` says whether predicting
    ``tokens[t+1]`` from position t counts (False for prompt tokens in SFT)."""
    toks = torch.as_tensor(tokens, dtype=torch.long)
    labels = torch.full_like(toks, IGNORE_INDEX)
    labels[:-1] = toks[1:]
    if loss_mask is not None:
        mask = torch.as_tensor(loss_mask, dtype=torch.bool)
        labels[:-1] = torch.where(mask[:-1], labels[:-1], IGNORE_INDEX)
    return toks, labels, torch.arange(len(toks))


def pack(documents: list[tuple[torch.Tensor, torch.Tensor]], pad_to: int | None = None) -> PackedBatch:
    """Pack ``(tokens, labels)`` documents; pad at the end to ``pad_to`` tokens when given."""
    toks, labels, pos, lens = [], [], [], []
    for t, l in documents:
        toks.append(t)
        labels.append(l)
        pos.append(torch.arange(len(t)))
        lens.append(len(t))
    total = sum(lens)
    if pad_to is not None:
        if total > pad_to:
            raise ValueError(f"documents of {total} tokens do not fit a sequence of {pad_to}")
        if total < pad_to:
            n = pad_to - total
            toks.append(torch.zeros(n, dtype=torch.long))
            labels.append(torch.full((n,), IGNORE_INDEX, dtype=torch.long))
            pos.append(torch.arange(n))
            lens.append(n)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.as_tensor(lens), 0)
    return PackedBatch(torch.cat(toks), torch.cat(labels), torch.cat(pos), cu)


def concat(batches: list[PackedBatch]) -> PackedBatch:
    """Several packed sequences as one micro-batch (any number of sequences per micro-batch)."""
    if len(batches) == 1:
        return batches[0]
    offsets = torch.cumsum(torch.as_tensor([0] + [b.num_tokens for b in batches[:-1]]), 0)
    cu = torch.cat([batches[0].cu_seqlens[:1]] + [b.cu_seqlens[1:] + o for b, o in zip(batches, offsets)])
    return PackedBatch(torch.cat([b.tokens for b in batches]), torch.cat([b.labels for b in batches]),
                       torch.cat([b.position_ids for b in batches]), cu.to(torch.int32))
