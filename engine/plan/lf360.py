"""The memory of 360-LLaMA-Factory's long-sequence runs, to check the planner against its README.

360-LLaMA-Factory (github.com/Qihoo360/360-LLaMA-Factory, built on LLaMA-Factory v0.9.1, hence
transformers <= 4.46.1, trl <= 0.9.6) trains HF models under DeepSpeed ZeRO-3 with parameters and
optimizer offloaded to the CPU (LLaMA-Factory's ds_z3_offload_config.json), HF gradient
checkpointing (reentrant, one checkpoint per decoder layer), flash-attn, and zigzag ring attention
(ring-flash-attn) over ``sequence_parallel_size`` (sp) ranks. Every sequence is padded to
``cutoff_len`` and cut into sp slices, so a rank holds n = cutoff_len / sp tokens of each sequence
(DPO: chosen and rejected, 2n). Bytes per rank, derived from that code (V vocabulary, h hidden,
L layers, d head dim, H heads, f MLP width; bf16 activations):

* fixed: CUDA context and two NCCL communicators (world for ZeRO-3, the SP group), and ZeRO-3's
  working set: gathered parameters up to ``stage3_max_live_parameters`` = 1e9 (or the lm_head
  alone, V·h, when larger) in bf16, the lm_head's bf16 gradient (2·V·h), the prefetch and reduce
  buckets (0.9·h² and h² bf16 elements: the HF "auto" sizes);
* kept per token: each decoder layer's input (2·h·L, the reentrant checkpoints), cos/sin (4·d),
  the final RMSNorm's fp32 input and bf16 outputs (8·h);
* the loss, transformers 4.46's ``ForCausalLMLoss`` inside the model forward (labels are passed):
  bf16 logits (2V), ``logits.float()`` (4V), the shifted ``.contiguous()`` copy (4V) and the
  log-softmax (4V) = 14·V per token at once (360-LF's own cross-entropy afterwards needs less);
* DPO: the policy keeps its fp32 logits and their log-softmax (8V, trainer_utils.get_batch_logps)
  while the reference model runs the same 14·V forward under no_grad: 22·V per token of 2n;
* one decoder layer recomputed in backward (its saved set ~ 22h + 6(H+G)d + 4H + 8f per token,
  K/V repeated to H heads by transformers' Qwen2 attention) plus ring-flash-attn's backward
  buffers (fp32 dq, dk, dv and those in flight, ~30h) — far below the loss peak for these vocabularies.

Usable memory comes from engine/plan/devices.py (context, NCCL, allocator fragmentation).
"""
from __future__ import annotations

import dataclasses

from engine.plan.devices import ALLOCATOR_FRAGMENTATION, CUDA_CONTEXT_GIB, GIB, NCCL_COMM_GIB
from engine.plan.models import KNOWN_MODELS, ModelSpec

A800_GIB = 80.0
TOLERANCE = 0.10
MAX_LIVE_PARAMETERS = 1e9  # ds_z3_offload_config.json: stage3_max_live_parameters


@dataclasses.dataclass(frozen=True)
class Published:
    model: str
    recipe: str
    gpus: int
    sp: int
    max_k: int
    """Published maximum cutoff_len in k = 1024 tokens (the README's "32k" DPO setting is
    cutoff_len 32768 in its 360-example.sh)."""


# 360-LLaMA-Factory README, "SFT Max Length" and "DPO Max Length" (full-parameter, ZeRO-3 offload +
# gradient checkpointing, A800 80 GB); models are the Qwen2.5-Instruct architectures.
PUBLISHED = (
    Published("qwen2.5-7b", "sft", 8, 8, 210), Published("qwen2.5-14b", "sft", 8, 8, 175),
    Published("qwen2.5-72b", "sft", 32, 8, 128),
    Published("qwen2.5-7b", "dpo", 8, 4, 32), Published("qwen2.5-7b", "dpo", 8, 8, 84),
    Published("qwen2.5-14b", "dpo", 8, 4, 32), Published("qwen2.5-14b", "dpo", 8, 8, 72),
    Published("qwen2.5-72b", "dpo", 32, 8, 46), Published("qwen2.5-72b", "dpo", 32, 16, 86),
)


def phases(m: ModelSpec, recipe: str, n: int) -> dict[str, float]:
    """Bytes per rank in each phase of a step, n tokens per sequence on the rank."""
    h, V, L, d = m.hidden_size, m.vocab_size, m.num_layers, m.head_dim
    H, G, f = m.num_attention_heads, m.num_query_groups, m.ffn_hidden_size
    tokens = 2 * n if recipe == "dpo" else n
    zero3 = 2 * max(MAX_LIVE_PARAMETERS, V * h) + 2 * V * h + 2 * 1.9 * h * h
    kept = (2 * h * L + 4 * d + 8 * h) * tokens
    loss = (22 if recipe == "dpo" else 14) * V * tokens
    layer = (22 * h + 6 * (H + G) * d + 4 * H + 8 * f) + (30 * h + 4 * f)
    return {"loss": zero3 + kept + loss, "layer backward": zero3 + kept + layer * tokens}


def usable_bytes(gpu_gib: float = A800_GIB, fragmentation: float = ALLOCATOR_FRAGMENTATION) -> float:
    fixed = (CUDA_CONTEXT_GIB + 2 * NCCL_COMM_GIB) * GIB
    return (gpu_gib * GIB - fixed) * (1 - fragmentation)


def max_cutoff_len(m: ModelSpec, recipe: str, sp: int, gpu_gib: float = A800_GIB,
                   fragmentation: float = ALLOCATOR_FRAGMENTATION) -> int:
    """Largest cutoff_len that fits: a multiple of 8·sp (360-LF pads each slice to a multiple of 8)."""
    budget, unit = usable_bytes(gpu_gib, fragmentation), 8 * sp
    lo, hi = 0, 1
    while max(phases(m, recipe, hi * unit // sp).values()) <= budget:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if max(phases(m, recipe, mid * unit // sp).values()) <= budget else (lo, mid)
    return lo * unit


def validate(fragmentation: float = ALLOCATOR_FRAGMENTATION) -> list[dict]:
    """One row per published maximum: prediction, relative error, and the phase that binds."""
    rows = []
    for p in PUBLISHED:
        m = KNOWN_MODELS[p.model]
        pred = max_cutoff_len(m, p.recipe, p.sp, fragmentation=fragmentation)
        ph = phases(m, p.recipe, pred // p.sp)
        published = p.max_k * 1024
        rows.append({"model": p.model, "recipe": p.recipe, "gpus": p.gpus, "sp": p.sp, "published": published,
                     "predicted": pred, "error": pred / published - 1, "binding": max(ph, key=ph.get),
                     "ok": abs(pred / published - 1) <= TOLERANCE})
    return rows
