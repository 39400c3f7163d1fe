"""Tokenized documents, in memory or memory-mapped: what the pretrain stream and the tokenized
SFT packer read.

A store holds documents as token ids with an optional *target mask* aligned with the ids:
``targets[t]`` says whether token ``t`` is predicted with a loss (transformers' ``labels[t] !=
-100``). The engine shifts inside each document (I-2): position ``t`` predicts token ``t+1``
when ``targets[t+1]`` holds. ``None`` means every token is a target (pretraining text).

  MemoryStore   documents read from records (tokenized JSONL/parquet, an HF ``save_to_disk``
                directory, text tokenized at start), concatenated into flat numpy arrays.
  IndexedStore  a Megatron ``.bin``/``.idx`` prefix (engine/data/indexed.py), memory-mapped;
                an optional companion prefix holds the target mask as uint8 documents.
"""
from __future__ import annotations

import numpy as np

from engine.data.records import DataError


class TokenStore:
    """``num_documents``, ``lengths`` (int64 per document), ``tokens(d, lo, hi)`` and
    ``targets(d, lo, hi)`` (bool array, or None: every token a target); ``name`` for errors."""

    name = "documents"
    lengths: np.ndarray
    has_targets = False

    @property
    def num_documents(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def tokens(self, d: int, lo: int = 0, hi: int | None = None) -> np.ndarray:
        raise NotImplementedError

    def targets(self, d: int, lo: int = 0, hi: int | None = None) -> np.ndarray | None:
        return None

    def valid_counts(self) -> np.ndarray:
        """Loss tokens of each document as an SFT document (targets after its first token)."""
        if not self.has_targets:
            return self.lengths - 1
        return np.fromiter((int(self.targets(d)[1:].sum()) for d in range(self.num_documents)),
                           dtype=np.int64, count=self.num_documents)


def _valid_from_flat(flat_targets: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Per-document targets after the first token, from a flat mask and document starts."""
    sums = np.add.reduceat(flat_targets, starts, dtype=np.int64) if len(starts) else np.zeros(0, np.int64)
    return sums - flat_targets[starts].astype(np.int64)


class MemoryStore(TokenStore):
    """Documents as one flat int64 token array, a bool target array (when any document has a
    mask) and int64 offsets."""

    def __init__(self, documents: list[tuple[list[int], list[bool] | None]], name: str = "documents"):
        self.name = name
        lengths = np.fromiter((len(ids) for ids, _ in documents), dtype=np.int64, count=len(documents))
        self.offsets = np.zeros(len(documents) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.offsets[1:])
        self.lengths = lengths
        self._tokens = np.fromiter((t for ids, _ in documents for t in ids), dtype=np.int64,
                                   count=int(self.offsets[-1]))
        self.has_targets = any(m is not None for _, m in documents)
        self._targets = None
        if self.has_targets:
            self._targets = np.fromiter((bool(x) for ids, m in documents for x in (m if m is not None else
                                                                                  [True] * len(ids))),
                                        dtype=bool, count=int(self.offsets[-1]))

    def valid_counts(self) -> np.ndarray:
        if self._targets is None:
            return self.lengths - 1
        return _valid_from_flat(self._targets, self.offsets[:-1])

    def tokens(self, d, lo=0, hi=None):
        base = int(self.offsets[d])
        return self._tokens[base + lo: base + (self.lengths[d] if hi is None else hi)]

    def targets(self, d, lo=0, hi=None):
        if self._targets is None:
            return None
        base = int(self.offsets[d])
        return self._targets[base + lo: base + (self.lengths[d] if hi is None else hi)]


class IndexedStore(TokenStore):
    """A Megatron indexed dataset (by prefix), memory-mapped; ``mask_prefix``: a companion uint8
    indexed dataset of the same document lengths holding the target mask."""

    def __init__(self, prefix: str, mask_prefix: str | None = None):
        from engine.data.indexed import IndexedTokens

        self.name = prefix
        try:
            self.data = IndexedTokens(prefix)
        except ValueError as e:  # a damaged or foreign file: its message names it
            raise DataError(str(e)) from None
        self.starts, ends = self.data.document_bounds()
        self.lengths = (ends - self.starts).astype(np.int64)
        self.mask = None
        if mask_prefix is not None:
            try:
                self.mask = IndexedTokens(mask_prefix)
            except ValueError as e:
                raise DataError(str(e)) from None
            m_starts, m_ends = self.mask.document_bounds()
            if not np.array_equal(m_ends - m_starts, self.lengths):
                raise DataError(f"{mask_prefix}.idx: its documents' lengths differ from {prefix}.idx's; "
                                f"expected the loss mask of the same documents")
            self.mask_starts = m_starts
        self.has_targets = self.mask is not None

    def tokens(self, d, lo=0, hi=None):
        base = int(self.starts[d])
        return self.data.tokens(base + lo, base + int(self.lengths[d] if hi is None else hi))

    def targets(self, d, lo=0, hi=None):
        if self.mask is None:
            return None
        base = int(self.mask_starts[d])
        return self.mask.tokens(base + lo, base + int(self.lengths[d] if hi is None else hi)).astype(bool)

    def valid_counts(self) -> np.ndarray:
        if self.mask is None:
            return self.lengths - 1
        return _valid_from_flat(self.mask.tokens(0, self.mask.num_tokens), self.mask_starts)

    def check_vocab(self, vocab_size: int) -> None:
        """One error naming the file and the document when a token id is >= ``vocab_size``."""
        if np.iinfo(self.data.dtype).max < vocab_size:
            return  # the file's dtype cannot hold such an id
        bad = self.data.first_token_at_least(vocab_size)
        if bad is not None:
            doc, token = bad
            raise DataError(f"{self.name}.bin: token id {token} in document {doc} is >= model.vocab_size="
                            f"{vocab_size}; was the corpus tokenized with another tokenizer?")


def check_document_ids(ids, vocab_size: int, where: str) -> None:
    """A record's token ids: integers in [0, vocab_size)."""
    if not ids:
        raise DataError(f"{where}: empty input_ids; expected at least one token")
    lo, hi = min(ids), max(ids)
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise DataError(f"{where}: token id {bad} is outside [0, model.vocab_size={vocab_size}); was the data "
                        f"tokenized with another tokenizer?")
