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

from array import array
from collections import Counter

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


class SFTDataset(_RecordIndex):
    """Packed SFT sequences of exactly ``cutoff_len`` tokens; ``sequence(i)`` for global index i.
    With ``pack=False`` every sequence is one record (shuffled per epoch), unpadded."""

    def __init__(self, paths, tokenizer, cutoff_len: int, seed: int, format: str = "auto",
                 skip_bad_records: bool = False, overflow: str = "error", pack: bool = True):
        super().__init__("sft", paths, tokenizer, cutoff_len, seed, format, skip_bad_records, overflow)
        self.pack = pack
        self._epoch: tuple[int, list[list[int]]] | None = None
        self.sequences_per_epoch = len(self.bins(0))

    def bins(self, epoch: int) -> list[list[int]]:
        """Record indices of each sequence of ``epoch``, in sequence order (cached per epoch)."""
        if self._epoch is None or self._epoch[0] != epoch:
            gen = _generator(self.seed, epoch)
            perm = torch.randperm(self.num_records, generator=gen)
            if not self.pack:
                self._epoch = (epoch, [[r] for r in perm.tolist()])
                return self._epoch[1]
            lengths = torch.as_tensor(self.lengths, dtype=torch.long)
            order = perm[torch.argsort(-lengths[perm], stable=True)].tolist()
            rank = torch.empty_like(perm)
            rank[perm] = torch.arange(self.num_records)
            rank = rank.tolist()
            bins = [sorted((order[p] for p in b), key=rank.__getitem__)
                    for b in first_fit([self.lengths[r] for r in order], self.cutoff_len)]
            bins = [bins[k] for k in torch.randperm(len(bins), generator=gen).tolist()]
            self._epoch = (epoch, bins)
        return self._epoch[1]

    def sequence(self, index: int) -> PackedBatch:
        epoch, k = divmod(index, self.sequences_per_epoch)
        bins = self.bins(epoch)
        assert len(bins) == self.sequences_per_epoch  # FFD bin count depends only on the lengths
        docs = [document_arrays(ids, mask)[:2] for ids, mask in self.load(bins[k])]
        return pack(docs, pad_to=self.cutoff_len if self.pack else None)

    def valid_tokens(self, index: int) -> int:
        """Loss tokens of sequence ``index`` without reading it (padding carries none)."""
        epoch, k = divmod(index, self.sequences_per_epoch)
        return sum(self.valid[r] for r in self.bins(epoch)[k])

    def length(self, index: int) -> int:
        """Tokens of sequence ``index`` without reading it."""
        if self.pack:
            return self.cutoff_len
        epoch, k = divmod(index, self.sequences_per_epoch)
        return sum(self.lengths[r] for r in self.bins(epoch)[k])


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
