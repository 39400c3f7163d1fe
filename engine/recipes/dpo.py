"""The DPO recipe (DESIGN §4): preference pairs, reference log-probs, the loss on the last stage.

Sequence i of the data is one pair, ``[chosen_i; rejected_i]`` packed as two documents (loss
tokens = each response) and padded to ``data.seq_len``, so a pair never leaves its micro-batch.
Segment ids number the documents of a micro-batch (2p: chosen of pair p, 2p+1: rejected; -1:
padding) and are laid out over cp exactly like the tokens. Per-sequence log-prob sums are reduced
over cp (and, through the vocab-parallel softmax, tp) before the sigmoid; the loss is the sum over
this rank's pairs divided by the global number of pairs (I-5), so the reference's log-probs are
computed first — by the frozen reference model through the same pipeline, forward only (or, with
``dpo.precompute_reference``, read from the sums one such pass cached before training:
engine/recipes/reference_cache.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.data.packing import PackedBatch, concat, pack, to_device
from engine.loss import head_losses
from engine.parallel.comm import all_reduce_
from engine.parallel.context.layout import split_for_cp
from engine.recipes.dpo_loss import dpo_loss, sequence_logprob_sums


class PairSequences:
    """``sequence(i)``: pair i as one packed sequence with its segment ids."""

    def __init__(self, pairs, seq_len: int):
        self.pairs, self.seq_len = pairs, seq_len

    def sequence(self, index: int) -> tuple[PackedBatch, torch.Tensor]:
        chosen, rejected = self.pairs.pair(index)
        batch = pack([chosen, rejected], pad_to=self.seq_len)
        n_c, n_r = len(chosen[0]), len(rejected[0])
        seg = torch.cat([torch.zeros(n_c), torch.ones(n_r), torch.full((self.seq_len - n_c - n_r,), -1.0)])
        return batch, seg.long()


@dataclass
class DPOMicroBatch:
    """This rank's slice of a micro-batch of pairs (``batch``), its tokens' segment ids, and the
    number of pairs; ``reference`` holds the reference log-prob sums ``[2·pairs]`` once computed."""

    batch: PackedBatch
    segment_ids: torch.Tensor
    num_pairs: int
    reference: torch.Tensor | None = None

    def __getattr__(self, name):  # the model reads tokens, positions, cu_seqlens / meta, max_seqlen
        return getattr(self.__dict__["batch"], name)

    def to(self, device) -> "DPOMicroBatch":
        return DPOMicroBatch(self.batch.to(device), to_device(self.segment_ids, device), self.num_pairs,
                             None if self.reference is None else to_device(self.reference, device))


def micro_batch_pairs(step: int, cfg, mesh) -> list[range]:
    """Global indices of the pairs of this rank's micro-batches of ``step``: the dp rank's share of
    ``[step·gbs, (step+1)·gbs)`` in runs of ``train.micro_batch_size`` (a function of the config,
    the step and the dp index alone: precomputed reference sums are looked up by it)."""
    gbs, mbs = cfg.train.global_batch_size, cfg.train.micro_batch_size
    per_dp = gbs // mesh.dp
    first = step * gbs + mesh.index("dp") * per_dp
    return [range(i, i + mbs) for i in range(first, first + per_dp, mbs)]


def dpo_micro_batches(dataset: PairSequences, step: int, cfg, mesh, device=None) -> list[DPOMicroBatch]:
    """This rank's micro-batches of pairs for ``step`` (the same global batch on every mesh), built
    on the host and moved to ``device`` (default: the mesh's; ``"cpu"`` keeps them on the host)."""
    mbs = cfg.train.micro_batch_size
    out = []
    for pairs in micro_batch_pairs(step, cfg, mesh):
        items = [dataset.sequence(j) for j in pairs]
        batch = concat([b for b, _ in items])
        seg = torch.cat([torch.where(s >= 0, s + 2 * n, -1) for n, (_, s) in enumerate(items)])
        if mesh.cp > 1:
            where = dict(rp=mesh.rp, hp=mesh.hp, tp=mesh.tp, ring_rank=mesh.index("rp"), head_rank=mesh.index("hp"))
            seg_batch = PackedBatch(seg + 1, batch.labels, batch.position_ids, batch.cu_seqlens)
            seg = split_for_cp(seg_batch, **where).tokens - 1   # padding added by the layout -> -1
            batch = split_for_cp(batch, **where)
        out.append(DPOMicroBatch(batch, seg, mbs).to(mesh.device if device is None else device))
    return out


def _sequence_sums(losses, mb: DPOMicroBatch, chunk):
    """Per-sequence log-prob sums and token counts from the last stage's per-token losses."""
    return sequence_logprob_sums(losses, mb.segment_ids, 2 * mb.num_pairs, chunk.mesh.group("cp"),
                                 labels_T=mb.batch.labels)


@torch.no_grad()
def compute_reference(runtime, micro_batches: list[DPOMicroBatch]) -> None:
    """Reference log-prob sums of every micro-batch (on the last pipeline stage), forward only."""
    last = runtime.chunks[-1]
    for mb in micro_batches:
        x = runtime.forward_only(mb.batch, head=False)
        if x is not None:
            mb.reference = _sequence_sums(head_losses(last, x, mb.batch.labels), mb, last)[0]


class DPOLoss:
    """``loss(chunk, micro_batch, hidden)`` for the pipeline runtime's last stage; collects the
    step's metric sums (rewards, accuracy, margin) as it goes."""

    def __init__(self, cfg, num_pairs_global: int):
        self.cfg, self.num_pairs_global = cfg.dpo, num_pairs_global
        self.metrics: dict[str, torch.Tensor] = {}

    def __call__(self, chunk, mb: DPOMicroBatch, hidden):
        sums, counts = _sequence_sums(chunk.token_losses(mb.batch, hidden), mb, chunk)
        ref = mb.reference
        loss, metrics = dpo_loss(sums[0::2], sums[1::2], ref[0::2], ref[1::2], beta=self.cfg.beta,
                                 loss_type=self.cfg.loss_type, label_smoothing=self.cfg.label_smoothing,
                                 sft_weight=self.cfg.sft_weight, chosen_token_counts=counts[0::2],
                                 num_pairs_global=self.num_pairs_global)
        for k, v in metrics.items():
            self.metrics[k] = self.metrics.get(k, 0.0) + v.detach().double()
        return loss

    def reduce_metrics(self, mesh) -> dict[str, torch.Tensor]:
        """Step metrics over every dp rank (on the last stage; zeros elsewhere, then over pp), as
        0-dim device tensors: the caller reads them with the loss in one transfer (I-9). cp
        ranks hold identical copies, so they are not summed."""
        keys = ["num_pairs", "rewards/accuracy", "rewards/chosen", "rewards/margin", "rewards/rejected"]
        if self.metrics:
            t = torch.stack([self.metrics[k] for k in keys])
        else:  # not the last stage
            t = torch.zeros(len(keys), dtype=torch.float64, device=mesh.device)
        all_reduce_(t, mesh.group("pp"))
        all_reduce_(t, mesh.group("dp"))
        values = t[1:] / t[0].clamp_min(1.0)
        return dict(zip(keys[1:], values.unbind()))
