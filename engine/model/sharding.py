"""Where every canonical (megatron-core GPTModel) tensor lives on a (tp, pp, vpp) mesh.

The canonical state dict is the unsharded one: global layer numbers, full tensors, vocabulary
padded for the target tp. Sharding is by name:

* tp: ``tp_split(name) -> (dim, parts)`` — the dim split over tp ranks and how many logical blocks
  are split separately (2 for ``linear_fc1`` = [gate; up], so rank r holds [gate_r; up_r]);
  ``None`` for replicated tensors (norms, Qwen3's per-head q/k norms included).
* pp (and virtual pp): ``stage_layers(num_layers, pp, vpp, layers_per_stage)`` gives the global
  layer range of every (virtual) stage; layer keys inside a stage are *local* (0 … n−1), as
  megatron-core numbers them in a state dict. The embedding lives on the first stage, the final
  norm and output layer on the last (with tied embeddings and pp > 1 the last stage keeps its own
  copy ``output_layer.weight`` of the embedding, as Megatron does).
"""
from __future__ import annotations

import re

_TP_RULES = (
    ("embedding.word_embeddings.weight", (0, 1)),
    ("output_layer.weight", (0, 1)),
    ("self_attention.linear_qkv.weight", (0, 1)),
    ("self_attention.linear_qkv.bias", (0, 1)),
    ("self_attention.linear_proj.weight", (1, 1)),
    ("mlp.linear_fc1.weight", (0, 2)),
    ("mlp.linear_fc2.weight", (1, 1)),
)
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def canonical_names(model: dict) -> list[str]:
    """Every canonical tensor name of a model config (dict of ModelConfig fields), in model order."""
    layer = ["input_layernorm.weight", "self_attention.linear_qkv.weight"]
    if model["add_qkv_bias"]:
        layer.append("self_attention.linear_qkv.bias")
    if model.get("qk_layernorm"):  # (absent from model configs written before Qwen3)
        layer += ["self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"]
    layer += ["self_attention.linear_proj.weight", "pre_mlp_layernorm.weight", "mlp.linear_fc1.weight",
              "mlp.linear_fc2.weight"]
    names = ["embedding.word_embeddings.weight"]
    names += [f"decoder.layers.{i}.{n}" for i in range(model["num_layers"]) for n in layer]
    names.append("decoder.final_layernorm.weight")
    if not model["tie_word_embeddings"]:
        names.append("output_layer.weight")
    return names


def tp_split(name: str) -> tuple[int, int] | None:
    """``(dim, parts)`` of a canonical or local tensor name, or None when replicated over tp."""
    for suffix, split in _TP_RULES:
        if name.endswith(suffix):
            return split
    return None


def layer_of(name: str) -> tuple[int, str] | None:
    """``(layer number, rest of the name)`` for a decoder-layer tensor, else None."""
    m = _LAYER.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def stage_layers(num_layers: int, pp: int, vpp: int = 1,
                 layers_per_stage: list[int] | None = None) -> list[list[range]]:
    """Global layer ranges ``[pp rank][virtual chunk]``.

    Explicit ``layers_per_stage`` (pp·vpp entries, in model order) wins. Otherwise layers are
    split evenly; when that is impossible, the middle stages take ceil(L / stages) layers and the
    first and last share the rest (Megatron's decoder_first/last_pipeline_num_layers shape).
    Model chunk c of pp rank r is virtual stage c·pp + r (Megatron's interleaving).
    """
    stages = pp * vpp
    if layers_per_stage is None:
        layers_per_stage = _default_split(num_layers, stages)
    if len(layers_per_stage) != stages or sum(layers_per_stage) != num_layers or min(layers_per_stage) < 1:
        raise ValueError(f"layers per stage {layers_per_stage} must be {stages} positive numbers "
                         f"(pp·vpp = {pp}·{vpp}) adding up to num_layers={num_layers}")
    starts = [sum(layers_per_stage[:i]) for i in range(stages)]
    ranges = [range(s, s + n) for s, n in zip(starts, layers_per_stage)]
    return [[ranges[c * pp + r] for c in range(vpp)] for r in range(pp)]


def _default_split(num_layers: int, stages: int) -> list[int]:
    if num_layers % stages == 0:
        return [num_layers // stages] * stages
    if stages < 3:
        raise ValueError(f"{num_layers} layers cannot be split evenly over {stages} stages; give "
                         f"the layers per stage explicitly")
    middle = -(-num_layers // stages)
    rest = num_layers - middle * (stages - 2)
    first, last = rest // 2, rest - rest // 2
    if first < 1:
        raise ValueError(f"{num_layers} layers over {stages} stages leave no layer for the first "
                         f"stage; give the layers per stage explicitly")
    return [first] + [middle] * (stages - 2) + [last]
