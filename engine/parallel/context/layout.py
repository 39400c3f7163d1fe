"""How a packed micro-batch is laid out over the cp = hp × rp ranks (I-2, I-3, I-4).

Labels are shifted before anything here (``engine.data.packing``). Then:

1. every document is padded at its end to a multiple of ``2·rp·hp`` (pad tokens carry no loss and,
   being last, are never attended to by real tokens), and a padding document is appended so the
   micro-batch splits evenly over ``2·rp·hp·tp``;
2. along the ring every document is cut into ``2·rp`` equal chunks; ring rank ``r`` holds chunks
   ``r`` and ``2·rp−1−r`` of **every** document (zigzag: equal causal work per rank). Its *ring
   stream* is, document by document, ``[chunk r, chunk 2rp−1−r]``;
3. the hp ranks of a ring rank hold contiguous equal slices of that ring stream (Ulysses gathers
   the stream back before attention).

Position ids stay each token's position within its document. :class:`CPMeta` carries what
attention needs on every rank: the ring stream's per-document ``cu_seqlens`` and the indices of
its front (chunk r) and back (chunk 2rp−1−r) halves.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from engine.data.packing import PackedBatch, to_device
from engine.loss import IGNORE_INDEX


@dataclass
class CPMeta:
    """Attention metadata of one ring rank's stream (identical on its hp ranks).

    ``cu_seqlens`` [docs+1]: documents of the ring stream (2·c_d tokens each);
    ``half_cu_seqlens`` [docs+1]: the same documents' halves (c_d tokens each);
    ``front_idx`` / ``back_idx``: stream positions of chunk r / chunk 2rp−1−r tokens, document by
    document (so ``stream[front_idx]`` is a packed batch with ``half_cu_seqlens``).
    ``max_len`` / ``half_max_len``: the longest document of ``cu_seqlens`` / ``half_cu_seqlens``,
    Python ints computed on the host (the flash kernels' ``max_seqlen``: no device read, I-9).
    ``prefix_max_len``: Seq1F1B under cp, the longest document piece of the unit's prefix (the
    earlier units' keys, :class:`~engine.parallel.pipeline.seqchunks.KVCache`); 0 otherwise.
    """

    rp: int
    ring_rank: int
    cu_seqlens: torch.Tensor
    half_cu_seqlens: torch.Tensor
    front_idx: torch.Tensor
    back_idx: torch.Tensor
    max_len: int = 0
    half_max_len: int = 0
    prefix_max_len: int = 0

    def to(self, device) -> "CPMeta":
        return replace(self, **{f.name: to_device(getattr(self, f.name), device) for f in fields(self)
                                if torch.is_tensor(getattr(self, f.name))})


@dataclass
class CPBatch(PackedBatch):
    """This cp rank's slice of a micro-batch (``tokens``/``labels``/``position_ids`` of its tokens;
    ``cu_seqlens`` of the whole ring stream, ``max_seqlen`` its longest document) and the ring
    metadata. ``num_valid`` counts this rank's loss tokens only."""

    meta: CPMeta = None


def _cu(lens: list[int]) -> torch.Tensor:
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    if lens:
        cu[1:] = torch.cumsum(torch.as_tensor(lens), 0)
    return cu


def pad_documents(batch: PackedBatch, multiple: int, total_multiple: int) -> PackedBatch:
    """Pad every document to a multiple of ``multiple`` tokens, then append a padding document so
    the total is a multiple of ``total_multiple`` (itself a multiple of ``multiple``)."""
    toks, labels, pos, lens = [], [], [], []
    for a, b in zip(batch.cu_seqlens[:-1].tolist(), batch.cu_seqlens[1:].tolist()):
        n = b - a
        pad = -n % multiple
        toks += [batch.tokens[a:b], torch.zeros(pad, dtype=torch.long)]
        labels += [batch.labels[a:b], torch.full((pad,), IGNORE_INDEX, dtype=torch.long)]
        pos += [batch.position_ids[a:b], batch.position_ids[b - 1] + 1 + torch.arange(pad)]
        lens.append(n + pad)
    extra = -sum(lens) % total_multiple
    if extra:
        toks.append(torch.zeros(extra, dtype=torch.long))
        labels.append(torch.full((extra,), IGNORE_INDEX, dtype=torch.long))
        pos.append(torch.arange(extra))
        lens.append(extra)
    return PackedBatch(torch.cat(toks), torch.cat(labels), torch.cat(pos), _cu(lens))


def ring_stream_index(doc_lens: list[int], rp: int, ring_rank: int):
    """Positions (in the padded micro-batch) of ring rank ``ring_rank``'s stream, and its
    front/back half indices within that stream."""
    stream, front, back = [], [], []
    start = 0
    offset = 0
    for n in doc_lens:
        c = n // (2 * rp)
        first = torch.arange(start + ring_rank * c, start + (ring_rank + 1) * c)
        last_chunk = 2 * rp - 1 - ring_rank
        second = torch.arange(start + last_chunk * c, start + (last_chunk + 1) * c)
        stream += [first, second]
        front.append(torch.arange(offset, offset + c))
        back.append(torch.arange(offset + c, offset + 2 * c))
        offset += 2 * c
        start += n
    cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.long)  # noqa: E731
    return cat(stream), cat(front), cat(back)


def split_for_cp(batch: PackedBatch, *, rp: int, hp: int, tp: int, ring_rank: int, head_rank: int) -> CPBatch:
    """This (ring_rank, head_rank)'s slice of a full micro-batch (same on every tp rank)."""
    unit = 2 * rp * hp
    padded = pad_documents(batch, unit, unit * tp)
    lens = padded.doc_lens
    stream_idx, front, back = ring_stream_index(lens, rp, ring_rank)
    ring_lens = [n // rp for n in lens]
    longest = max(ring_lens, default=0)
    meta = CPMeta(rp, ring_rank, _cu(ring_lens), _cu([n // 2 for n in ring_lens]), front, back,
                  max_len=longest, half_max_len=longest // 2)
    per_hp = stream_idx.numel() // hp
    mine = stream_idx[head_rank * per_hp:(head_rank + 1) * per_hp]
    return CPBatch(padded.tokens[mine], padded.labels[mine], padded.position_ids[mine], meta.cu_seqlens,
                   max_seqlen=longest, meta=meta)


def gather_cp_slices(slices: dict[tuple[int, int], CPBatch], rp: int, hp: int) -> PackedBatch:
    """Inverse of :func:`split_for_cp` over all (ring_rank, head_rank) slices: the padded
    micro-batch (tests strip the padding to recover the original)."""
    ring_lens = (slices[(0, 0)].meta.cu_seqlens.diff()).tolist()
    lens = [n * rp for n in ring_lens]
    total = sum(lens)
    out = {k: torch.empty(total, dtype=torch.long) for k in ("tokens", "labels", "position_ids")}
    for r in range(rp):
        stream_idx, _, _ = ring_stream_index(lens, rp, r)
        for k in out:
            out[k][stream_idx] = torch.cat([getattr(slices[(r, h)], k) for h in range(hp)])
    return PackedBatch(out["tokens"], out["labels"], out["position_ids"], _cu(lens))
