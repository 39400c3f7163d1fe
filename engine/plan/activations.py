"""Bytes one rank keeps for backward, per micro-batch, read off meshtron's code (and checked
against tools/bench_memory.py, which counts every tensor autograd saves; tests/test_plan.py).

Legend: T tokens of the micro-batch on this rank's cp slice (all tp ranks of the slice see them),
h hidden, H / G query / KV heads, d head dim, f MLP width, Vp padded vocabulary, s bytes of an
activation element (2 bf16, 4 fp32); tp splits what sequence parallelism or the heads split.

What a layer saves with ``recompute=none`` (engine/model/layers.py, engine/parallel/tensor.py):

* each RMSNorm: its input x (s·h) and the fp32 rstd (4), and the next linear saves the norm's
  output (s·h) — on T/tp tokens;
* attention (hp = 1): q, k, v as the kernel receives them (rotated; RoPE itself keeps only the
  shared cos/sin half-tables, s·d per token per model chunk) and the attention output, shared with
  linear_proj's input: s·(2H + 2G)·d/tp, plus the fp32 lse 4H/tp. With Ulysses (hp > 1) the kernel
  saves the all-to-all outputs — q, k and v with KV heads replicated to g = max(G/tp, hp) — and
  its output in head layout, while linear_proj saves the output again in sequence layout:
  s·(3H/tp + 2g)·d + 4H/tp;
* the SwiGLU MLP: fc1's output [gate; up] (2f) and the product fc2 reads (f): 3s·f/tp.

Recompute (``train.recompute``, engine/model/recompute.py), what a layer keeps per token:

* ``full``: its input, s·h/tp; the layer is rebuilt in backward, one at a time;
* ``selective``: its input and the attention output (linear_proj's input; the attention block up
  to there runs again), and the MLP block as with ``none``: s·h/tp + s·H·d/tp + norm + MLP;
* ``attention-cached``: its input, the attention output and lse (LoongTrain's Selective
  Checkpoint++); the rest is rebuilt in backward, one layer at a time.

With any recompute the cos/sin tables live inside the recomputed regions and are not kept.
"""
from __future__ import annotations

RECOMPUTE = ("none", "full", "selective", "attention-cached")


def _norm(m, tp: int, s: int) -> float:
    return (2 * s * m.hidden_size + 4) / tp


def _kv_heads_per_rank(m, tp: int, hp: int) -> int:
    """KV heads a rank's attention kernel sees per local token (replicated for Ulysses if needed)."""
    return max(m.num_query_groups // tp, hp) if hp > 1 else m.num_query_groups // tp


def _attention(m, tp: int, hp: int, s: int) -> float:
    """Per-token bytes the attention block saves: q, k, v, output(s), lse."""
    d, heads = m.head_dim, m.num_attention_heads / tp
    g = _kv_heads_per_rank(m, tp, hp)
    out = s * heads * d * (2 if hp > 1 else 1)  # head layout (kernel) + sequence layout (linear_proj)
    return s * (heads + 2 * g) * d + out + 4 * heads


def _mlp(m, tp: int, s: int) -> float:
    return 3 * s * m.ffn_hidden_size / tp


def layer_bytes_per_token(m, tp: int, hp: int, s: int) -> float:
    """Saved bytes of one layer per token of T with ``recompute=none``."""
    return 2 * _norm(m, tp, s) + _attention(m, tp, hp, s) + _mlp(m, tp, s)


def kept_per_layer(m, tp: int, hp: int, s: int, recompute: str) -> float:
    """Bytes per token a layer keeps between its forward and its backward under ``recompute``."""
    layer_input = s * m.hidden_size / tp
    out = s * m.num_attention_heads / tp * m.head_dim
    return {"none": layer_bytes_per_token(m, tp, hp, s),
            "full": layer_input,
            "selective": layer_input + out + _norm(m, tp, s) + _mlp(m, tp, s),
            "attention-cached": layer_input + out + 4 * m.num_attention_heads / tp,
            }[recompute]


def rematerialised_per_token(m, tp: int, hp: int, s: int, recompute: str) -> float:
    """Bytes per token of what one layer rebuilds during its backward: the whole layer (``full``,
    ``attention-cached``) or its attention block (``selective``)."""
    if recompute == "selective":
        return _norm(m, tp, s) + _attention(m, tp, hp, s)
    return layer_bytes_per_token(m, tp, hp, s) if recompute in ("full", "attention-cached") else 0.0


def backward_working_per_token(m, tp: int, s: int) -> float:
    """Gradients alive inside one layer's backward (estimate): of fc1's output (2f), of the silu
    product (f) and of the layer's input and output (2h)."""
    return s * (3 * m.ffn_hidden_size + 2 * m.hidden_size) / tp


def model_extras_per_token(m, tp: int, s: int, first: bool, last: bool, num_chunks: int,
                           recompute: str = "none") -> float:
    """Saved outside the layers: token ids and the out-of-range mask of the vocab-parallel
    embedding (first stage), the cos/sin half-tables per model chunk (``none`` only), the final
    norm and the loss's saved fp32 softmax [T, Vp/tp] with its int64 ids and two bool masks (last
    stage)."""
    extra = m.head_dim * s * num_chunks if recompute == "none" else 0.0
    if first:
        extra += 8 + 1
    if last:
        extra += _norm(m, tp, s) + 4 * m.padded_vocab(tp) / tp + 8 + 2
    return extra


def loss_saved_per_token(m, tp: int, s: int) -> float:
    """What the last stage saves outside the layers for the loss: the final norm, the fp32
    softmax [T, Vp/tp] with its int64 ids and two bool masks (part of
    :func:`model_extras_per_token`)."""
    return _norm(m, tp, s) + 4 * m.padded_vocab(tp) / tp + 8 + 2


def loss_transient_per_token(m, tp: int, s: int) -> float:
    """On top of the saved softmax, while the vocab-parallel cross-entropy runs forward: the
    logits themselves (s); the fp32 working tensor that becomes the softmax is the saved one
    (engine/loss.py shifts and exponentiates it in place)."""
    return m.padded_vocab(tp) / tp * s


def cp_buffers_per_token(m, tp: int, hp: int, rp: int, s: int) -> float:
    """Transient context-parallel buffers inside one layer's attention (estimate): Ulysses' send
    copies of q, k, v (its receive buffers are what the kernel saves); the ring's K/V blocks in
    flight (two) and, in backward, dK/dV in fp32 (own and travelling) and dq in fp32."""
    d, heads, g = m.head_dim, m.num_attention_heads / tp, _kv_heads_per_rank(m, tp, hp)
    a2a = s * (heads + 2 * g) * d if hp > 1 else 0.0
    ring = (2 * 2 * s * g * d + 2 * 2 * 4 * g * d + 4 * heads * d) if rp > 1 else 0.0
    return a2a + ring
