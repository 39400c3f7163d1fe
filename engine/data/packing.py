"""Packed micro-batches in THD layout (documents back to back, no batch dimension).

I-2: labels are shifted before any split, inside each document: ``label[t] = token[t+1]``; the
last token of every document, padding and masked (prompt) tokens get ``IGNORE_INDEX``.
I-4: ``cu_seqlens`` marks document boundaries so packed documents never attend to each other.
Padding is a document of its own (it attends only to itself and carries no loss).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from engine.loss import IGNORE_INDEX


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` on ``device`` without blocking the host (I-9): a host tensor bound for a real CUDA
    device is pinned first, so the copy is truly asynchronous (a pageable copy makes the host
    wait). ``pin_memory`` needs a CUDA runtime, so a fake ``cuda`` device (the simulator's
    FakeTensorMode) just gets ``non_blocking=True``. A pinned source stays valid until the copy
    has run: the caching host allocator reuses it only after the copy's stream passed it."""
    device = torch.device(device)
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu" and torch.cuda.is_available():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def max_doc_len(cu_seqlens: torch.Tensor) -> int:
    """Longest document of a host ``cu_seqlens`` (0 for none): what the flash kernels need as
    ``max_seqlen``, known on the host when the batch is built."""
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0


@dataclass
class PackedBatch:
    """One micro-batch: ``tokens``, ``labels``, ``position_ids`` are ``[T]`` int64; ``cu_seqlens``
    int32 ``[num_docs + 1]`` (padding segments count as documents).

    Host-side facts travel as Python ints so the step never reads a device tensor (I-9):
    ``max_seqlen`` is the longest document of ``cu_seqlens`` and ``num_valid`` the tokens that
    carry a loss (the denominator's contribution, I-5). Both are computed from the tensors when
    the batch is built on the host (outside FakeTensorMode) and are carried by :meth:`to`; a
    batch built from device tensors must be given them (None: unknown)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int | None = None
    num_valid: int | None = None

    def __post_init__(self):
        if self.max_seqlen is None and self.cu_seqlens.device.type == "cpu":
            self.max_seqlen = max_doc_len(self.cu_seqlens)
        if self.num_valid is None and self.labels.device.type == "cpu":
            self.num_valid = int((self.labels != IGNORE_INDEX).sum())

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()

    @property
    def doc_lens(self) -> list[int]:
        """Document lengths (host batches only: reads ``cu_seqlens``)."""
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()

    def to(self, device) -> "PackedBatch":
        """The batch on ``device`` (tensor fields copied asynchronously, :func:`to_device`; every
        other field as it is). Subclasses whose fields are all tensors or plain values inherit it."""
        return replace(self, **{f.name: _moved(getattr(self, f.name), device) for f in fields(self)
                                if f.init})


def _moved(value, device):
    if torch.is_tensor(value):
        return to_device(value, device)
    mover = getattr(value, "to", None)
    return mover(device) if callable(mover) and hasattr(value, "__dataclass_fields__") else value


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


def valid_tokens(dataset, indices) -> int:
    """Loss tokens of the dataset's sequences ``indices``, counted on the host: the global
    denominator of a step (I-5) without a collective or a device read (I-9). Uses the dataset's
    ``valid_tokens(i)`` when it can tell without building the sequence."""
    count = getattr(dataset, "valid_tokens", None)
    return sum(count(i) if count else dataset.sequence(i).num_valid for i in indices)
