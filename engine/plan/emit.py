"""``meshtron-plan --max-seq-len --emit-config FILE``: the run the search found, as a meshtron YAML.

The model section holds the shapes the planner knows (layers, widths, heads, vocabulary, bias,
tying); when ``--model`` is a meshtron YAML its whole model section is kept (rope, norms, load).
Data is synthetic at the found ``seq_len`` (one document per sequence: the longest attention
span, the planner's worst case) so ``meshtron-plan --simulate FILE`` runs anywhere; point
``data`` and ``model.load`` at the real files to train.
"""
from __future__ import annotations

import dataclasses
import os

import yaml

from engine.plan.models import ModelSpec


def _model_section(m: ModelSpec, source: str | None, seq_len: int) -> dict:
    if source and source.endswith((".yaml", ".yml")) and os.path.isfile(source):
        from engine.config import load_config

        model = dataclasses.asdict(load_config(source).model)
        model["max_position_embeddings"] = max(model["max_position_embeddings"], seq_len)
        return {k: v for k, v in model.items() if v is not None}
    published = {"rotary_base": m.rotary_base, "norm_epsilon": m.norm_epsilon}  # where the table knows them
    return {"arch": m.arch, "num_layers": m.num_layers,
            "hidden_size": m.hidden_size, "ffn_hidden_size": m.ffn_hidden_size,
            "num_attention_heads": m.num_attention_heads, "num_query_groups": m.num_query_groups,
            "kv_channels": m.head_dim, "vocab_size": m.vocab_size, "add_qkv_bias": m.add_qkv_bias,
            **({"qk_layernorm": True} if m.qk_layernorm else {}),
            "tie_word_embeddings": m.tie_word_embeddings,
            "make_vocab_size_divisible_by": m.make_vocab_size_divisible_by,
            **{k: v for k, v in published.items() if v is not None},
            "max_position_embeddings": max(seq_len, m.max_position_embeddings or 0)}


def config_dict(m: ModelSpec, reach, a) -> dict:
    """The meshtron config of ``reach`` (engine/plan/reach.py) found for the CLI arguments ``a``."""
    s, mesh = reach.settings(), reach.mesh
    sp_mode = "ring" if mesh.hp == 1 else ("ulysses" if mesh.hp == mesh.cp else "hybrid")
    parallel = {"tp": mesh.tp, "cp": mesh.cp, "pp": mesh.pp, "dp": mesh.dp, "sp_mode": sp_mode}
    if sp_mode == "hybrid":
        parallel["hp"] = mesh.hp
    if mesh.pp > 1:
        parallel["pp_schedule"] = a.pp_schedule
        if a.vpp > 1:
            parallel["vpp"] = a.vpp
        if a.seq_chunks > 1:
            parallel["seq_chunks"] = a.seq_chunks
    gbs = reach.run.global_batch_size or mesh.dp * reach.run.micro_batch_size
    out = {"recipe": a.recipe,
           "model": _model_section(m, a.model, reach.seq_len),
           "parallel": parallel,
           "optim": {"sharding": s["sharding"], "offload": s["offload"]},
           "train": {"bf16": not a.fp32, "recompute": s["recompute"], "tile_mlp": s["tile_mlp"],
                     "loss_chunk_tokens": s["loss_chunk_tokens"], "offload_activations": s["offload_activations"],
                     "offload_keep_layers": s["offload_keep_layers"], "global_batch_size": gbs,
                     "micro_batch_size": reach.run.micro_batch_size, "steps": 1},
           "data": {"source": "synthetic", "seq_len": reach.seq_len, "min_doc_len": reach.seq_len,
                    "max_doc_len": reach.seq_len},
           "hardware": {"gpus": mesh.world, "gpu": a.gpu, "gpu_memory_gb": a.gpu_memory_gb,
                        "gpus_per_node": a.gpus_per_node, "host_memory_gb": a.host_memory_gb}}
    if a.recipe == "dpo":
        out["dpo"] = {"precompute_reference": s["precompute_reference"]}
    return out


def write_config(path: str, m: ModelSpec, reach, a) -> None:
    """Write :func:`config_dict` as YAML (atomically) with a header saying where it came from."""
    header = (f"# meshtron-plan --max-seq-len: {m.name} {a.recipe} at {reach.seq_len} tokens on {reach.mesh.world} x "
              f"{a.gpu} ({a.gpu_memory_gb:g} GiB), host {a.host_memory_gb:g} GiB per node of {a.gpus_per_node}.\n"
              f"# Planned, not yet run on GPUs; confirm with: meshtron-plan --simulate {os.path.basename(path)}\n")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(header)
        yaml.safe_dump(config_dict(m, reach, a), f, sort_keys=False)
    os.replace(tmp, path)
