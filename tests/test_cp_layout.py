"""The sequence layout of I-2/I-3/I-4, without processes: every (ring, head) rank's slice of a
packed micro-batch, gathered back, reconstructs the batch exactly; zigzag chunk ownership,
per-document padding, positions within documents and equal token counts per rank."""
from __future__ import annotations

import pytest
import torch

from engine.data.packing import document_arrays, pack
from engine.loss import IGNORE_INDEX
from engine.parallel.context.layout import gather_cp_slices, split_for_cp


def make_batch(lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    return pack([document_arrays(torch.randint(1, 500, (n,), generator=g).tolist())[:2] for n in lens])


def strip_padding(padded, original):
    """Real tokens of ``padded`` document by document, in the original documents' lengths."""
    out = {k: [] for k in ("tokens", "labels", "position_ids")}
    for (a, _), n in zip(zip(padded.cu_seqlens[:-1].tolist(), padded.cu_seqlens[1:].tolist()),
                         original.doc_lens):
        for k in out:
            out[k].append(getattr(padded, k)[a:a + n])
    return {k: torch.cat(v) for k, v in out.items()}


@pytest.mark.parametrize("rp,hp,tp", [(2, 1, 1), (4, 1, 1), (1, 2, 1), (1, 4, 1), (2, 2, 1), (2, 2, 2),
                                      (4, 2, 1), (2, 1, 4), (8, 1, 1)])
@pytest.mark.parametrize("lens", [[1, 2, 3, 17, 64, 29], [256], [5, 300, 7, 1]])
def test_slices_reconstruct_the_batch(rp, hp, tp, lens):
    batch = make_batch(lens)
    slices = {(r, h): split_for_cp(batch, rp=rp, hp=hp, tp=tp, ring_rank=r, head_rank=h)
              for r in range(rp) for h in range(hp)}
    sizes = {s.num_tokens for s in slices.values()}
    assert len(sizes) == 1 and sizes.pop() % tp == 0, "every rank holds the same number of tokens"
    padded = gather_cp_slices(slices, rp, hp)
    unit = 2 * rp * hp
    assert all(n % unit == 0 for n in padded.doc_lens)
    real = strip_padding(padded, batch)
    for k in real:
        assert torch.equal(real[k], getattr(batch, k)), k
    # valid-token count is unchanged (padding carries no loss) and positions restart per document
    assert sum(s.num_valid for s in slices.values()) == batch.num_valid
    starts = padded.cu_seqlens[:-1].long()
    assert (padded.position_ids[starts] == 0).all()
    pad_mask = torch.ones(padded.num_tokens, dtype=torch.bool)
    for a, n in zip(starts.tolist(), batch.doc_lens):
        pad_mask[a:a + n] = False
    assert (padded.labels[pad_mask] == IGNORE_INDEX).all()


def test_zigzag_ownership():
    """Ring rank r holds chunks r and 2·rp−1−r of every document; hp slices are contiguous."""
    rp, hp = 4, 2
    batch = pack([(torch.arange(16) + 1, torch.arange(16) + 1), (torch.arange(32) + 100, torch.arange(32))])
    for r in range(rp):
        stream = torch.cat([split_for_cp(batch, rp=rp, hp=hp, tp=1, ring_rank=r, head_rank=h).tokens
                            for h in range(hp)])
        doc0 = (torch.arange(16) + 1).view(2 * rp, -1)
        doc1 = (torch.arange(32) + 100).view(2 * rp, -1)
        expect = torch.cat([doc0[r], doc0[2 * rp - 1 - r], doc1[r], doc1[2 * rp - 1 - r]])
        assert torch.equal(stream, expect)
        meta = split_for_cp(batch, rp=rp, hp=hp, tp=1, ring_rank=r, head_rank=0).meta
        assert meta.cu_seqlens.tolist() == [0, 4, 12] and meta.half_cu_seqlens.tolist() == [0, 2, 6]
        assert torch.equal(stream[meta.front_idx], torch.cat([doc0[r], doc1[r]]))
        assert torch.equal(stream[meta.back_idx], torch.cat([doc0[2 * rp - 1 - r], doc1[2 * rp - 1 - r]]))
