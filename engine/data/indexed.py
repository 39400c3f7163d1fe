"""Megatron's indexed token datasets (``PREFIX.bin`` + ``PREFIX.idx``, "MMIDIDX" version 1), read
with numpy memory maps and written atomically (their blends: engine/data/blend.py). megatron-core
is not imported: the layout below is that of ``megatron/core/datasets/indexed_dataset.py``.

``.idx`` layout (little-endian)::

    9 bytes   b"MMIDIDX\\x00\\x00"
    <Q        version, 1
    <B        dtype code of the tokens: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64,
              7 float32, 8 uint16
    <Q        S, the number of sequences
    <Q        D, the number of document indices (documents + 1)
    int32[S]  sequence_lengths, in tokens
    int64[S]  sequence_pointers, byte offsets of each sequence in the .bin
    int64[D]  document_indices: document d is sequences [document_indices[d], document_indices[d+1])
    int8[S]   sequence_modes, only in multimodal datasets

``.bin``: every sequence's tokens back to back, nothing else.
"""
from __future__ import annotations

import os
import struct
from array import array

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, S, D: 34 bytes
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
          8: np.uint16}
_CODES = {np.dtype(t): c for c, t in DTYPES.items()}


class IndexedDataError(ValueError):
    """An indexed dataset that cannot be read; the message names the file and what was expected."""


def best_dtype(vocab_size: int | None):
    """The token dtype megatron-core picks for a vocabulary (``DType.optimal_dtype``)."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


class IndexedTokens:
    """A Megatron indexed dataset, validated on open and memory-mapped: no token is read until
    asked for, and arrays returned are views of the files where possible."""

    def __init__(self, prefix: str):
        self.prefix, self.idx_path, self.bin_path = prefix, prefix + ".idx", prefix + ".bin"
        for path in (self.idx_path, self.bin_path):
            if not os.path.isfile(path):
                raise IndexedDataError(f"no such indexed dataset prefix {prefix!r}: {path} does not exist; "
                                       f"expected {prefix}.bin and {prefix}.idx (give the prefix without "
                                       f"the extension)")
        idx = self.idx_path
        size = os.path.getsize(idx)
        if size < _HEADER.size:
            raise IndexedDataError(f"{idx}: {size} bytes, shorter than the {_HEADER.size}-byte MMIDIDX header; "
                                   f"expected a Megatron indexed dataset index")
        with open(idx, "rb") as f:
            magic, version, code, num_seq, num_idx = _HEADER.unpack(f.read(_HEADER.size))
        if magic != MAGIC:
            raise IndexedDataError(f"{idx}: starts with {magic!r}, expected {MAGIC!r}; not a Megatron indexed "
                                   f"dataset index")
        if version != 1:
            raise IndexedDataError(f"{idx}: version {version}, expected 1 (the only MMIDIDX version)")
        if code not in DTYPES:
            raise IndexedDataError(f"{idx}: unknown dtype code {code}, expected one of " +
                                   ", ".join(f"{c} ({np.dtype(t).name})" for c, t in DTYPES.items()))
        self.dtype = np.dtype(DTYPES[code])
        need = _HEADER.size + 12 * num_seq + 8 * num_idx
        if num_idx < 1 or size not in (need, need + num_seq):  # + int8 modes when multimodal
            raise IndexedDataError(f"{idx}: {size} bytes, but its header counts {num_seq} sequences and "
                                   f"{num_idx} document indices, which take {need} bytes (or {need + num_seq} "
                                   f"with sequence modes); expected at least one document index — the file "
                                   f"is truncated or damaged")
        raw = np.memmap(idx, dtype=np.uint8, mode="r")
        off = _HEADER.size
        self.sequence_lengths = np.frombuffer(raw, np.int32, num_seq, off)
        self.sequence_pointers = np.frombuffer(raw, np.int64, num_seq, off + 4 * num_seq)
        self.document_indices = np.frombuffer(raw, np.int64, num_idx, off + 12 * num_seq)
        self.sequence_modes = (np.frombuffer(raw, np.int8, num_seq, need) if size > need else None)
        self.num_sequences, self.num_documents = int(num_seq), int(num_idx) - 1
        self._check_index()
        self._check_bin()
        self._bounds = None

    def __reduce__(self):  # pickled (e.g. to data-loader workers) by prefix, never by its tokens
        return IndexedTokens, (self.prefix,)

    def _check_index(self) -> None:
        idx, lengths, di = self.idx_path, self.sequence_lengths, self.document_indices
        if lengths.size and lengths.min() < 0:
            i = int(np.argmax(lengths < 0))
            raise IndexedDataError(f"{idx}: sequence {i} has length {int(lengths[i])}; expected >= 0")
        starts = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=starts[1:])
        self.num_tokens = int(starts[-1])
        bad = np.flatnonzero(self.sequence_pointers != starts[:-1] * self.dtype.itemsize)
        if bad.size:
            i = int(bad[0])
            raise IndexedDataError(f"{idx}: sequence {i} points at byte {int(self.sequence_pointers[i])}, "
                                   f"expected {int(starts[i]) * self.dtype.itemsize} (the lengths before it "
                                   f"× {self.dtype.itemsize} bytes); pointers inconsistent with lengths")
        if di[0] != 0 or di[-1] != self.num_sequences:
            raise IndexedDataError(f"{idx}: document indices run from {int(di[0])} to {int(di[-1])}, expected "
                                   f"0 to the sequence count {self.num_sequences}")
        dec = np.flatnonzero(np.diff(di) < 0)
        if dec.size:
            d = int(dec[0])
            raise IndexedDataError(f"{idx}: document index {d + 1} ({int(di[d + 1])}) is below index {d} "
                                   f"({int(di[d])}); expected non-decreasing document indices")

    def _check_bin(self) -> None:
        expected, found = self.num_tokens * self.dtype.itemsize, os.path.getsize(self.bin_path)
        if found != expected:
            how = "truncated" if found < expected else "longer than its index says"
            raise IndexedDataError(f"{self.bin_path}: {found} bytes, expected {expected} ({self.num_tokens} "
                                   f"tokens × {self.dtype.itemsize} bytes of {self.dtype.name}, per "
                                   f"{self.idx_path}); the .bin is {how}")
        self._bin = (np.memmap(self.bin_path, dtype=self.dtype, mode="r") if expected
                     else np.zeros(0, dtype=self.dtype))  # an empty file cannot be mapped

    def _token_offset(self, sequence: int) -> int:
        if sequence >= self.num_sequences:
            return self.num_tokens
        return int(self.sequence_pointers[sequence]) // self.dtype.itemsize

    def document_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """``(starts, ends)``: each document's token offsets in the flat stream, int64 (computed once)."""
        if self._bounds is None:
            seq_starts = np.append(self.sequence_pointers // self.dtype.itemsize, self.num_tokens)
            di = self.document_indices
            self._bounds = seq_starts[di[:-1]], seq_starts[di[1:]]
        return self._bounds

    def tokens(self, start: int, end: int) -> np.ndarray:
        """The flat token stream ``[start, end)``, a view of the memory-mapped ``.bin``."""
        if not 0 <= start <= end <= self.num_tokens:
            raise IndexError(f"{self.bin_path}: tokens [{start}, {end}) are outside [0, {self.num_tokens})")
        return self._bin[start:end]

    def sequence(self, i: int) -> np.ndarray:
        """Sequence ``i``'s tokens (what megatron-core's ``IndexedDataset[i]`` returns)."""
        if not 0 <= i < self.num_sequences:
            raise IndexError(f"{self.idx_path}: sequence {i} is outside [0, {self.num_sequences})")
        start = self._token_offset(i)
        return self._bin[start:start + int(self.sequence_lengths[i])]

    def document(self, d: int) -> np.ndarray:
        """Document ``d``'s tokens: its sequences, contiguous in the ``.bin``."""
        if not 0 <= d < self.num_documents:
            raise IndexError(f"{self.idx_path}: document {d} is outside [0, {self.num_documents})")
        di = self.document_indices
        return self._bin[self._token_offset(int(di[d])):self._token_offset(int(di[d + 1]))]

    def max_token_id(self, chunk: int = 1 << 24):
        """The largest token id (``None`` when empty), scanned ``chunk`` tokens at a time."""
        best = None
        for lo in range(0, self.num_tokens, chunk):
            m = self._bin[lo:lo + chunk].max().item()
            best = m if best is None else max(best, m)
        return best

    def first_token_at_least(self, vocab_size: int, chunk: int = 1 << 24):
        """``(document, token)`` of the first token id >= ``vocab_size``, or ``None`` when all fit."""
        for lo in range(0, self.num_tokens, chunk):
            block = self._bin[lo:lo + chunk]
            over = block >= vocab_size
            if over.any():
                p = int(np.argmax(over))
                doc = int(np.searchsorted(self.document_bounds()[1], lo + p, side="right"))
                return doc, block[p].item()
        return None


class IndexedTokensWriter:
    """Writes ``PREFIX.bin``/``PREFIX.idx``, one sequence per document, that megatron-core's
    ``IndexedDataset`` reads. Both go to ``*.tmp`` files renamed into place by ``finalize`` (the
    ``.idx`` last), so a reader never sees a half-written dataset; as a context manager it finalizes
    on success and removes the temporaries on an error."""

    def __init__(self, prefix: str, dtype=np.int32):
        self.prefix, self.dtype = prefix, np.dtype(dtype)
        if self.dtype not in _CODES:
            raise ValueError(f"{prefix}.bin: dtype {self.dtype.name} cannot be written; expected one of "
                             + ", ".join(np.dtype(t).name for t in DTYPES.values()))
        self._lengths = array("q")
        self._bin = open(prefix + ".bin.tmp", "wb")
        self._done = False

    def add_document(self, tokens) -> None:
        """Append one document (a list or 1-D array of token ids) as one sequence."""
        if self._done:
            raise RuntimeError(f"{self.prefix}: add_document after finalize")
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"{self.prefix}.bin: a document must be 1-D token ids, got shape {arr.shape}")
        if arr.size and arr.dtype != self.dtype:
            if self.dtype.kind in "iu":
                info = np.iinfo(self.dtype)
                lo, hi = arr.min(), arr.max()
                if lo < info.min or hi > info.max:
                    bad = lo if lo < info.min else hi
                    raise ValueError(f"{self.prefix}.bin: token id {bad} does not fit {self.dtype.name}; "
                                     f"write with a wider dtype (best_dtype(vocab_size))")
            arr = arr.astype(self.dtype)
        if arr.size > np.iinfo(np.int32).max:
            raise ValueError(f"{self.prefix}.bin: a document of {arr.size} tokens; at most 2**31-1 per sequence")
        self._bin.write(arr.tobytes())
        self._lengths.append(arr.size)

    def finalize(self) -> None:
        """Write the index and move both files into place."""
        if self._done:
            return
        self._bin.close()
        lengths = np.frombuffer(self._lengths, dtype=np.int64) if len(self._lengths) else np.zeros(0, np.int64)
        pointers = np.zeros(lengths.size, dtype=np.int64)
        np.cumsum(lengths[:-1] * self.dtype.itemsize, out=pointers[1:])
        tmp = self.prefix + ".idx.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(_HEADER.pack(MAGIC, 1, _CODES[self.dtype], lengths.size, lengths.size + 1))
                f.write(lengths.astype(np.int32).tobytes())
                f.write(pointers.tobytes())
                f.write(np.arange(lengths.size + 1, dtype=np.int64).tobytes())
            os.replace(self.prefix + ".bin.tmp", self.prefix + ".bin")
            os.replace(tmp, self.prefix + ".idx")
        except BaseException:
            self.abort()
            raise
        self._done = True

    def abort(self) -> None:
        """Close and remove the temporaries; nothing is left at the prefix."""
        self._bin.close()
        self._done = True
        for path in (self.prefix + ".bin.tmp", self.prefix + ".idx.tmp"):
            if os.path.exists(path):
                os.remove(path)

    def __enter__(self) -> "IndexedTokensWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()
