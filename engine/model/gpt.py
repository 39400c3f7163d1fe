"""Decoder-only GPT (Llama / Qwen2 / Mistral family) with megatron-core GPTModel names.

``state_dict()`` keys are those of megatron-core's local spec (``embedding.word_embeddings.weight``,
``decoder.layers.{i}.self_attention.linear_qkv.weight``, …, ``output_layer.weight``) and each tensor
is this tp rank's shard in Megatron's layout (I-6). The *canonical* state dict is the unsharded one
(tp = 1); :func:`init_canonical` draws it independently of the mesh, so every mesh starts from the
same weights as the single-process model.
"""
from __future__ import annotations

import hashlib
import math

import torch
import torch.nn as nn

from engine.model.layers import RMSNorm, RotaryEmbedding, TransformerLayer
from engine.parallel.comm import gather_shards
from engine.parallel.tensor import (ColumnParallelLinear, VocabParallelEmbedding, gathered_linear, shard_tensor,
                                    unshard_tensor)


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's padded vocabulary: a multiple of ``divisible_by · tp``."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


class Embedding(nn.Module):
    def __init__(self, padded_vocab, cfg, mesh, dtype):
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(padded_vocab, cfg.hidden_size, mesh.group("tp"),
                                                      mesh.tp, mesh.index("tp"), dtype=dtype)


class Decoder(nn.Module):
    def __init__(self, cfg, mesh, dtype, core_attention):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(cfg, mesh, dtype, core_attention)
                                    for _ in range(cfg.num_layers))
        self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_epsilon, dtype)


class GPTModel(nn.Module):
    """The model of one rank. ``forward(batch)`` returns this tp rank's vocabulary slice of the
    logits for all T tokens of the micro-batch, ``[T, padded_vocab / tp]``."""

    def __init__(self, cfg, mesh, dtype=torch.float32, core_attention=None):
        super().__init__()
        self.cfg, self.mesh = cfg, mesh
        self.padded_vocab = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, mesh.tp)
        self.embedding = Embedding(self.padded_vocab, cfg, mesh, dtype)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rotary_base, cfg.rope_scaling)
        self.decoder = Decoder(cfg, mesh, dtype, core_attention)
        if not cfg.tie_word_embeddings:
            self.output_layer = ColumnParallelLinear(cfg.hidden_size, self.padded_vocab, mesh.group("tp"),
                                                     mesh.tp, dtype=dtype)

    @property
    def vocab_start(self) -> int:
        """First vocabulary id of this tp rank's logits slice."""
        return self.embedding.word_embeddings.vocab_start

    def forward(self, batch) -> torch.Tensor:
        x = self.embedding.word_embeddings(batch.tokens)
        rope = self.rotary(batch.position_ids, x.dtype)
        for layer in self.decoder.layers:
            x = layer(x, rope, batch)
        x = self.decoder.final_layernorm(x)
        if self.cfg.tie_word_embeddings:
            return gathered_linear(x, self.embedding.word_embeddings.weight, None, self.mesh.group("tp"))
        return self.output_layer(x)

    # -- canonical (unsharded) weights ----------------------------------------------------------
    def full_shape(self, name: str) -> tuple[int, ...]:
        p = self.get_parameter(name)
        shape = list(p.shape)
        if p.tp_dim is not None:
            shape[p.tp_dim] *= self.mesh.tp
        return tuple(shape)

    def load_canonical(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Copy this rank's shard of every canonical tensor into the parameters."""
        tp, rank = self.mesh.tp, self.mesh.index("tp")
        missing = [n for n, _ in self.named_parameters() if n not in state]
        if strict and missing:
            raise KeyError(f"canonical state lacks {missing[:5]}{' …' if len(missing) > 5 else ''}")
        with torch.no_grad():
            for name, p in self.named_parameters():
                full = state[name]
                if tuple(full.shape) != self.full_shape(name):
                    raise ValueError(f"{name}: expected shape {self.full_shape(name)}, got {tuple(full.shape)}")
                p.copy_(shard_tensor(full, p.tp_dim, p.tp_parts, tp, rank))


def canonical_tensors(model: GPTModel, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full tensors from this rank's shards (parameters, gradients, …) named like parameters;
    gathers over tp, so every tp rank must call it."""
    group = model.mesh.group("tp")
    out = {}
    for name, t in local.items():
        p = model.get_parameter(name)
        out[name] = unshard_tensor(gather_shards(t, group), p.tp_dim, p.tp_parts)
    return out


def init_canonical(model: GPTModel, seed: int) -> dict[str, torch.Tensor]:
    """Mesh-independent initial weights, each drawn from its own generator seeded by its name.

    N(0, std²) for embeddings, qkv, fc1 and the output layer; std/sqrt(2·layers) for the two
    output projections (Megatron); norms 1, biases 0; padded vocabulary rows 0.
    """
    cfg = model.cfg
    state = {}
    for name, p in model.named_parameters():
        shape = model.full_shape(name)
        if name.endswith("layernorm.weight"):
            state[name] = torch.ones(shape)
            continue
        if name.endswith(".bias"):
            state[name] = torch.zeros(shape)
            continue
        std = cfg.init_method_std
        if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
            std /= math.sqrt(2.0 * cfg.num_layers)
        # vocabulary rows must not depend on the padding (which depends on tp): draw exactly
        # vocab_size rows and zero-pad
        vocab_param = name in ("embedding.word_embeddings.weight", "output_layer.weight")
        draw = (cfg.vocab_size, shape[1]) if vocab_param else shape
        digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        t = torch.zeros(shape)
        t[: draw[0]] = torch.empty(draw).normal_(0.0, std, generator=gen)
        state[name] = t
    return state
