"""Model weights in and out of training: load either Megatron format at any mesh, save
torch_dist, export Hugging Face.

Loading goes through the canonical state dict (DESIGN §5): the checkpoint's tensors are
re-padded for this run's tp and each rank copies its shard. Saving gathers the full tensors over
tp onto global rank 0, which writes them (dp and cp replicas are identical).
"""
from __future__ import annotations

import dataclasses
import os
import shutil

import torch

from engine import faults
from engine.model.gpt import canonical_tensors
from engine.parallel.comm import gather_objects
from engine.model.sharding import canonical_names

# model config fields that define the architecture (the rest is bookkeeping or init)
ARCH_FIELDS = ("arch", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
               "num_query_groups", "kv_channels", "vocab_size", "norm_epsilon", "rotary_base",
               "rope_scaling", "add_qkv_bias", "tie_word_embeddings")
VOCAB_TENSORS = ("embedding.word_embeddings.weight", "output_layer.weight")


def repad_vocab(canon: dict, vocab: int, padded: int) -> dict:
    """Vocabulary tensors re-padded to ``padded`` rows (rows past ``vocab`` are zeros)."""
    out = dict(canon)
    for name in VOCAB_TENSORS:
        if name in out:
            t = out[name][:vocab]
            out[name] = torch.cat([t, t.new_zeros(padded - vocab, t.shape[1])])
    return out


def check_model_matches(saved: dict, cfg_model, path: str) -> None:
    """The run's model section must describe the checkpoint's architecture."""
    ours = dataclasses.asdict(cfg_model)
    diff = {k: (ours[k], saved.get(k)) for k in ARCH_FIELDS if _norm(ours[k]) != _norm(saved.get(k))}
    if diff:
        fix = ", ".join(f"model.{k}={v[1]!r}" for k, v in diff.items())
        raise ValueError(f"model.load={path}: the checkpoint's model differs from the config in "
                         f"{sorted(diff)}; set {fix}")


def _norm(v):
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else v


def load_weights(model, path: str) -> None:
    """Copy this rank's shard of the checkpoint at ``path`` (either format) into ``model``."""
    from convert.megatron_io import load_megatron

    canon, saved_model, _ = load_megatron(path)
    check_model_matches(saved_model, model.cfg, path)
    canon = repad_vocab(canon, model.cfg.vocab_size, model.padded_vocab)
    if model.cfg.tie_word_embeddings:
        canon.pop("output_layer.weight", None)
    model.load_canonical({k: v.to(next(model.parameters()).dtype) for k, v in canon.items()}, strict=True)


def _full_state(model, mesh) -> dict | None:
    """The whole canonical weights on global rank 0 (None elsewhere)."""
    return gather_canonical(model, mesh, {n: p.detach() for n, p in model.named_parameters()})


def gather_canonical(model, mesh, local: dict) -> dict | None:
    """Canonical (unsharded) tensors of any per-parameter state keyed by local parameter names
    (weights, optimizer moments, fp32 masters), assembled on global rank 0: gathered over tp, then
    the pipeline stages' pieces sent to rank 0 (dp and cp replicas are identical)."""
    full = canonical_tensors(model, local)
    parts = gather_objects(full, mesh.group("pp"), mesh.ranks("pp")[0])
    if mesh.rank != 0:
        return None
    merged = {}
    for part in parts:
        for k, v in part.items():
            merged.setdefault(k, v)
    return merged


def _first(model):
    return model[0] if isinstance(model, torch.nn.ModuleList) else model


def model_dict(cfg_model) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg_model).items() if k != "load"}


def save_torch_dist(model, mesh, root: str, iteration: int, extra: dict | None = None) -> str | None:
    """Write ``root/iter_NNNNNNN`` (torch_dist, plus ``extra`` {file name: object} saved with
    torch.save beside it) atomically, then the tracker file; returns the directory on global
    rank 0 (None elsewhere). Every rank must call it (tp and pp gathers)."""
    from convert.megatron_dist import save_dist
    from convert.megatron_io import write_tracker

    full = _full_state(model, mesh)
    if mesh.rank != 0:
        return None
    out = os.path.join(root, f"iter_{iteration:07d}")
    md = model_dict(_first(model).cfg)
    fresh = f"{out}.new"
    shutil.rmtree(fresh, ignore_errors=True)  # a previous save killed midway
    save_dist(full.__getitem__, canonical_names(md), md, fresh, iteration=iteration)
    faults.in_save(iteration, mesh.rank)
    for name, obj in (extra or {}).items():
        torch.save(obj, os.path.join(fresh, name))
    if os.path.exists(out):  # a rerun into the same directory replaces that iteration
        old = f"{out}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(fresh, out)
        shutil.rmtree(old)
    else:
        os.replace(fresh, out)
    write_tracker(root, iteration)
    return out


def export_hf(model, mesh, out_dir: str, tokenizer_from: str | None = None) -> None:
    """Write the model as a Hugging Face directory (global rank 0; every rank must call it)."""
    from convert.hf_io import write_hf
    from convert.hf_map import hf_config_from_model_config, iter_canonical_to_hf

    full = _full_state(model, mesh)
    if mesh.rank != 0:
        return
    md = model_dict(_first(model).cfg)
    dtype = "bfloat16" if next(model.parameters()).dtype == torch.bfloat16 else "float32"
    write_hf(iter_canonical_to_hf(full.__getitem__, md), hf_config_from_model_config(md, dtype), out_dir,
             tokenizer_from=tokenizer_from)
