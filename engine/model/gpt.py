"""Decoder-only GPT (Llama / Qwen2 / Qwen3 / Mistral family) with megatron-core GPTModel names.

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

from engine.loss import head_losses
from engine.model.layers import RMSNorm, RotaryEmbedding, TransformerLayer
from engine.model.offload import ActivationOffload
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
    def __init__(self, cfg, mesh, dtype, core_attention, num_layers: int, final_norm: bool, recompute: str,
                 tile_mlp: int = 1):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(cfg, mesh, dtype, core_attention, i, recompute, tile_mlp)
                                    for i in range(num_layers))
        if final_norm:
            self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_epsilon, dtype)


class GPTModel(nn.Module):
    """The model (or one pipeline stage's model chunk) of one rank.

    ``layers`` is the chunk's range of global layer numbers (state-dict keys are local, 0 … n−1,
    as in megatron-core); ``pre_process`` puts the embedding here, ``post_process`` the final norm
    and output layer. ``forward(batch, hidden)`` takes token ids on the first stage and the
    previous stage's hidden states ``[t, h]`` otherwise; the last stage returns this tp rank's
    vocabulary slice of the logits ``[T, padded_vocab / tp]``, the others hidden states. With tied
    embeddings split over stages the last stage holds a copy, ``output_layer.weight``, whose
    gradient is summed with the embedding's (Megatron's embedding group). ``recompute``: what each
    layer keeps for backward (``train.recompute``; engine/model/recompute.py); ``tile_mlp``: token
    tiles of each MLP (``train.tile_mlp``); ``loss_chunk_tokens``: tokens per chunk of the fused
    output layer + loss of :func:`engine.loss.token_loss_sum` (``train.loss_chunk_tokens``; 0 =
    whole logits); ``offload_activations`` / ``offload_keep_layers``: what the layers keep for
    backward goes to host memory (``train.offload_activations``; engine/model/offload.py).
    """

    def __init__(self, cfg, mesh, dtype=torch.float32, core_attention=None, layers: range | None = None,
                 pre_process: bool = True, post_process: bool = True, recompute: str = "none",
                 tile_mlp: int = 1, loss_chunk_tokens: int = 0, offload_activations: bool = False,
                 offload_keep_layers: int = 0):
        super().__init__()
        self.cfg, self.mesh = cfg, mesh
        self.loss_chunk_tokens = loss_chunk_tokens
        self.offload_activations, self.offload_keep_layers = offload_activations, offload_keep_layers
        layers = range(cfg.num_layers) if layers is None else layers
        self.layer_offset, self.pre_process, self.post_process = layers.start, pre_process, post_process
        self.padded_vocab = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, mesh.tp)
        if pre_process:
            self.embedding = Embedding(self.padded_vocab, cfg, mesh, dtype)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rotary_base, cfg.rope_scaling)
        self.decoder = Decoder(cfg, mesh, dtype, core_attention, len(layers), post_process, recompute,
                               tile_mlp)
        self.offloader = None
        if offload_activations:
            self.offloader = ActivationOffload(mesh.device, offload_keep_layers)
            self.offloader.attach(self.decoder.layers)
        self.shares_embedding = post_process and cfg.tie_word_embeddings and not pre_process
        if post_process and (not cfg.tie_word_embeddings or self.shares_embedding):
            self.output_layer = ColumnParallelLinear(cfg.hidden_size, self.padded_vocab, mesh.group("tp"),
                                                     mesh.tp, dtype=dtype)
            self.output_layer.weight.shared_embedding = self.shares_embedding
        if pre_process and cfg.tie_word_embeddings and mesh.pp > 1:
            self.embedding.word_embeddings.weight.shared_embedding = True

    @property
    def vocab_start(self) -> int:
        """First vocabulary id of this tp rank's logits slice."""
        return self.mesh.index("tp") * (self.padded_vocab // self.mesh.tp)

    def forward(self, batch, hidden: torch.Tensor | None = None) -> torch.Tensor:
        x = self.final_hidden(batch, hidden)
        return self.logits(x) if self.post_process else x

    def final_hidden(self, batch, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """The chunk's output without the output layer: the last stage's final-norm hidden states,
        this rank's token slice ``[T/tp, H]`` (what the fused loss takes), else the stage output."""
        x = self.embedding.word_embeddings(batch.tokens) if self.pre_process else hidden
        rope = self.rotary(batch.position_ids, x.dtype)
        for layer in self.decoder.layers:
            x = layer(x, rope, batch)
        return self.decoder.final_layernorm(x) if self.post_process else x

    def token_losses(self, batch, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """The last stage's per-token losses ``[T]``: :meth:`final_hidden`, then the output layer and
        the cross-entropy (fused and chunked unless ``loss_chunk_tokens`` is 0). One method, so
        FSDP2 sees the output layer used inside a forward of this module (engine/parallel/fsdp.py
        registers it)."""
        return head_losses(self, self.final_hidden(batch, hidden), batch.labels)

    @property
    def output_weight(self) -> torch.nn.Parameter:
        """This tp rank's vocabulary slice of the output layer ``[V/tp, H]`` (the embedding itself
        when tied on one stage)."""
        if self.cfg.tie_word_embeddings and self.pre_process:
            return self.embedding.word_embeddings.weight
        return self.output_layer.weight

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """This tp rank's vocabulary slice of the logits ``[T, V/tp]`` of final hidden states."""
        return gathered_linear(x, self.output_weight, None, self.mesh.group("tp"))

    def canonical_name(self, name: str) -> str:
        """The canonical (global-layer, unsharded) name of a local parameter name."""
        if name.startswith("decoder.layers."):
            i, rest = name[len("decoder.layers."):].split(".", 1)
            return f"decoder.layers.{int(i) + self.layer_offset}.{rest}"
        if name == "output_layer.weight" and self.shares_embedding:
            return "embedding.word_embeddings.weight"
        return name

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
        missing = [self.canonical_name(n) for n, _ in self.named_parameters() if self.canonical_name(n) not in state]
        if strict and missing:
            raise KeyError(f"canonical state lacks {missing[:5]}{' …' if len(missing) > 5 else ''}")
        with torch.no_grad():
            for name, p in self.named_parameters():
                full = state[self.canonical_name(name)]
                if tuple(full.shape) != self.full_shape(name):
                    raise ValueError(f"{name}: expected shape {self.full_shape(name)}, got {tuple(full.shape)}")
                p.copy_(shard_tensor(full, p.tp_dim, p.tp_parts, tp, rank))


def canonical_tensors(model, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full tensors under canonical names from this rank's shards (parameters, gradients, …)
    keyed by local parameter names of ``model`` (a GPTModel, or a ModuleList of pipeline chunks
    with names ``"<chunk>.<name>"``); gathers over tp, so every tp rank must call it. Tensors
    of other pipeline stages are not included."""
    out = {}
    for name, t in local.items():
        chunk, local_name = model, name
        if isinstance(model, nn.ModuleList):
            idx, local_name = name.split(".", 1)
            chunk = model[int(idx)]
        p = chunk.get_parameter(local_name)
        full = unshard_tensor(gather_shards(t, chunk.mesh.group("tp")), p.tp_dim, p.tp_parts)
        out.setdefault(chunk.canonical_name(local_name), full)  # a tied copy maps to the embedding
    return out


def init_canonical(model: GPTModel, seed: int) -> dict[str, torch.Tensor]:
    """Mesh-independent initial weights, each drawn from its own generator seeded by its name.

    N(0, std²) for embeddings, qkv, fc1 and the output layer; std/sqrt(2·layers) for the two
    output projections (Megatron); norms 1, biases 0; padded vocabulary rows 0.
    """
    cfg = model.cfg
    state = {}
    for local_name, p in model.named_parameters():
        shape = model.full_shape(local_name)
        name = model.canonical_name(local_name)
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
