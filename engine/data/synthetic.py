"""Generated training data: packed sequences of noisy arithmetic progressions.

Every document is ``a, a+b, a+2b, … (mod vocab)`` with a few tokens replaced at random, so a
tiny model learns it within steps (the loss visibly falls) but never to zero. Sequence ``i`` is a
pure function of ``(seed, i)``: every mesh and every restart sees the same global batch.
"""
from __future__ import annotations

import torch

from engine.data.packing import PackedBatch, document_arrays, pack


class SyntheticSequences:
    """Packed sequences of exactly ``seq_len`` tokens (documents plus end padding)."""

    def __init__(self, vocab_size: int, seq_len: int, min_doc_len: int, max_doc_len: int, seed: int,
                 noise: float = 0.1):
        self.vocab_size, self.seq_len = vocab_size, seq_len
        self.min_doc_len, self.max_doc_len = min_doc_len, max_doc_len
        self.seed, self.noise = seed, noise

    def sequence(self, index: int) -> PackedBatch:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        docs, used = [], 0
        while self.seq_len - used >= self.min_doc_len:
            hi = min(self.max_doc_len, self.seq_len - used)
            n = int(torch.randint(self.min_doc_len, hi + 1, (1,), generator=gen))
            docs.append(document_arrays(self._document(n, gen).tolist())[:2])
            used += n
        return pack(docs, pad_to=self.seq_len)

    def valid_tokens(self, index: int) -> int:
        """Loss tokens of sequence ``index`` (each document's tokens but its last; padding none),
        drawing its documents as :meth:`sequence` does without packing them (about half the cost)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        used = docs = 0
        while self.seq_len - used >= self.min_doc_len:
            hi = min(self.max_doc_len, self.seq_len - used)
            n = int(torch.randint(self.min_doc_len, hi + 1, (1,), generator=gen))
            self._document(n, gen)  # the same draws, so the next length is the same
            used, docs = used + n, docs + 1
        return used - docs

    def _document(self, n: int, gen: torch.Generator) -> torch.Tensor:
        v = self.vocab_size - 1  # id 0 is reserved for padding
        start = torch.randint(0, v, (1,), generator=gen)
        step = torch.randint(1, 8, (1,), generator=gen)
        toks = (start + step * torch.arange(n)) % v + 1
        flip = torch.rand(n, generator=gen) < self.noise
        return torch.where(flip, torch.randint(1, v + 1, (n,), generator=gen), toks)


class SyntheticDocuments(SyntheticSequences):
    """Unpacked sequences (``data.pack: false``): sequence ``i`` is one document whose length has a
    long tail between ``min_doc_len`` and ``max_doc_len``: ``min · (max/min)^(u³)`` for u uniform,
    so the median is ``min · (max/min)^(1/8)`` while a few sequences reach ``max`` (over two
    orders of magnitude the median is ~1.8·min and 10 % of the sequences are longer than
    ~0.03·max yet hold most of the tokens) — the shape FlexSP is for."""

    def __init__(self, vocab_size: int, min_doc_len: int, max_doc_len: int, seed: int, noise: float = 0.1):
        super().__init__(vocab_size, max_doc_len, min_doc_len, max_doc_len, seed, noise)

    def length(self, index: int) -> int:
        return self._length(torch.Generator().manual_seed(self.seed * 1_000_003 + index))

    def valid_tokens(self, index: int) -> int:
        """Loss tokens of sequence ``index`` (every token but the document's last)."""
        return self.length(index) - 1

    def _length(self, gen: torch.Generator) -> int:
        u = float(torch.rand((), generator=gen, dtype=torch.float64))
        ratio = self.max_doc_len / self.min_doc_len
        return min(self.max_doc_len, max(self.min_doc_len, round(self.min_doc_len * ratio ** (u ** 3))))

    def sequence(self, index: int) -> PackedBatch:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        n = self._length(gen)
        return pack([document_arrays(self._document(n, gen).tolist())[:2]])
