"""DPO losses over sequence log-prob sums that are exact under any mesh (DESIGN §4, I-5).

A DPO loss is a non-linear function of whole-sequence log-probs, so it cannot be split into
per-token terms like SFT. The recipe therefore (1) turns per-token cross-entropies into
per-sequence log-prob sums, reduced over cp (every cp rank holds a slice of every sequence;
tp is already reduced inside :func:`engine.loss.vocab_parallel_cross_entropy`), then (2) applies
the pair loss, summed over this rank's pairs and divided by the GLOBAL number of pairs, so that
summing gradients over dp×cp gives the mean over the global batch — no per-rank average, which
is where 360-LLaMA-Factory's ipo/simpo go wrong (0/0 on a rank without response tokens, and a
mean of means when ranks hold different numbers of tokens).

Legend: T tokens of this rank's micro-batch slice, S sequences (segments) of the micro-batch,
P preference pairs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.loss import IGNORE_INDEX
from engine.parallel.comm import all_reduce_, reduce_from_group

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def sequence_logprob_sums(token_losses_T: torch.Tensor, segment_ids_T: torch.Tensor, num_segments: int,
                          cp_group, *, labels_T: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of token log-probs ``[S]`` and response token counts ``[S]`` (int64).

    ``token_losses_T`` are this rank's per-token cross-entropies (0 where the label is ignored),
    so a sequence's log-prob is ``−Σ losses`` of its tokens. ``segment_ids_T`` gives each token's
    sequence in ``[0, num_segments)``; a negative id drops the token (padding). A sequence with
    no token on this rank simply contributes 0 here. Counts are the tokens whose label is not
    ``IGNORE_INDEX`` (all tokens with a segment when ``labels_T`` is None).

    Both are summed over ``cp_group`` (None: cp = 1). The log-prob sums go through
    :func:`reduce_from_group`: all-reduce forward, **identity backward**. Why identity: after the
    forward every cp rank holds the same full sums ``S = Σ_r s_r`` and computes the same loss
    ``L(S)`` from them, so each rank's backward already starts from the full ``∂L/∂S``; since
    ``∂S/∂s_r = 1``, the gradient of rank r's partial sum is exactly ``∂L/∂S`` — nothing to add.
    Each rank then back-propagates only through its own tokens, and the parameter gradients are
    summed over dp×cp (I-5): ``Σ_r ∂L/∂S · ∂s_r/∂θ = ∂L/∂θ``. A summing backward (all-reduce)
    would count the replicated loss cp times (gradients cp× too large). Note the consequence for
    logging: the loss value is replicated over cp, so average (not sum) it over cp when reporting.
    """
    present = segment_ids_T >= 0
    ids = torch.where(present, segment_ids_T, 0)
    logp_T = torch.where(present, -token_losses_T, 0.0)
    sums_S = logp_T.new_zeros(num_segments).index_add(0, ids, logp_T)
    valid = present if labels_T is None else present & (labels_T != IGNORE_INDEX)
    counts_S = torch.zeros(num_segments, dtype=torch.int64, device=ids.device)
    counts_S.index_add_(0, ids, valid.to(torch.int64))
    all_reduce_(counts_S, cp_group)  # no grad: counts are data, not activations
    return reduce_from_group(sums_S, cp_group), counts_S


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, sft_weight: float = 0.0,
             chosen_token_counts: torch.Tensor | None = None,
             num_pairs_global: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pair loss of this rank's ``P`` pairs: ``Σ_pairs ℓ / num_pairs_global`` and detached metrics.

    Inputs are ``[P]`` sequence log-prob sums (π policy, ρ reference; chosen and rejected of a
    pair at the same index), already reduced over cp. With ``h = (π_c − ρ_c) − (π_r − ρ_r)``:

    - ``sigmoid``: ``−(1−ε)·logσ(β·h) − ε·logσ(−β·h)`` (ε = ``label_smoothing``, cDPO);
    - ``ipo``: ``(h − 1/(2β))²``; on sums, as written — pass per-token means (sums divided by
      the cp-reduced counts) for the length-normalised IPO of the paper/TRL;
    - ``hinge``: ``relu(1 − β·h)``;
    - plus ``sft_weight · (−π_c / n_c)`` per pair (n_c = ``chosen_token_counts``, global over cp).

    Dividing by the global pair count (all ranks of dp and all micro-batches together), never
    by the local count, makes the summed dp gradients the global mean (I-5). The reference
    log-probs carry no gradient. ``metrics`` are detached SUMS over the local pairs, for the
    caller to all-reduce over dp and divide by the reduced ``num_pairs``: ``rewards/chosen``
    = β·(π_c − ρ_c), ``rewards/rejected``, ``rewards/accuracy`` (chosen reward > rejected),
    ``rewards/margin``, and ``num_pairs``.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"dpo loss_type={loss_type!r} is not one of {LOSS_TYPES}")
    if not beta > 0:
        raise ValueError(f"dpo beta={beta} must be > 0 (typical 0.1)")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"dpo label_smoothing={label_smoothing} must lie in [0, 0.5]")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies to loss_type='sigmoid' only; set it to 0 for {loss_type!r}")
    if sft_weight and chosen_token_counts is None:
        raise ValueError("sft_weight > 0 needs chosen_token_counts (from sequence_logprob_sums)")
    if num_pairs_global <= 0:
        raise ValueError(f"num_pairs_global={num_pairs_global} must be > 0 (the pairs of the global batch)")

    chosen_logratio = policy_chosen - ref_chosen.detach()
    rejected_logratio = policy_rejected - ref_rejected.detach()
    h = chosen_logratio - rejected_logratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
        if label_smoothing:
            losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = F.relu(1 - beta * h)
    if sft_weight:
        # an empty chosen response has π_c = 0: its term is 0, not 0/0
        n_c = chosen_token_counts.to(policy_chosen.dtype).clamp_min(1)
        losses = losses + sft_weight * (-policy_chosen / n_c)

    with torch.no_grad():
        r_c, r_r = beta * chosen_logratio, beta * rejected_logratio
        metrics = {"rewards/chosen": r_c.sum(), "rewards/rejected": r_r.sum(),
                   "rewards/accuracy": (r_c > r_r).to(r_c.dtype).sum(),
                   "rewards/margin": (r_c - r_r).sum(),
                   # a fill, not torch.tensor(..., device=): no blocking host-to-device copy (I-9)
                   "num_pairs": torch.full((), float(h.numel()), dtype=r_c.dtype, device=h.device)}
    return losses.sum() / num_pairs_global, metrics
