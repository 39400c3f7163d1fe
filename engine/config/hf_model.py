"""``model.load`` as a Hugging Face model directory: its config.json is the model section.

A directory with ``config.json`` and safetensors weights (``model.safetensors``, or shards named by
``model.safetensors.index.json``) and none of a Megatron checkpoint's markers is a Hugging Face
model. When ``model.load`` names one, :func:`with_hf_model` (called by ``load_config``, so the
planner, the checks and every rank see the real architecture before any process group exists)
derives the architecture fields from config.json with convert/hf_map.py ``model_config_from_hf``:
a field the config leaves out is taken from there, one it gives must agree (else one ConfigError
naming every such field with both values). Fields that are not architecture
(``make_vocab_size_divisible_by``, ``init_method_std``, ``load``) stay the config's. The weights
are read by convert/hf_source.py, each rank its own slices; the tokenizer defaults to the
directory itself (:func:`tokenizer_dir`).
"""
from __future__ import annotations

import dataclasses
import os

from engine.config.schema import Config, ConfigError

_INDEX = "model.safetensors.index.json"
# what makes a directory a Megatron checkpoint (convert/megatron_io.py ``resolve``)
_MEGATRON_FILES = ("metadata.json", "latest_checkpointed_iteration.txt", "common.pt")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# config.json's name of each model field, for the error message
_HF_KEYS = {"arch": "model_type", "num_layers": "num_hidden_layers", "ffn_hidden_size": "intermediate_size",
            "num_query_groups": "num_key_value_heads", "kv_channels": "head_dim", "norm_epsilon": "rms_norm_eps",
            "rotary_base": "rope_theta", "rope_scaling": "rope_parameters", "add_qkv_bias": "model_type",
            "qk_layernorm": "model_type"}


def is_hf_model_dir(path: str | None) -> bool:
    """Whether ``path`` is a Hugging Face model directory with safetensors weights. A directory
    with config.json whose weights are only PyTorch ``.bin`` files, or absent, is a ConfigError."""
    if not path or not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        return False
    base = os.path.basename(os.path.normpath(path))
    if any(os.path.exists(os.path.join(path, f)) for f in _MEGATRON_FILES) or base.startswith("iter_"):
        return False
    names = os.listdir(path)
    if os.path.isfile(os.path.join(path, _INDEX)) or "model.safetensors" in names:
        return True
    if any(n.endswith(".bin") for n in names):
        raise ConfigError(f"model.load={path} holds PyTorch .bin weights; meshtron reads Hugging Face weights as "
                          f"safetensors only (sliced per rank without loading whole files). Re-save the model with "
                          f"transformers' save_pretrained(dir, safe_serialization=True), then give that directory "
                          f"(or convert it with meshtron-convert hf-to-megatron)")
    raise ConfigError(f"model.load={path} has a config.json but neither model.safetensors nor {_INDEX}; "
                      f"give a Hugging Face model directory with its safetensors weights")


def hf_model_section(path: str) -> dict:
    """The model fields config.json at ``path`` defines (``sliding_window`` None when it has none)."""
    from transformers import AutoConfig

    from convert.hf_map import model_config_from_hf

    try:
        derived = model_config_from_hf(AutoConfig.from_pretrained(path, local_files_only=True))
    except ValueError as e:
        raise ConfigError(f"model.load={path}: config.json: {e}") from None
    return {"sliding_window": None, "qk_layernorm": False, **derived}


def with_hf_model(cfg: Config, given: dict | None) -> Config:
    """``cfg`` with its model section from config.json when ``model.load`` is a Hugging Face
    directory (else ``cfg`` itself); ``given``: the model keys the config file and overrides set."""
    path = cfg.model.load
    if not is_hf_model_dir(path):
        return cfg
    derived = hf_model_section(path)
    heads, hidden = derived["num_attention_heads"], derived["hidden_size"]
    diff = [k for k in (given or {}) if k in derived and not _same(k, getattr(cfg.model, k), derived[k], hidden, heads)]
    if diff:
        parts = [f"model.{k}={getattr(cfg.model, k)!r} but config.json has {_HF_KEYS.get(k, k)}="
                 f"{derived[k]!r}" for k in diff]
        raise ConfigError(f"model.load={path} is a Hugging Face model whose config.json disagrees with the config: "
                          f"{'; '.join(parts)}. The architecture comes from config.json: remove "
                          f"{', '.join('model.' + k for k in diff)} from the config (or load another model)")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **derived))


def _same(key: str, ours, theirs, hidden: int, heads: int) -> bool:
    if key == "kv_channels":  # null and the implied hidden_size // heads are the same head size
        return (ours or hidden // heads) == (theirs or hidden // heads)
    if isinstance(ours, dict) and isinstance(theirs, dict):
        return ours.keys() == theirs.keys() and all(_same(k, ours[k], theirs[k], hidden, heads) for k in ours)
    if isinstance(ours, int | float) and isinstance(theirs, int | float) and not isinstance(ours, bool):
        return float(ours) == float(theirs)
    return ours == theirs


def tokenizer_dir(cfg: Config) -> str | None:
    """The run's tokenizer directory: ``data.tokenizer``; else a Hugging Face ``model.load``
    itself; else the hf/ folder of a converted Megatron checkpoint; else None."""
    load = cfg.model.load
    if cfg.data.tokenizer or not load:
        return cfg.data.tokenizer or None
    return load if is_hf_model_dir(load) else os.path.join(load, "hf")


def has_tokenizer_files(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES)
