"""SFT and preference datasets over record files, read lazily.

A first streaming pass validates and tokenises every record once and keeps only its location
and token length (memory O(records), not O(tokens)). Later a sequence or a pair re-reads and
re-tokenises just the records it needs, so every rank can build the same global batch from
``(seed, index)`` alone, like ``SyntheticSequences``.

Packing (SFT): each epoch packs all records into bins of ``cutoff_len`` tokens by first-fit
*decreasing* length, with records of equal length taken in the epoch's shuffled order, and then
shuffles the bins. Packing in plain shuffled order would give a different number of bins each
epoch; decreasing order makes the bin loads depend only on the multiset of lengths, so
``sequences_per_epoch`` is one constant, padding is minimal, and the per-epoch shuffle still
changes which records share a bin (among equal lengths) and the order of the bins. Packed
documents never attend to each other (I-4), so bin composition does not change the gradient.
"""
from __future__ import annotations

import os
import zipfile
from array import array
from collections import Counter

import numpy as np
import torch

from engine.data.chat import encode_preference, encode_sft, loss_mask_from_response
from engine.data.packing import PackedBatch, document_arrays, pack
from engine.data.records import (
    DataError,
    Location,
    RecordError,
    RecordSource,
    iter_samples,
    to_conversation,
    to_preference,
)

try:
    from jinja2.exceptions import TemplateError
except ImportError:  # pragma: no cover - transformers needs jinja2 for chat templates
    TemplateError = RecordError


def _generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit of items (in the given order) into bins of ``capacity``; returns item positions
    per bin. A max-tree over the bins' free space finds the leftmost fitting bin in O(log n)."""
    size = 1
    while size < max(1, len(lengths)):
        size *= 2
    free = [capacity] * (2 * size)
    bins: list[list[int]] = []
    for pos, n in enumerate(lengths):
        assert 0 < n <= capacity, (n, capacity)
        node = 1
        while node < size:
            node = 2 * node if free[2 * node] >= n else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(pos)
        free[node] -= n
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return bins


class _RecordIndex:
    """The first pass shared by both datasets: locations (and lengths) of usable records."""

    def __init__(self, kind, paths, tokenizer, cutoff_len, seed, format, skip_bad_records, overflow):
        if cutoff_len < 2:
            raise ValueError(f"cutoff_len={cutoff_len} is too small; use at least 2 tokens")
        self.kind, self.tokenizer, self.cutoff_len, self.seed = kind, tokenizer, cutoff_len, seed
        self.overflow, self.format = overflow, format
        self.source = RecordSource(paths, skip_bad_records)
        self.counts: Counter = Counter()
        self._file, self._offset, self._line, self.lengths = array("i"), array("q"), array("q"), array("i")
        self.valid = array("i")  # SFT: loss tokens per record (each step's global count, on the host)
        for loc, sample in iter_samples(self.source, kind, format):
            enc = self._encode(loc, sample, self.counts)
            if enc is None:
                continue
            self._file.append(loc.file)
            self._offset.append(loc.offset)
            self._line.append(loc.line)
            self.lengths.append(len(enc[0]) if kind == "sft" else len(enc[0]) + max(map(len, enc[1:])))
            if kind == "sft":  # document_arrays: a label where the mask is set, never on the last token
                self.valid.append(sum(enc[1][:-1]))
        if not self.lengths:
            raise DataError(f"no usable records in {self.source.files} (stats: {self.stats})")

    @property
    def num_records(self) -> int:
        return len(self.lengths)

    @property
    def stats(self) -> dict:
        return {"records": len(self.lengths), "skipped": self.source.num_skipped,
                "truncated": self.counts["truncated"], "dropped": self.counts["dropped"]}

    def _encode(self, loc: Location, sample: dict, counts):
        where = self.source.where(loc)
        try:
            if self.kind == "sft":
                return encode_sft(self.tokenizer, sample["messages"], self.cutoff_len, self.overflow, counts, where)
            return encode_preference(self.tokenizer, sample["prompt"], sample["chosen"], sample["rejected"],
                                     self.cutoff_len, self.overflow, counts, where)
        except (RecordError, TemplateError) as e:
            if counts is None:
                raise DataError(f"{where}: {e}") from None
            self.source.bad(loc, e)
            return None

    def load(self, records: list[int]) -> list:
        """Re-read and re-tokenise records by index (the first pass's encodings)."""
        locs = [Location(self._file[r], self._offset[r], self._line[r]) for r in records]
        norm = to_conversation if self.kind == "sft" else to_preference
        out = []
        for loc, rec in zip(locs, self.source.read(locs)):
            try:
                enc = self._encode(loc, norm(rec, self.format), None)
            except (RecordError, ValueError) as e:
                raise DataError(f"{self.source.where(loc)}: {e}; did the file change since the first pass?") from None
            if enc is None:
                raise DataError(f"{self.source.where(loc)}: record no longer fits; did the file change?")
            out.append(enc)
        return out


class _Packed:
    """Sequences of packed documents, from the documents' ``lengths``, loss-token counts
    ``valid`` and ``load(records) -> [(ids, loss_mask)]`` (``document_arrays``' mask)."""

    seed: int
    cutoff_len: int
    pack: bool
    bins_dir: str | None = None  # where the data cache keeps each epoch's bins (first fit of 1M records: ~10 s)

    def _init_packing(self, pack: bool) -> None:
        self.pack = pack
        self._epoch: tuple[int, list[list[int]]] | None = None
        self.sequences_per_epoch = len(self.bins(0))

    def bins(self, epoch: int) -> list[list[int]]:
        """Record indices of each sequence of ``epoch``, in sequence order (cached per epoch, and
        on disk beside the data cache when it has one)."""
        if self._epoch is None or self._epoch[0] != epoch:
            saved = self._saved_bins(epoch)
            if saved is not None:
                self._epoch = (epoch, saved)
                return saved
            self._epoch = (epoch, self._compute_bins(epoch))
            self._save_bins(epoch, self._epoch[1])
        return self._epoch[1]

    def _bins_file(self, epoch: int) -> str | None:
        if self.bins_dir is None:
            return None
        return os.path.join(self.bins_dir, f"bins-len{self.cutoff_len}-seed{self.seed}-pack{int(self.pack)}-e{epoch}.npz")

    def _saved_bins(self, epoch: int) -> list[list[int]] | None:
        path = self._bins_file(epoch)
        try:
            with np.load(path) as z:
                flat, offsets = z["records"], z["offsets"]
        except (TypeError, OSError, ValueError, KeyError, zipfile.BadZipFile):  # none yet, or damaged: recompute
            return None
        if len(flat) != self.num_records or offsets[-1] != len(flat):
            return None
        return [flat[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]

    def _save_bins(self, epoch: int, bins: list[list[int]]) -> None:
        path = self._bins_file(epoch)
        if path is None:
            return
        offsets = np.cumsum([0] + [len(b) for b in bins])
        tmp = f"{path}.{os.getpid()}.tmp.npz"
        try:
            np.savez(tmp, records=np.fromiter((r for b in bins for r in b), np.int64, int(offsets[-1])),
                     offsets=offsets)
            os.replace(tmp, path)  # ranks write the same bytes; the last rename wins
        except OSError:
            pass  # a read-only cache: recompute next time

    def _compute_bins(self, epoch: int) -> list[list[int]]:
        gen = _generator(self.seed, epoch)
        perm = torch.randperm(self.num_records, generator=gen)
        if not self.pack:
            return [[r] for r in perm.tolist()]
        lengths = torch.as_tensor(np.asarray(self.lengths, dtype=np.int64))
        order = perm[torch.argsort(-lengths[perm], stable=True)].tolist()
        rank = torch.empty_like(perm)
        rank[perm] = torch.arange(self.num_records)
        rank = rank.tolist()
        bins = [sorted((order[p] for p in b), key=rank.__getitem__)
                for b in first_fit([int(self.lengths[r]) for r in order], self.cutoff_len)]
        return [bins[k] for k in torch.randperm(len(bins), generator=gen).tolist()]

    def sequence(self, index: int) -> PackedBatch:
        epoch, k = divmod(index, self.sequences_per_epoch)
        bins = self.bins(epoch)
        assert len(bins) == self.sequences_per_epoch  # FFD bin count depends only on the lengths
        docs = [document_arrays(ids, mask)[:2] for ids, mask in self.load(bins[k])]
        return pack(docs, pad_to=self.cutoff_len if self.pack else None)

    def valid_tokens(self, index: int) -> int:
        """Loss tokens of sequence ``index`` without reading it (padding carries none)."""
        epoch, k = divmod(index, self.sequences_per_epoch)
        return sum(int(self.valid[r]) for r in self.bins(epoch)[k])

    def length(self, index: int) -> int:
        """Tokens of sequence ``index`` without reading it."""
        if self.pack:
            return self.cutoff_len
        epoch, k = divmod(index, self.sequences_per_epoch)
        return sum(int(self.lengths[r]) for r in self.bins(epoch)[k])


class SFTDataset(_RecordIndex, _Packed):
    """Packed SFT sequences of exactly ``cutoff_len`` tokens; ``sequence(i)`` for global index i.
    With ``pack=False`` every sequence is one record (shuffled per epoch), unpadded."""

    def __init__(self, paths, tokenizer, cutoff_len: int, seed: int, format: str = "auto",
                 skip_bad_records: bool = False, overflow: str = "error", pack: bool = True):
        super().__init__("sft", paths, tokenizer, cutoff_len, seed, format, skip_bad_records, overflow)
        self._init_packing(pack)


class TokenizedSFTDataset(_Packed):
    """SFT over already tokenized documents (a :class:`~engine.data.store.TokenStore` whose target
    mask says which tokens carry a loss; none: every token), packed as :class:`SFTDataset` packs."""

    def __init__(self, store, cutoff_len: int, seed: int, pack: bool = True, bins_dir: str | None = None):
        self.store, self.cutoff_len, self.seed, self.bins_dir = store, cutoff_len, seed, bins_dir
        self.lengths = store.lengths
        self.num_records = store.num_documents
        longest = int(self.lengths.max())
        assert longest <= cutoff_len, (longest, cutoff_len)  # the reader applied data.overflow
        self.valid = store.valid_counts()
        self._init_packing(pack)

    def load(self, records: list[int]) -> list:
        out = []
        for d in records:
            ids = self.store.tokens(d).tolist()
            targets = self.store.targets(d)
            mask = None if targets is None else list(targets[1:]) + [False]
            out.append((ids, mask))
        return out


class PreferenceDataset(_RecordIndex):
    """Preference pairs; ``pair(i) -> (chosen_doc, rejected_doc)``, each ``(tokens, labels)`` with
    loss on the response only; examples are shuffled per epoch."""

    def __init__(self, paths, tokenizer, cutoff_len: int, seed: int, format: str = "auto",
                 skip_bad_records: bool = False, overflow: str = "error"):
        super().__init__("preference", paths, tokenizer, cutoff_len, seed, format, skip_bad_records, overflow)
        self.pairs_per_epoch = self.num_records
        self._perm: tuple[int, list[int]] | None = None

    def order(self, epoch: int) -> list[int]:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, torch.randperm(self.num_records, generator=_generator(self.seed, epoch)).tolist())
        return self._perm[1]

    def pair(self, index: int):
        epoch, k = divmod(index, self.pairs_per_epoch)
        (prompt, chosen, rejected), = self.load([self.order(epoch)[k]])
        return tuple(document_arrays(prompt + r, loss_mask_from_response([False] * len(prompt) + [True] * len(r)))[:2]
                     for r in (chosen, rejected))


class CachedPreferenceDataset(PreferenceDataset):
    """:class:`PreferenceDataset` over the encoded records of the data cache (engine/data/cache.py):
    the same pairs in the same order, read from memory-mapped prompt/chosen/rejected ids."""

    def __init__(self, records, seed: int):
        self.stores, self.seed, self._stats = records.stores, seed, records.stats
        prompt, chosen, rejected = (self.stores[f].lengths for f in ("prompt", "chosen", "rejected"))
        self.lengths = prompt + np.maximum(chosen, rejected)
        self.pairs_per_epoch = self.num_records
        self._perm = None

    @property
    def num_records(self) -> int:
        return len(self.lengths)

    @property
    def stats(self) -> dict:
        return self._stats

    def load(self, records: list[int]) -> list:
        return [tuple(self.stores[f].tokens(r).tolist() for f in ("prompt", "chosen", "rejected")) for r in records]
