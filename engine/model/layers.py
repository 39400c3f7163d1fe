"""Transformer building blocks of the Llama / Qwen2 / Mistral family, megatron-core names.

Legend: T tokens of the micro-batch (all tp ranks), t = T/tp this rank's token slice under
sequence parallelism, H query heads, G KV heads, D head dim, h hidden size.
Attention and MLP take ``x_th`` (a token slice) and return a token slice; inside, the
column-parallel linears see all T tokens and a 1/tp share of the heads or features.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.kernels.attention import _LocalAttention, local_attention
from engine.parallel.tensor import ColumnParallelLinear, RowParallelLinear, mark_tp


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back before the weight, as transformers' Llama does."""

    def __init__(self, hidden: int, eps: float, dtype=torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = mark_tp(nn.Parameter(torch.ones(hidden, dtype=dtype)), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * y.to(x.dtype)


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
    """cos/sin tables for per-token positions (I-3: a token's position within its document)."""

    def __init__(self, head_dim: int, base: float, scaling: dict | None):
        super().__init__()
        self.register_buffer("inv_freq", rotary_inv_freq(head_dim, base, scaling), persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        freqs = position_ids.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


def apply_rotary(x_THD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x_THD.shape[-1] // 2
    rotated = torch.cat([-x_THD[..., half:], x_THD[..., :half]], dim=-1)
    return x_THD * cos + rotated * sin


class SelfAttention(nn.Module):
    """GQA self-attention: fused ``linear_qkv`` (rows grouped per KV group) and ``linear_proj``.

    ``core_attention(q_THD, k_TGD, v_TGD, batch) -> out_THD`` is the context-parallel mode (or
    local attention when cp = 1); it sees this rank's heads and this cp rank's tokens.
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
        self.core_attention = core_attention or _local_core_attention

    def forward(self, x_th: torch.Tensor, rope, batch) -> torch.Tensor:
        qkv = self.linear_qkv(x_th)
        per_group = self.num_heads // self.num_groups
        qkv = qkv.view(qkv.shape[0], self.num_groups, per_group + 2, self.head_dim)
        q = qkv[:, :, :per_group].reshape(qkv.shape[0], self.num_heads, self.head_dim)
        k, v = qkv[:, :, per_group], qkv[:, :, per_group + 1]
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        cache, v = getattr(batch, "cache", None), v.contiguous()
        if cache is not None and cache.cp_group is None:  # Seq1F1B unit: keys of earlier units too
            k, v = cache.extend(self.layer_id, k, v)
            out = _LocalAttention.apply(q, k[batch.k_start:], v[batch.k_start:], batch.cu_seqlens,
                                        batch.cu_seqlens_k, True, None)
        elif cache is not None:  # Seq1F1B unit under context parallelism: the prefix joins the ring
            out = self.core_attention(q, k, v, batch, cache.prefix(self.layer_id, batch.unit, k, v))
        else:
            out = self.core_attention(q, k, v, batch)
        return self.linear_proj(out.reshape(out.shape[0], -1))


def _local_core_attention(q, k, v, batch, prefix=None):
    return local_attention(q, k, v, batch.cu_seqlens, causal=True)


class MLP(nn.Module):
    """SwiGLU: ``linear_fc1`` = [gate; up] (each TP shard [gate_r; up_r]), then ``linear_fc2``."""

    def __init__(self, cfg, mesh, dtype):
        super().__init__()
        tp, tp_group = mesh.tp, mesh.group("tp")
        self.linear_fc1 = ColumnParallelLinear(cfg.hidden_size, 2 * cfg.ffn_hidden_size, tp_group, tp,
                                               parts=2, dtype=dtype)
        self.linear_fc2 = RowParallelLinear(cfg.ffn_hidden_size, cfg.hidden_size, tp_group, tp, dtype=dtype)

    def forward(self, x_th: torch.Tensor) -> torch.Tensor:
        gate, up = self.linear_fc1(x_th).chunk(2, dim=-1)
        return self.linear_fc2(F.silu(gate) * up)


class TransformerLayer(nn.Module):
    def __init__(self, cfg, mesh, dtype, core_attention=None, layer_id: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_epsilon, dtype)
        self.self_attention = SelfAttention(cfg, mesh, dtype, core_attention, layer_id)
        self.pre_mlp_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_epsilon, dtype)
        self.mlp = MLP(cfg, mesh, dtype)

    def forward(self, x_th, rope, batch):
        x_th = x_th + self.self_attention(self.input_layernorm(x_th), rope, batch)
        return x_th + self.mlp(self.pre_mlp_layernorm(x_th))
