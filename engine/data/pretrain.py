"""Pretraining sequences: a token stream cut into ``seq_len`` sequences (``recipe: pretrain``).

The stream is every document of the store, in an order shuffled per epoch (seeded), epochs back
to back, so no token is ever dropped. Sequence ``k`` holds stream tokens ``[kS, kS+S)`` and their
next tokens ``[kS+1, kS+S+1)`` as labels — Megatron's GPTDataset samples of S+1 tokens, so the
token after a sequence's last is its label, never lost at a cut.

Document boundaries (``cross_document_attention: false``, the default): every piece of a
document in a sequence is its own ``cu_seqlens`` segment with positions from 0 and no label
across a document's end (I-2, I-4) — Megatron's ``--reset-attention-mask --reset-position-ids``
with ``--eod-mask-loss``'s effect on the token after a document. With ``true``: plain
concatenation, one causal segment of S tokens, every token labelled with the stream's next.

A sequence is a pure function of ``(seed, k)``: every mesh and every restart reads the same
global batch, and the data position of a resume is the step itself.
"""
from __future__ import annotations

import numpy as np
import torch

from engine.data.packing import PackedBatch
from engine.data.store import TokenStore
from engine.loss import IGNORE_INDEX


class PretrainSequences:
    """Sequences of exactly ``seq_len`` tokens from the stream of ``store``'s documents."""

    def __init__(self, store: TokenStore, seq_len: int, seed: int, cross_document_attention: bool = False):
        if store.num_tokens < 2:
            raise ValueError(f"{store.name}: {store.num_tokens} tokens; a pretraining stream needs at least 2")
        self.store, self.seq_len, self.seed = store, seq_len, seed
        self.cross = cross_document_attention
        self.tokens_per_epoch = store.num_tokens
        self.sequences_per_epoch = max(1, self.tokens_per_epoch // seq_len)
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, cumulative token offsets in that order) of epoch ``e``, cached."""
        if e not in self._epochs:
            if len(self._epochs) >= 2:  # a sequence spans at most two epochs
                self._epochs.pop(min(self._epochs))
            rng = np.random.Generator(np.random.PCG64([self.seed, e]))
            order = rng.permutation(self.store.num_documents)
            cum = np.zeros(len(order) + 1, dtype=np.int64)
            np.cumsum(self.store.lengths[order], out=cum[1:])
            self._epochs[e] = (order, cum)
        return self._epochs[e]

    def pieces(self, start: int, count: int) -> list[tuple[int, int, int]]:
        """``(document, lo, hi)`` pieces of stream tokens ``[start, start + count)``."""
        out, p, end = [], start, start + count
        while p < end:
            e, q = divmod(p, self.tokens_per_epoch)
            order, cum = self._epoch(e)
            j = int(np.searchsorted(cum, q, side="right")) - 1
            d, lo = int(order[j]), int(q - cum[j])
            hi = min(int(self.store.lengths[d]), lo + end - p)
            out.append((d, lo, hi))
            p += hi - lo
        return out

    def _stream(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Stream tokens ``[start, start + count)`` and their target mask (None: all targets)."""
        pcs = self.pieces(start, count)
        toks = np.concatenate([self.store.tokens(d, lo, hi) for d, lo, hi in pcs]).astype(np.int64)
        if not self.store.has_targets:
            return toks, None
        return toks, np.concatenate([self.store.targets(d, lo, hi) for d, lo, hi in pcs])

    def sequence(self, index: int) -> PackedBatch:
        S = self.seq_len
        if self.cross:
            toks, targets = self._stream(index * S, S + 1)
            labels = toks[1:].copy()
            if targets is not None:
                labels[~targets[1:]] = IGNORE_INDEX
            return PackedBatch(torch.from_numpy(toks[:-1].copy()), torch.from_numpy(labels),
                               torch.arange(S), torch.tensor([0, S], dtype=torch.int32))
        toks, labels, pos, lens = [], [], [], []
        for d, lo, hi in self.pieces(index * S, S):
            n = hi - lo
            nxt_hi = min(hi + 1, int(self.store.lengths[d]))  # the next token, unless the document ends
            nxt = self.store.tokens(d, lo + 1, nxt_hi).astype(np.int64)
            lab = np.full(n, IGNORE_INDEX, dtype=np.int64)
            lab[:len(nxt)] = nxt
            tg = self.store.targets(d, lo + 1, nxt_hi)
            if tg is not None:
                lab[:len(nxt)][~tg] = IGNORE_INDEX
            toks.append(self.store.tokens(d, lo, hi).astype(np.int64))
            labels.append(lab)
            pos.append(np.arange(n))
            lens.append(n)
        cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.as_tensor(lens), 0)
        return PackedBatch(torch.from_numpy(np.concatenate(toks)), torch.from_numpy(np.concatenate(labels)),
                           torch.from_numpy(np.concatenate(pos)), cu)

    def valid_tokens(self, index: int) -> int:
        """Loss tokens of sequence ``index`` (from the document lengths alone when the store has
        no mask: S minus the documents ending inside the sequence)."""
        S = self.seq_len
        if self.store.has_targets:
            return int(self.sequence(index).num_valid)
        if self.cross:
            return S
        return S - sum(int(hi == self.store.lengths[d]) for d, _, hi in self.pieces(index * S, S))

    def length(self, index: int) -> int:
        return self.seq_len


class BlendedSequences:
    """Megatron's blend of several datasets (``data.path: [w1, prefix1, w2, prefix2, ...]``):
    sequence ``i`` is the next unused sequence of the dataset whose share of the first i+1
    sequences lags its weight the most (megatron-core's ``build_blending_indices``)."""

    def __init__(self, datasets: list, weights: list[float]):
        self.datasets, self.weights = datasets, weights
        self.seq_len = datasets[0].seq_len
        self.sequences_per_epoch = sum(d.sequences_per_epoch for d in datasets)
        self._which = np.zeros(0, dtype=np.int64)
        self._sample = np.zeros(0, dtype=np.int64)

    def _locate(self, index: int) -> tuple[int, int]:
        if index >= len(self._which):  # grow the blending indices (doubling) up to ``index``
            from engine.data.blend import blend_indices

            n = max(index + 1, 2 * len(self._which), 1024)
            which, sample = blend_indices(self.weights, n)
            self._which, self._sample = np.asarray(which, dtype=np.int64), np.asarray(sample, dtype=np.int64)
        return int(self._which[index]), int(self._sample[index])

    def sequence(self, index: int) -> PackedBatch:
        d, k = self._locate(index)
        return self.datasets[d].sequence(k)

    def valid_tokens(self, index: int) -> int:
        d, k = self._locate(index)
        return self.datasets[d].valid_tokens(k)

    def length(self, index: int) -> int:
        return self.seq_len
