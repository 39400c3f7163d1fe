"""Transformer building blocks of the Llama / Qwen2 / Qwen3 / Mistral family, megatron-core names.

Legend: T tokens of the micro-batch (all tp ranks), t = T/tp this rank's token slice under
sequence parallelism, H query heads, G KV heads, D head dim, h hidden size, F ffn size (of this
tp rank). Attention and MLP take ``x_th`` (a token slice) and return a token slice; inside, the
column-parallel linears see all T tokens and a 1/tp share of the heads or features.

RMSNorm, the QKV split with RoPE (with Qwen3's q/k norms or without) and SwiGLU are small autograd
functions rather than chains of torch ops: each saves one tensor (or none) for backward where
autograd would save three or four, and writes its gradient into one buffer instead of letting
autograd sum zero-filled slices. What
a layer keeps for backward beyond that is decided by ``recompute`` (engine/model/recompute.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.kernels.attention import _LocalAttention, local_attention
from engine.model import recompute as rc
from engine.model.tiled import tiled
from engine.parallel.tensor import ColumnParallelLinear, RowParallelLinear, mark_tp


class _RMSNorm(torch.autograd.Function):
    """``w · (x / rms(x))`` normalised in fp32 and cast to x's dtype before the weight (the order
    of transformers' Llama); saves x and the fp32 ``rstd [.., 1]``, and rebuilds x/rms(x) in backward.

    Forward and backward run over blocks of at most :data:`NORM_BLOCK` elements of tokens: the fp32
    working copies of a whole ``[T, h]`` (four of them in backward) are the largest temporaries
    of a long-sequence step otherwise (8.9 GB each at 544k tokens × 4096). Per token the math is
    the same; with one block (every sequence below ~16k tokens at h = 4096) the code path is
    the unblocked one, and across blocks the weight's gradient is summed in fp32."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        out = torch.empty_like(x)
        rstd = _rms_norm(x, weight, eps, out)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        dx = torch.empty_like(x)
        return dx, _rms_norm_backward(x, weight, rstd, grad, dx), None


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor) -> torch.Tensor:
    """``out = weight · (x / rms(x))`` over the last dim (x and out may be strided views), in token
    blocks; returns the fp32 ``rstd [.., 1]``."""
    rstd = x.new_empty(x.shape[:-1] + (1,), dtype=torch.float32)
    for s, e in _norm_blocks(x):
        x32 = x[s:e].float()
        rstd[s:e] = torch.rsqrt(x32.square().mean(-1, keepdim=True).add_(eps))
        out[s:e] = weight * (x32 * rstd[s:e]).to(x.dtype)  # (x32 is x itself when x is fp32)
    return rstd


def _rms_norm_backward(x, weight, rstd, grad, dx) -> torch.Tensor:
    """Writes the input gradient of :func:`_rms_norm` into ``dx`` (a view may be given); returns
    the weight's gradient, summed over every leading dim (tokens, and heads for q/k norms)."""
    blocks = _norm_blocks(x)
    dw = None
    for s, e in blocks:
        y32 = x[s:e].float() * rstd[s:e]
        part = (grad[s:e] * y32.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0)
        dw = part if len(blocks) == 1 else (part.float() if dw is None else dw.add_(part))
        dy32 = (grad[s:e] * weight).float()
        dot = (dy32 * y32).mean(-1, keepdim=True)
        dx[s:e] = dy32.sub_(y32.mul_(dot)).mul_(rstd[s:e]).to(x.dtype)
    return dw.to(weight.dtype)


NORM_BLOCK = 2**26
"""Elements of ``[tokens, h]`` an RMSNorm block holds (64M: 256 MB per fp32 working copy)."""


def _norm_blocks(x: torch.Tensor) -> list[tuple[int, int]]:
    """Token ranges (dim 0) of at most NORM_BLOCK elements; one range for a short sequence."""
    n = x.shape[0]
    per = max(1, NORM_BLOCK // max(1, x[0].numel()))
    return [(s, min(s + per, n)) for s in range(0, n, per)] or [(0, 0)]


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back before the weight, as transformers' Llama does."""

    def __init__(self, hidden: int, eps: float, dtype=torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = mark_tp(nn.Parameter(torch.ones(hidden, dtype=dtype)), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNorm.apply(x, self.weight, self.eps)


def rotary_inv_freq(head_dim: int, base: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies of rotary embedding, with llama3-style scaling when configured."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv
    factor, old_len = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables ``[T, D/2]`` for per-token positions (I-3: a token's position within its
    document). Dimension i and i + D/2 of a head form a rotated pair with the same frequency, so
    one half-table serves both halves."""

    def __init__(self, head_dim: int, base: float, scaling: dict | None):
        super().__init__()
        self.register_buffer("inv_freq", rotary_inv_freq(head_dim, base, scaling), persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        freqs = position_ids.float()[:, None] * self.inv_freq[None, :]
        return freqs.cos().to(dtype), freqs.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor, inverse: bool = False):
    """``out = (x1·c − x2·s, x2·c + x1·s)`` of the halves ``(x1, x2)`` of the last dim (RoPE), or
    the inverse rotation (its transpose: the backward); ``out`` may be a strided view."""
    half = x.shape[-1] // 2
    sign = 1.0 if inverse else -1.0
    x1, x2, o1, o2 = x[..., :half], x[..., half:], out[..., :half], out[..., half:]
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=sign)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin, value=-sign)


class _QKVRope(torch.autograd.Function):
    """The fused ``linear_qkv`` output ``[T, G·(H/G + 2)·D]`` (rows grouped per KV group: the
    group's query heads, its key, its value) → ``q [T, H, D]``, ``k [T, G, D]``, ``v [T, G, D]``
    (new contiguous tensors), q and k rotated. RoPE is a rotation, so its backward is the inverse
    rotation of the gradient: only the shared cos/sin tables are saved."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, num_groups: int, head_dim: int):
        t = qkv.shape[0]
        x = qkv.view(t, num_groups, -1, head_dim)
        per_group = x.shape[2] - 2
        q = torch.empty((t, num_groups, per_group, head_dim), dtype=qkv.dtype, device=qkv.device)
        k = torch.empty((t, num_groups, head_dim), dtype=qkv.dtype, device=qkv.device)
        _rotate(x[:, :, :per_group], cos[:, None, None], sin[:, None, None], q)
        _rotate(x[:, :, per_group], cos[:, None], sin[:, None], k)
        v = x[:, :, per_group + 1].clone(memory_format=torch.contiguous_format)
        ctx.save_for_backward(cos, sin)
        ctx.shape = x.shape
        return q.view(t, num_groups * per_group, head_dim), k, v

    @staticmethod
    def backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        t, g, rows, d = ctx.shape
        dqkv = torch.empty(ctx.shape, dtype=dq.dtype, device=dq.device)
        _rotate(dq.reshape(t, g, rows - 2, d), cos[:, None, None], sin[:, None, None], dqkv[:, :, :rows - 2], True)
        _rotate(dk, cos[:, None], sin[:, None], dqkv[:, :, rows - 2], True)
        dqkv[:, :, rows - 1] = dv
        return dqkv.view(t, -1), None, None, None, None


class _QKNormRope(torch.autograd.Function):
    """:class:`_QKVRope` with Qwen3's per-head RMSNorm of q and k before the rotation (megatron-core's
    ``qk_layernorm``; transformers' ``Qwen3Attention.q_norm`` / ``k_norm``): ``q = R(w_q · q̂)``,
    q̂ = q / rms(q) over each head's D. Saves the ``linear_qkv`` output (the norms' inputs, read in
    place) and the fp32 ``rstd`` of every q and k head; backward rotates the gradients back, runs the
    norms' backward straight into ``dqkv`` and returns the weights' gradients summed over tokens and
    this rank's heads (partial over tp: the reducer sums replicated weights over tp)."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, q_weight, k_weight, eps: float, num_groups: int, head_dim: int):
        t = qkv.shape[0]
        x = qkv.view(t, num_groups, -1, head_dim)
        per_group = x.shape[2] - 2
        q = torch.empty((t, num_groups, per_group, head_dim), dtype=qkv.dtype, device=qkv.device)
        k = torch.empty((t, num_groups, head_dim), dtype=qkv.dtype, device=qkv.device)
        normed = torch.empty_like(q)
        rstd_q = _rms_norm(x[:, :, :per_group], q_weight, eps, normed)
        _rotate(normed, cos[:, None, None], sin[:, None, None], q)
        normed = normed[:, :, 0]
        rstd_k = _rms_norm(x[:, :, per_group], k_weight, eps, normed)
        _rotate(normed, cos[:, None], sin[:, None], k)
        v = x[:, :, per_group + 1].clone(memory_format=torch.contiguous_format)
        ctx.save_for_backward(qkv, cos, sin, q_weight, k_weight, rstd_q, rstd_k)
        ctx.dims = num_groups, head_dim
        return q.view(t, num_groups * per_group, head_dim), k, v

    @staticmethod
    def backward(ctx, dq, dk, dv):
        qkv, cos, sin, q_weight, k_weight, rstd_q, rstd_k = ctx.saved_tensors
        num_groups, head_dim = ctx.dims
        t = qkv.shape[0]
        x = qkv.view(t, num_groups, -1, head_dim)
        rows = x.shape[2]
        dqkv = torch.empty(x.shape, dtype=dq.dtype, device=dq.device)
        d_normed = torch.empty((t, num_groups, rows - 2, head_dim), dtype=dq.dtype, device=dq.device)
        _rotate(dq.reshape(d_normed.shape), cos[:, None, None], sin[:, None, None], d_normed, True)
        dw_q = _rms_norm_backward(x[:, :, :rows - 2], q_weight, rstd_q, d_normed, dqkv[:, :, :rows - 2])
        d_normed = d_normed[:, :, 0]
        _rotate(dk, cos[:, None], sin[:, None], d_normed, True)
        dw_k = _rms_norm_backward(x[:, :, rows - 2], k_weight, rstd_k, d_normed, dqkv[:, :, rows - 2])
        dqkv[:, :, rows - 1] = dv
        return dqkv.view(t, -1), None, None, dw_q, dw_k, None, None, None


class SelfAttention(nn.Module):
    """GQA self-attention: fused ``linear_qkv`` (rows grouped per KV group) and ``linear_proj``.

    ``core_attention(q_THD, k_TGD, v_TGD, batch) -> out_THD`` is the context-parallel mode (or
    local attention when cp = 1); it sees this rank's heads and this cp rank's tokens. With
    ``qk_layernorm`` (Qwen3) q and k are RMS-normalised per head before RoPE, per token, so before
    any context-parallel exchange; the norm weights ``[D]`` are replicated over tp and each tp rank
    normalises only its own heads.
    """

    def __init__(self, cfg, mesh, dtype, core_attention=None, layer_id: int = 0):
        super().__init__()
        tp, tp_group = mesh.tp, mesh.group("tp")
        self.layer_id = layer_id
        self.head_dim = cfg.head_dim
        self.num_heads = cfg.num_attention_heads // tp
        self.num_groups = cfg.num_query_groups // tp
        qkv_rows = (cfg.num_attention_heads + 2 * cfg.num_query_groups) * self.head_dim
        self.linear_qkv = ColumnParallelLinear(cfg.hidden_size, qkv_rows, tp_group, tp,
                                               bias=cfg.add_qkv_bias, dtype=dtype)
        self.linear_proj = RowParallelLinear(cfg.num_attention_heads * self.head_dim, cfg.hidden_size,
                                             tp_group, tp, dtype=dtype)
        self.q_layernorm = self.k_layernorm = None
        if cfg.qk_layernorm:
            self.q_layernorm = RMSNorm(self.head_dim, cfg.norm_epsilon, dtype)
            self.k_layernorm = RMSNorm(self.head_dim, cfg.norm_epsilon, dtype)
        self.core_attention = core_attention

    def forward(self, x_th: torch.Tensor, rope, batch) -> torch.Tensor:
        return self.linear_proj(self.attend(x_th, rope, batch))

    def attend(self, x_th: torch.Tensor, rope, batch, region: rc.Region | None = None) -> torch.Tensor:
        """The attention output ``[T, H·D]`` before ``linear_proj``. ``region``: the recompute
        region this runs in (it replays the Seq1F1B cache and, for attention-cached, keeps or
        returns the attention's out and lse)."""
        qkv = self.linear_qkv(x_th)
        if self.q_layernorm is None:
            q, k, v = _QKVRope.apply(qkv, *rope, self.num_groups, self.head_dim)
        else:
            q, k, v = _QKNormRope.apply(qkv, *rope, self.q_layernorm.weight, self.k_layernorm.weight,
                                        self.q_layernorm.eps, self.num_groups, self.head_dim)
        keep = region if region is not None and region.keeps_attention else None
        cache = getattr(batch, "cache", None)
        # longest documents come with the batch as host ints (I-9: the kernels never read cu_seqlens)
        if cache is not None and cache.cp_group is None:  # Seq1F1B unit: keys of earlier units too
            k, v = rc.extend_cache(cache, self.layer_id, k, v, region)
            out = _LocalAttention.apply(q, k[batch.k_start:], v[batch.k_start:], batch.cu_seqlens,
                                        batch.cu_seqlens_k, batch.max_seqlen, batch.max_seqlen_k, True, None, keep)
        else:  # (a Seq1F1B unit under context parallelism: the prefix joins the ring)
            prefix = None if cache is None else rc.cache_prefix(cache, self.layer_id, batch, k, v, region)
            if self.core_attention is None:
                out = local_attention(q, k, v, batch.cu_seqlens, causal=True, keep=keep,
                                      max_len=getattr(batch, "max_seqlen", None))
            elif keep is not None:
                out = rc.kept_core_attention(self.core_attention, q, k, v, batch, prefix, keep)
            elif prefix is not None:
                out = self.core_attention(q, k, v, batch, prefix)
            else:
                out = self.core_attention(q, k, v, batch)
        return out.reshape(out.shape[0], -1)


class _SwiGLU(torch.autograd.Function):
    """``silu(gate) · up`` of the fused ``linear_fc1`` output ``[T, 2F]`` (``[gate; up]``): saves
    that output only (silu(gate) is rebuilt in backward) and returns ``d[gate; up]`` as one tensor."""

    @staticmethod
    def forward(ctx, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        ctx.save_for_backward(gate_up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad):
        (gate_up,) = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        d = torch.empty_like(gate_up)
        d_gate, d_up = d.chunk(2, dim=-1)
        torch.mul(grad, F.silu(gate), out=d_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=d_gate)
        return d


class MLP(nn.Module):
    """SwiGLU: ``linear_fc1`` = [gate; up] (each TP shard [gate_r; up_r]), then ``linear_fc2``.

    ``tiles`` > 1 (``train.tile_mlp``): the same MLP over that many token tiles of ``x_th``, each
    tile's ``[T, 2F]`` / ``[T, F]`` intermediates rebuilt in backward and freed before the next
    (engine/model/tiled.py); only ``x_th`` is kept. 1: the untiled graph."""

    def __init__(self, cfg, mesh, dtype, tiles: int = 1):
        super().__init__()
        self.tiles = tiles
        tp, tp_group = mesh.tp, mesh.group("tp")
        self.linear_fc1 = ColumnParallelLinear(cfg.hidden_size, 2 * cfg.ffn_hidden_size, tp_group, tp,
                                               parts=2, dtype=dtype)
        self.linear_fc2 = RowParallelLinear(cfg.ffn_hidden_size, cfg.hidden_size, tp_group, tp, dtype=dtype)

    def forward(self, x_th: torch.Tensor) -> torch.Tensor:
        if self.tiles == 1:
            return self.dense(x_th)
        return tiled(self.dense, x_th, self.tiles, self)

    def dense(self, x_th: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(_SwiGLU.apply(self.linear_fc1(x_th)))


class TransformerLayer(nn.Module):
    """Pre-norm attention and MLP blocks with residuals; ``recompute`` (one of
    :data:`~engine.model.recompute.MODES`) picks what is kept for backward and what runs again,
    ``offload`` (engine/model/offload.py) whether that waits in host memory."""

    def __init__(self, cfg, mesh, dtype, core_attention=None, layer_id: int = 0, recompute: str = "none",
                 tile_mlp: int = 1):
        super().__init__()
        rc.check_mode(recompute)
        self.recompute = recompute
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_epsilon, dtype)
        self.self_attention = SelfAttention(cfg, mesh, dtype, core_attention, layer_id)
        self.pre_mlp_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_epsilon, dtype)
        self.mlp = MLP(cfg, mesh, dtype, tile_mlp)
        self.offload = None  # this layer's hooks of engine/model/offload.py, set by GPTModel

    def forward(self, x_th, rope, batch):
        if self.offload is not None and torch.is_grad_enabled():  # what it keeps waits on the host
            with self.offload(rope):
                return self._forward(x_th, rope, batch)
        return self._forward(x_th, rope, batch)

    def _forward(self, x_th, rope, batch):
        mode = self.recompute
        if mode == "none" or not torch.is_grad_enabled():
            return self._block(x_th, rope, batch)
        if mode == "selective":  # the attention block up to linear_proj runs again in backward
            out = rc.checkpoint(self._attend, x_th, rope, batch)
            x_th = x_th + self.self_attention.linear_proj(out)
            return x_th + self.mlp(self.pre_mlp_layernorm(x_th))
        return rc.checkpoint(self._block, x_th, rope, batch, keep_attention=mode == "attention-cached")

    def _attend(self, x_th, rope, batch, region=None):
        return self.self_attention.attend(self.input_layernorm(x_th), rope, batch, region)

    def _block(self, x_th, rope, batch, region=None):
        x_th = x_th + self.self_attention.linear_proj(self._attend(x_th, rope, batch, region))
        return x_th + self.mlp(self.pre_mlp_layernorm(x_th))
