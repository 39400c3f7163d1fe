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
  s·(3H/tp + 2g)·d + 4H/tp. With Qwen3's q/k norms the QKV projection's output is kept for their
  backward, s·(H + 2G)·d/tp, with an fp32 rstd per q and k head, 4(H + G)/tp;
* the SwiGLU MLP: fc1's output [gate; up] (2f) and the product fc2 reads (f): 3s·f/tp.

Recompute (``train.recompute``, engine/model/recompute.py), what a layer keeps per token:

* ``full``: its input, s·h/tp; the layer is rebuilt in backward, one at a time;
* ``selective``: its input and the attention output (linear_proj's input; the attention block up
  to there runs again), and the MLP block as with ``none``: s·h/tp + s·H·d/tp + norm + MLP;
* ``attention-cached``: its input, the attention output and lse (LoongTrain's Selective
  Checkpoint++); the rest is rebuilt in backward, one layer at a time.

With any recompute the cos/sin tables live inside the recomputed regions and are not kept.

Tiled MLP (``train.tile_mlp`` = N > 1, engine/model/tiled.py): the MLP keeps only its input (the
norm output, counted with the norm) and rebuilds each tile's ``[T/N, 3f/tp]`` in backward, one
tile at a time, so the MLP term leaves what a layer keeps and becomes 1/N in what is live.
Fused loss (``train.loss_chunk_tokens`` = c > 0, engine/fused_loss.py): the last stage keeps the
final norm's output and an fp32 log-sum-exp per token instead of the ``[T, Vp/tp]`` softmax;
its working set is one chunk's logits (in the model dtype, then fp32) and, in backward, the
chunk's fp32 softmax with its model-dtype copy plus ``dW`` summed in fp32 over chunks.
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
    qk_norm = (s * (heads + 2 * m.num_query_groups / tp) * d + 4 * (heads + m.num_query_groups / tp)
               if m.qk_layernorm else 0.0)
    return s * (heads + 2 * g) * d + out + 4 * heads + qk_norm


def _mlp(m, tp: int, s: int, tiles: int = 1) -> float:
    """What the MLP saves per token: fc1's output and the SwiGLU product; nothing but its input
    (counted with the norm) when tiled."""
    return 3 * s * m.ffn_hidden_size / tp if tiles <= 1 else 0.0


def mlp_tile_per_token(m, tp: int, s: int, tiles: int) -> float:
    """A tiled MLP's intermediates live at once (one tile's), per token of T; 0 untiled (then they
    are part of what the layer saves or rebuilds)."""
    return 3 * s * m.ffn_hidden_size / tp / tiles if tiles > 1 else 0.0


def layer_bytes_per_token(m, tp: int, hp: int, s: int, tiles: int = 1) -> float:
    """Saved bytes of one layer per token of T with ``recompute=none``."""
    return 2 * _norm(m, tp, s) + _attention(m, tp, hp, s) + _mlp(m, tp, s, tiles)


def kept_per_layer(m, tp: int, hp: int, s: int, recompute: str, tiles: int = 1) -> float:
    """Bytes per token a layer keeps between its forward and its backward under ``recompute``."""
    layer_input = s * m.hidden_size / tp
    out = s * m.num_attention_heads / tp * m.head_dim
    return {"none": layer_bytes_per_token(m, tp, hp, s, tiles),
            "full": layer_input,
            "selective": layer_input + out + _norm(m, tp, s) + _mlp(m, tp, s, tiles),
            "attention-cached": layer_input + out + 4 * m.num_attention_heads / tp,
            }[recompute]


def rematerialised_per_token(m, tp: int, hp: int, s: int, recompute: str, tiles: int = 1) -> float:
    """Bytes per token of what one layer rebuilds during its backward: the whole layer (``full``,
    ``attention-cached``) or its attention block (``selective``); a tiled MLP one tile at a time."""
    if recompute == "selective":
        return _norm(m, tp, s) + _attention(m, tp, hp, s) + mlp_tile_per_token(m, tp, s, tiles)
    if recompute in ("full", "attention-cached"):
        return layer_bytes_per_token(m, tp, hp, s, tiles) + mlp_tile_per_token(m, tp, s, tiles)
    return mlp_tile_per_token(m, tp, s, tiles)


def tile_grad_bytes(m, tp: int, s: int, tiles: int) -> float:
    """The tiled MLP's backward on top of the layer's: its weight gradients summed over tiles in
    fp32 beside one tile's gradients in the model dtype (engine/model/tiled.py)."""
    return (4 + s) * 3 * m.ffn_hidden_size * m.hidden_size / tp if tiles > 1 else 0.0


def mlp_backward_per_token(m, tp: int, s: int, tiles: int = 1) -> float:
    """Alive in one layer's MLP backward: the gradients of fc1's output (2f) and of the silu
    product (f) — one tile's when tiled (with :func:`tile_grad_bytes` beside them)."""
    return s * 3 * m.ffn_hidden_size / max(tiles, 1) / tp


def qkv_backward_per_token(m, tp: int, s: int) -> float:
    """Alive in one layer's attention backward, at the QKV projection: its input gathered again
    over tp and its input gradient before the reduce-scatter, two ``[T, h]`` tensors over ALL T
    tokens (sequence parallelism splits them only between the linears), which is why tp reaches
    less far than cp at equal degree. The context-parallel buffers (:func:`cp_buffers_per_token`)
    are alive in the same half of the layer's backward; the MLP's are not."""
    return 2 * s * m.hidden_size


def model_extras_per_token(m, tp: int, s: int, first: bool, last: bool, num_chunks: int,
                           recompute: str = "none", loss_chunk: int = 0) -> float:
    """Saved outside the layers: token ids and the out-of-range mask of the vocab-parallel
    embedding (first stage), the cos/sin half-tables per model chunk (``none`` only), the final
    norm and the loss's saved fp32 softmax [T, Vp/tp] with its int64 ids and two bool masks (last
    stage)."""
    extra = m.head_dim * s * num_chunks if recompute == "none" else 0.0
    if first:
        extra += 8 + 1
    if last:
        extra += loss_saved_per_token(m, tp, s, loss_chunk)
    return extra


def loss_saved_per_token(m, tp: int, s: int, loss_chunk: int = 0) -> float:
    """What the last stage saves outside the layers for the loss: the final norm and, unfused, the
    fp32 softmax [T, Vp/tp] with its int64 ids and two bool masks; fused, the fp32 log-sum-exp
    and the int64 labels (part of :func:`model_extras_per_token`)."""
    if loss_chunk > 0:
        return _norm(m, tp, s) + 4 + 8
    return _norm(m, tp, s) + 4 * m.padded_vocab(tp) / tp + 8 + 2


def loss_transient_bytes(m, tp: int, s: int, tokens: float, loss_chunk: int = 0) -> float:
    """Bytes live on top of what is saved while the loss runs forward over ``tokens``: unfused, the
    logits themselves (the fp32 working tensor that becomes the softmax is the saved one,
    engine/loss.py); fused, one chunk's logits in the model dtype and in fp32, the gathered
    chunk of hidden states, and the per-token losses."""
    vp = m.padded_vocab(tp) / tp
    if loss_chunk <= 0:
        return vp * s * tokens
    c = min(loss_chunk, tokens)
    return c * vp * (s + 4 if s != 4 else 4) + c * m.hidden_size * s + 4 * tokens


def loss_backward_bytes(m, tp: int, s: int, tokens: float, loss_chunk: int = 0) -> float:
    """Bytes live in the loss's backward on top of the saved activations: unfused, the logits'
    gradient cast to the model dtype beside the fp32 softmax it came from; fused, the gathered
    hidden chunk and the fp32 ``dW`` sum (several chunks) with the larger of one chunk's recomputed
    fp32 softmax beside its model-dtype copy, and that copy beside its ``[V/tp, H]`` product
    (none in fp32: summed in place by ``addmm_``; one product, no sum, when there is one chunk)."""
    vp, h = m.padded_vocab(tp) / tp, m.hidden_size
    if loss_chunk <= 0:
        return vp * s * tokens if s != 4 else 0.0
    c = min(loss_chunk, tokens)
    several = tokens > loss_chunk
    dw_sum = 4 * vp * h if several else 0.0
    product = 0.0 if several and s == 4 else s * vp * h
    softmax = c * vp * (4 + (s if s != 4 else 0))
    return c * h * s + dw_sum + max(softmax, c * vp * s + product)


def cp_buffers_per_token(m, tp: int, hp: int, rp: int, s: int) -> float:
    """Transient context-parallel buffers inside one layer's attention (estimate): Ulysses' send
    copies of q, k, v (its receive buffers are what the kernel saves); the ring's K/V blocks in
    flight (two) and, in backward, dK/dV in fp32 (own and travelling) and dq in fp32."""
    d, heads, g = m.head_dim, m.num_attention_heads / tp, _kv_heads_per_rank(m, tp, hp)
    a2a = s * (heads + 2 * g) * d if hp > 1 else 0.0
    ring = (2 * 2 * s * g * d + 2 * 2 * 4 * g * d + 4 * heads * d) if rp > 1 else 0.0
    return a2a + ring
