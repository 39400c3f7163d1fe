"""Sequence partitions for Seq1F1B (arXiv 2406.03488): cut a micro-batch of T tokens into k units.

Units run in sequence order and unit j attends causally to every earlier token, so equal-length
units cost more the later they come. ``compute_partition`` balances their FLOPs instead (the
paper's "computation-wise" partition); ``uniform_partition`` is the equal-length baseline. Every
length is a multiple of ``multiple`` (what TP sequence parallelism and CP sharding need, e.g.
``2·cp·tp``) and at least ``multiple``.
"""
from __future__ import annotations

import math


def _check(total: int, k: int, multiple: int) -> None:
    if k < 1 or multiple < 1:
        raise ValueError(f"k={k} and multiple={multiple} must both be at least 1")
    if total % multiple:
        raise ValueError(f"total={total} tokens is not a multiple of multiple={multiple}; "
                         f"pad the sequence to {-(-total // multiple) * multiple} tokens")
    if total < k * multiple:
        raise ValueError(f"cannot cut total={total} tokens into k={k} chunks of at least multiple={multiple} "
                         f"tokens (needs total >= {k * multiple}); use a smaller k or a longer sequence")


def uniform_partition(total: int, k: int, multiple: int) -> list[int]:
    """k lengths, multiples of ``multiple``, differing by at most one ``multiple``; the first
    chunks take the extra (they are the cheaper ones, having fewer keys to attend to)."""
    _check(total, k, multiple)
    q, r = divmod(total // multiple, k)
    return [(q + (i < r)) * multiple for i in range(k)]


def compute_partition(total: int, k: int, multiple: int, *, hidden: int, num_layers: int, num_heads: int,
                      head_dim: int, ffn: int, vocab: int, swiglu: bool = True) -> list[int]:
    """k lengths (sequence order, first longest) whose units cost the same forward FLOPs.

    A unit covering positions [P−l, P) costs (h hidden, V vocab, L layers, n heads, d head dim,
    f ffn width)::

        F(l; P) = 4·l·h·V + L·[(4d + 3)·n·(l·P − l²/2) + 8·l·h·n·d + c_f·l·h·f]

    * ``4·l·h·V``: embedding counted as a one-hot matmul (2·l·h·V) plus the output layer (2·l·h·V);
      counted as in the authors' code (Seq1F1B ``SeqTFlops.get_prefix_tflops``).
    * ``(4d + 3)·n·(l·P − l²/2)``: attention core. Per head and (query, key) pair, 2d for QKᵀ, 2d
      for P·V and 3 for the softmax; queries [P−l, P) see l·P − l²/2 causal keys (continuous
      form of Σ(q+1), which also makes F additive: F(l; P) + F(P−l; P−l) = F(P; P)).
    * ``8·l·h·n·d``: Q, K, V projections (6·l·h·n·d) and the output projection (2·l·n·d·h). GQA's
      smaller K/V projections are not modelled; the error is a few percent of a per-token term.
    * ``c_f·l·h·f``: the MLP. The paper and its code use c_f = 4 (two h×f matmuls). That does *not*
      reproduce the paper's 7B example (it gives [11553, 8343, 6880, 5992] for the published
      ≈[11040, 8416, 7080, 6232]); counting Llama's SwiGLU gate, c_f = 6 (gate, up, down), does
      (unrounded ≈[11056, 8416, 7074, 6222], within 0.2 %). So ``swiglu=True`` (meshtron's MLP,
      ``ffn`` = ``ffn_hidden_size``, the width of each of gate and up) uses 6; ``False`` uses 4.

    Backward costs about twice each term, so balancing forward FLOPs balances the step. We solve
    F(l; P) = F(T; T)/k from the last unit backwards, P = T first: the quadratic
    (β/2)·l² − (α + β·P)·l + F_total/k = 0 with α the per-token and β the attention coefficient,
    smaller root (the larger one lies past P). Interior boundaries are then rounded to the nearest
    multiple of ``multiple``, pushed apart to leave every chunk ≥ ``multiple``, and the lengths
    sorted longest first (rounding can swap two near-equal neighbours; sorting moves no length
    further from its ideal than rounding did).
    """
    _check(total, k, multiple)
    alpha = 4 * hidden * vocab + num_layers * (8 * hidden * num_heads * head_dim
                                               + (6 if swiglu else 4) * hidden * ffn)
    beta = num_layers * (4 * head_dim + 3) * num_heads
    target = (alpha * total + beta * total * total / 2) / k
    bounds = [float(total)]
    for _ in range(k - 1):
        p = bounds[-1]
        b = alpha + beta * p
        # Smaller root of (β/2)·l² − b·l + target, in the cancellation-free form 2c / (b + √disc).
        length = 2 * target / (b + math.sqrt(max(b * b - 2 * beta * target, 0.0)))
        bounds.append(p - length)
    bounds = [0] + [math.floor(x / multiple + 0.5) * multiple for x in reversed(bounds[1:])] + [total]
    for i in range(1, k):  # every chunk at least `multiple`: forwards, then backwards from `total`
        bounds[i] = max(bounds[i], bounds[i - 1] + multiple)
    for i in range(k - 1, 0, -1):
        bounds[i] = min(bounds[i], bounds[i + 1] - multiple)
    return sorted((bounds[i + 1] - bounds[i] for i in range(k)), reverse=True)


def chunk_bounds(lengths: list[int]) -> list[tuple[int, int]]:
    """``(start, end)`` token offsets of each chunk: ``[10, 6] -> [(0, 10), (10, 16)]``."""
    out, start = [], 0
    for n in lengths:
        out.append((start, start + n))
        start += n
    return out
