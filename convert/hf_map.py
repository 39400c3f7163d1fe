"""Name and layout map between HF Llama/Qwen2/Qwen3/Mistral and meshtron's canonical state dict.

The canonical state dict is unsharded and uses megatron-core GPTModel (local spec) names:
fused `linear_qkv` rows grouped per KV group `[q heads of group g, k_g, v_g]`, `linear_fc1` =
`[gate; up]`, vocab rows padded with zeros to `padded_vocab`. HF q/k need no RoPE permutation:
HF Llama already uses the half-split rotary layout megatron uses. Qwen3's per-head
`self_attn.q_norm` / `k_norm` weights are megatron-core's `self_attention.q_layernorm` /
`k_layernorm` (qk_layernorm), unchanged.

Tensors pass through without dtype casts, so HF -> canonical -> HF is bit-exact. The `iter_*`
generators take tensors one at a time through `get(name)`, so a streaming converter never holds
two full copies of the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch
from torch import Tensor
from transformers import LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config, Qwen3Config

_CONFIG_CLASSES = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "mistral": "MistralForCausalLM"}
# HF q/k norm names -> canonical (megatron-core qk_layernorm) names, in both directions.
_QK_NORMS = (("self_attn.q_norm.weight", "self_attention.q_layernorm.weight"),
             ("self_attn.k_norm.weight", "self_attention.k_layernorm.weight"))
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# HF keys that carry no weights of their own: rotary buffers saved by old transformers versions.
_IGNORED_HF_SUFFIXES = (".rotary_emb.inv_freq",)

Getter = Callable[[str], Tensor]


class MissingWeightError(KeyError, ValueError):
    """A tensor the model config requires is not in the source state dict."""

    def __str__(self) -> str:  # KeyError would repr-quote the message
        return str(self.args[0])


# ---------------------------------------------------------------------------------------------
# Configs


def _rope_from_hf(cfg: PretrainedConfig) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from a transformers 5 `rope_parameters` or 4.x attributes."""
    params = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    theta = getattr(cfg, "rope_theta", None)  # transformers 4.x; 5.x keeps it in rope_parameters
    theta = float(theta if theta is not None else params.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"rope type {rope_type!r} is not supported; meshtron supports 'default' and 'llama3'")
    missing = [k for k in _LLAMA3_KEYS if k not in params]
    if missing:
        raise ValueError(f"llama3 rope scaling is missing {missing}")
    scaling = {"rope_type": "llama3", **{k: float(params[k]) for k in _LLAMA3_KEYS[:3]}}
    scaling["original_max_position_embeddings"] = int(params["original_max_position_embeddings"])
    return theta, scaling


def model_config_from_hf(hf_config: PretrainedConfig) -> dict:
    """meshtron's `model` config section from a transformers Llama/Qwen2/Qwen3/Mistral config.

    Mistral's `sliding_window` is carried as `sliding_window`: meshtron attends over the full
    context, which equals sliding-window attention for sequences no longer than the window, and
    the config check refuses a longer `data.seq_len`.
    """
    arch = getattr(hf_config, "model_type", None)
    if arch not in _CONFIG_CLASSES:
        raise ValueError(f"model_type {arch!r} is not supported; use one of {sorted(_CONFIG_CLASSES)}")
    c = hf_config
    if getattr(c, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={c.hidden_act!r} is not supported; meshtron's MLP is SwiGLU (silu)")
    if getattr(c, "mlp_bias", False):
        raise ValueError("mlp_bias=True is not supported; the canonical MLP has no biases")
    if arch in ("llama", "qwen3") and getattr(c, "attention_bias", False):
        # HF Llama's and Qwen3's attention_bias also adds an o_proj bias, which linear_proj has no room for.
        raise ValueError(f"{arch} with attention_bias=True (q/k/v and o_proj biases) is not supported; "
                         "for q/k/v biases only use a qwen2 config")
    if arch in ("qwen2", "qwen3") and getattr(c, "use_sliding_window", False):
        raise ValueError(f"{arch} use_sliding_window=True is not supported; set it to False")
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None)
    theta, scaling = _rope_from_hf(c)
    window = getattr(c, "sliding_window", None) if arch == "mistral" else None
    return {
        "arch": arch,
        "num_layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "ffn_hidden_size": c.intermediate_size,
        "num_attention_heads": heads,
        "num_query_groups": getattr(c, "num_key_value_heads", None) or heads,
        "kv_channels": head_dim if head_dim and head_dim != c.hidden_size // heads else None,
        "vocab_size": c.vocab_size,
        "norm_epsilon": float(c.rms_norm_eps),
        "rotary_base": theta,
        "rope_scaling": scaling,
        "add_qkv_bias": arch == "qwen2",
        "tie_word_embeddings": bool(c.tie_word_embeddings),
        "max_position_embeddings": c.max_position_embeddings,
        **({"sliding_window": int(window)} if window else {}),
        # only when on: model configs written before Qwen3 have no such key
        **({"qk_layernorm": True} if arch == "qwen3" else {}),
    }


def hf_config_from_model_config(model: dict, torch_dtype: str = "float32") -> PretrainedConfig:
    """The transformers config for `model` (inverse of `model_config_from_hf`).

    Fields meshtron does not model (bos/eos token ids, initializer_range...) keep the class
    defaults; copy them from the original HF config when exporting a converted model.
    """
    arch = model["arch"]
    if arch not in _CONFIG_CLASSES:
        raise ValueError(f"arch {arch!r} is not supported; use one of {sorted(_CONFIG_CLASSES)}")
    if model["add_qkv_bias"] != (arch == "qwen2"):
        raise ValueError(f"add_qkv_bias={model['add_qkv_bias']} cannot be expressed as a {arch} HF config; "
                         "HF qwen2 always has q/k/v biases, llama, qwen3 and mistral (here) never")
    if bool(model.get("qk_layernorm")) != (arch == "qwen3"):
        raise ValueError(f"qk_layernorm={bool(model.get('qk_layernorm'))} cannot be expressed as a {arch} HF "
                         "config; HF qwen3 always normalises q and k per head, the other families never")
    rope = {"rope_type": "default", "rope_theta": float(model["rotary_base"])}
    if model.get("rope_scaling"):
        rope.update(model["rope_scaling"])
    kwargs = dict(
        vocab_size=model["vocab_size"],
        hidden_size=model["hidden_size"],
        intermediate_size=model["ffn_hidden_size"],
        num_hidden_layers=model["num_layers"],
        num_attention_heads=model["num_attention_heads"],
        num_key_value_heads=model["num_query_groups"] or model["num_attention_heads"],
        max_position_embeddings=model["max_position_embeddings"],
        rms_norm_eps=model["norm_epsilon"],
        rope_parameters=rope,
        tie_word_embeddings=model["tie_word_embeddings"],
        hidden_act="silu",
        dtype=torch_dtype,
        architectures=[_ARCHITECTURES[arch]],
    )
    if model.get("kv_channels") or arch == "qwen3":  # Qwen3Config's head_dim defaults to 128
        kwargs["head_dim"] = model.get("kv_channels") or model["hidden_size"] // model["num_attention_heads"]
    if arch in ("llama", "qwen3"):
        kwargs["attention_bias"] = False
    if arch == "mistral":
        kwargs["sliding_window"] = model.get("sliding_window")  # kept: training refused seq_len above it
    elif arch != "llama":
        kwargs["use_sliding_window"] = False
    return _CONFIG_CLASSES[arch](**kwargs)


# ---------------------------------------------------------------------------------------------
# Tensor helpers (also used by the model and the sharding code)


def padded_vocab_size(vocab: int, divisible_by: int, tp: int) -> int:
    """`vocab` rounded up to a multiple of `divisible_by * tp`, as Megatron pads it."""
    multiple = divisible_by * tp
    return -(-vocab // multiple) * multiple


def pad_vocab(t: Tensor, padded_vocab: int) -> Tensor:
    """Append zero rows so `t` has `padded_vocab` rows (returns `t` itself if already there)."""
    if t.shape[0] > padded_vocab:
        raise ValueError(f"padded_vocab={padded_vocab} is smaller than the vocab ({t.shape[0]} rows)")
    if t.shape[0] == padded_vocab:
        return t
    return torch.cat([t, t.new_zeros(padded_vocab - t.shape[0], *t.shape[1:])])


def unpad_vocab(t: Tensor, vocab: int) -> Tensor:
    """The first `vocab` rows of `t`, as a tensor of its own (not a view of the padded one)."""
    if t.shape[0] < vocab:
        raise ValueError(f"tensor has {t.shape[0]} rows, fewer than vocab_size={vocab}")
    return t if t.shape[0] == vocab else t[:vocab].clone()


def interleave_qkv(q: Tensor, k: Tensor, v: Tensor, num_heads: int, num_groups: int, head_dim: int) -> Tensor:
    """Fuse q [nq*d, ...], k [ng*d, ...], v [ng*d, ...] into megatron's `linear_qkv` rows.

    Rows come per KV group g: [the nq/ng q heads of group g, k_g, v_g]; works for weights
    [rows, h] and biases [rows].
    """
    assert num_heads % num_groups == 0, (num_heads, num_groups)
    rest = q.shape[1:]
    q_g = q.reshape(num_groups, num_heads // num_groups * head_dim, *rest)
    k_g = k.reshape(num_groups, head_dim, *rest)
    v_g = v.reshape(num_groups, head_dim, *rest)
    return torch.cat([q_g, k_g, v_g], dim=1).reshape(-1, *rest)


def split_qkv(qkv: Tensor, num_heads: int, num_groups: int, head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of `interleave_qkv`: (q, k, v), each a contiguous tensor of its own."""
    assert num_heads % num_groups == 0, (num_heads, num_groups)
    rest = qkv.shape[1:]
    q_rows = num_heads // num_groups * head_dim
    q, k, v = qkv.reshape(num_groups, q_rows + 2 * head_dim, *rest).split([q_rows, head_dim, head_dim], dim=1)
    return tuple(t.reshape(-1, *rest).clone(memory_format=torch.contiguous_format) for t in (q, k, v))


# ---------------------------------------------------------------------------------------------
# State dicts


def _heads(model: dict) -> tuple[int, int, int]:
    nq = model["num_attention_heads"]
    return nq, model["num_query_groups"] or nq, model["kv_channels"] or model["hidden_size"] // nq


def _getter(get: Getter, source: str) -> Getter:
    def wrapped(name: str) -> Tensor:
        try:
            return get(name)
        except KeyError:
            raise MissingWeightError(f"{source} state dict has no {name!r}") from None
    return wrapped


def iter_hf_to_canonical(get: Getter, model: dict, padded_vocab: int) -> Iterator[tuple[str, Tensor]]:
    """Yield canonical (name, tensor) pairs, reading HF tensors one by one through `get`."""
    get = _getter(get, "HF")
    nq, ng, d = _heads(model)
    embed = get("model.embed_tokens.weight")
    if embed.shape[0] != model["vocab_size"]:
        raise ValueError(f"embed_tokens has {embed.shape[0]} rows but vocab_size={model['vocab_size']}")
    yield "embedding.word_embeddings.weight", pad_vocab(embed, padded_vocab)
    for i in range(model["num_layers"]):
        hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
        yield mc + "input_layernorm.weight", get(hf + "input_layernorm.weight")
        suffixes = ("weight", "bias") if model["add_qkv_bias"] else ("weight",)
        for s in suffixes:
            q, k, v = (get(f"{hf}self_attn.{p}_proj.{s}") for p in "qkv")
            yield f"{mc}self_attention.linear_qkv.{s}", interleave_qkv(q, k, v, nq, ng, d)
        if model.get("qk_layernorm"):
            yield from ((mc + ours, get(hf + theirs)) for theirs, ours in _QK_NORMS)
        yield mc + "self_attention.linear_proj.weight", get(hf + "self_attn.o_proj.weight")
        yield mc + "pre_mlp_layernorm.weight", get(hf + "post_attention_layernorm.weight")
        fc1 = torch.cat([get(hf + "mlp.gate_proj.weight"), get(hf + "mlp.up_proj.weight")])
        yield mc + "mlp.linear_fc1.weight", fc1
        yield mc + "mlp.linear_fc2.weight", get(hf + "mlp.down_proj.weight")
    yield "decoder.final_layernorm.weight", get("model.norm.weight")
    if not model["tie_word_embeddings"]:  # tied: lm_head equals embed_tokens and is not read
        yield "output_layer.weight", pad_vocab(get("lm_head.weight"), padded_vocab)


def iter_canonical_to_hf(get: Getter, model: dict) -> Iterator[tuple[str, Tensor]]:
    """Yield HF (name, tensor) pairs in HF state_dict order, reading canonical tensors via `get`.

    Vocab padding is stripped; tied models get no `lm_head.weight`, as `save_pretrained` writes.
    """
    yield from iter_canonical_to_hf_part(get, model, range(model["num_layers"]), first=True, last=True)


def iter_canonical_to_hf_part(get: Getter, model: dict, layers: range, first: bool,
                              last: bool) -> Iterator[tuple[str, Tensor]]:
    """The part of :func:`iter_canonical_to_hf` one pipeline stage holds: the embedding when
    ``first``, decoder ``layers``, the final norm and output layer when ``last``; canonical
    tensors are asked for in a fixed order, each once."""
    get = _getter(get, "canonical")
    nq, ng, d = _heads(model)
    vocab, ffn = model["vocab_size"], model["ffn_hidden_size"]
    if first:
        yield "model.embed_tokens.weight", unpad_vocab(get("embedding.word_embeddings.weight"), vocab)
    for i in layers:
        hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
        suffixes = ("weight", "bias") if model["add_qkv_bias"] else ("weight",)
        qkv = {s: split_qkv(get(f"{mc}self_attention.linear_qkv.{s}"), nq, ng, d) for s in suffixes}
        for j, p in enumerate("qkv"):  # HF order: q.weight, q.bias, k.weight, ...
            yield from ((f"{hf}self_attn.{p}_proj.{s}", qkv[s][j]) for s in suffixes)
        del qkv
        yield hf + "self_attn.o_proj.weight", get(mc + "self_attention.linear_proj.weight")
        if model.get("qk_layernorm"):  # HF order: q_norm, k_norm after o_proj
            yield from ((hf + theirs, get(mc + ours)) for theirs, ours in _QK_NORMS)
        fc1 = get(mc + "mlp.linear_fc1.weight")
        if fc1.shape[0] != 2 * ffn:
            raise ValueError(f"{mc}mlp.linear_fc1.weight has {fc1.shape[0]} rows; expected 2*ffn={2 * ffn}")
        yield hf + "mlp.gate_proj.weight", fc1[:ffn].clone()
        yield hf + "mlp.up_proj.weight", fc1[ffn:].clone()
        del fc1
        yield hf + "mlp.down_proj.weight", get(mc + "mlp.linear_fc2.weight")
        yield hf + "input_layernorm.weight", get(mc + "input_layernorm.weight")
        yield hf + "post_attention_layernorm.weight", get(mc + "pre_mlp_layernorm.weight")
    if last:
        yield "model.norm.weight", get("decoder.final_layernorm.weight")
        if not model["tie_word_embeddings"]:
            yield "lm_head.weight", unpad_vocab(get("output_layer.weight"), vocab)


def hf_tensor_specs(model: dict, dtype) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """``(HF name, shape, dtype)`` of every tensor :func:`iter_canonical_to_hf` yields, in its
    order, from the model config alone (the mapping runs on meta tensors). ``dtype``: one dtype,
    or a function of the canonical name."""
    from convert.layout import canonical_shape

    padded = model["vocab_size"]  # any padding: unpad_vocab strips it

    def meta(name: str) -> Tensor:
        return torch.empty(canonical_shape(name, model, padded), dtype=dtype(name) if callable(dtype) else dtype,
                           device="meta")

    return [(n, tuple(t.shape), t.dtype) for n, t in iter_canonical_to_hf(meta, model)]


def _tracked(state: Mapping[str, Tensor], used: set[str]) -> Getter:
    def get(name: str) -> Tensor:
        used.add(name)
        return state[name]
    return get


def hf_to_canonical(hf_state: Mapping[str, Tensor], model: dict, padded_vocab: int) -> dict[str, Tensor]:
    """Canonical state dict from a full HF state dict; unknown HF keys are an error."""
    used: set[str] = set()
    out = dict(iter_hf_to_canonical(_tracked(hf_state, used), model, padded_vocab))
    ignorable = {"lm_head.weight"} if model["tie_word_embeddings"] else set()
    extra = sorted(k for k in hf_state if k not in used and k not in ignorable
                   and not k.endswith(_IGNORED_HF_SUFFIXES))
    if extra:
        raise ValueError(f"HF state dict has weights the {model['arch']} model config does not use: {extra[:8]}")
    return out


def canonical_to_hf(canon: Mapping[str, Tensor], model: dict) -> dict[str, Tensor]:
    """HF state dict from a canonical one; unknown canonical keys are an error."""
    used: set[str] = set()
    out = dict(iter_canonical_to_hf(_tracked(canon, used), model))
    # _extra_state entries are megatron bookkeeping, not weights; a tied output_layer (megatron
    # keeps one on the last stage when pp > 1) is a copy of the embedding.
    ignorable = {"output_layer.weight"} if model["tie_word_embeddings"] else set()
    extra = sorted(k for k in canon if k not in used and k not in ignorable and not k.endswith("_extra_state"))
    if extra:
        raise ValueError(f"canonical state dict has weights the model config does not use: {extra[:8]}")
    return out
