"""Model shapes for the planner: a known-models table, meshtron YAML configs, HF ``config.json``.

Everything the memory and time models need is the architecture of a Llama / Qwen2 / Qwen3 /
Mistral decoder: layers, widths, heads (and a head dim of its own: Qwen3's 128), vocabulary, q/k/v
bias, Qwen3's per-head q/k norms, tied embeddings. :func:`resolve_model`
turns ``--model`` (a known name, a meshtron YAML, a HF ``config.json`` or a directory holding one)
into a :class:`ModelSpec`; :func:`param_counts` counts parameters exactly as meshtron's GPTModel
holds them (Megatron layout, vocabulary padded to ``make_vocab_size_divisible_by · tp``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    """Shown in tables."""
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    """Width of each of gate and up in the SwiGLU MLP."""
    num_attention_heads: int
    num_query_groups: int
    """KV heads (GQA)."""
    vocab_size: int
    """Tokenizer vocabulary (HF ``vocab_size``), before meshtron pads it."""
    head_dim: int
    add_qkv_bias: bool = False
    tie_word_embeddings: bool = False
    make_vocab_size_divisible_by: int = 128
    qk_layernorm: bool = False
    """Qwen3's per-head RMSNorm of q and k: two weights of head_dim per layer, replicated over tp,
    and the QKV projection's output kept for their backward."""
    rotary_base: float | None = None
    """RoPE base of the published model, for ``--emit-config`` (None: not recorded, the default's)."""
    norm_epsilon: float | None = None
    """RMSNorm epsilon of the published model, for ``--emit-config`` (None: not recorded)."""
    max_position_embeddings: int | None = None
    """Longest position the published model was trained for (None: not recorded)."""

    @property
    def arch(self) -> str:
        """meshtron's ``model.arch`` for this shape."""
        return "qwen3" if self.qk_layernorm else "qwen2" if self.add_qkv_bias else "llama"

    def padded_vocab(self, tp: int) -> int:
        """meshtron / Megatron: vocabulary padded to a multiple of ``make_vocab_size_divisible_by · tp``."""
        multiple = self.make_vocab_size_divisible_by * tp
        return int(math.ceil(self.vocab_size / multiple) * multiple)


def _spec(name, L, h, f, H, G, V, bias=False, tie=False) -> ModelSpec:
    return ModelSpec(name, L, h, f, H, G, V, h // H, bias, tie)


def _qwen3(name, L, h, f, H, tie=False) -> ModelSpec:
    """A Qwen3 dense model: head_dim 128 whatever h / H, 8 KV heads, q/k norms, no q/k/v bias,
    vocabulary 151,936, RoPE base 1e6, RMSNorm eps 1e-6, 40,960 positions."""
    return ModelSpec(name, L, h, f, H, 8, 151936, 128, tie_word_embeddings=tie, qk_layernorm=True,
                     rotary_base=1e6, norm_epsilon=1e-6, max_position_embeddings=40960)


# Architectures from each model's published Hugging Face config.json.
KNOWN_MODELS: dict[str, ModelSpec] = {
    "qwen2.5-7b": _spec("qwen2.5-7b", 28, 3584, 18944, 28, 4, 152064, bias=True),
    "qwen2.5-14b": _spec("qwen2.5-14b", 48, 5120, 13824, 40, 8, 152064, bias=True),
    "qwen2.5-72b": _spec("qwen2.5-72b", 80, 8192, 29568, 64, 8, 152064, bias=True),
    "llama3-8b": _spec("llama3-8b", 32, 4096, 14336, 32, 8, 128256),
    "llama3-70b": _spec("llama3-70b", 80, 8192, 28672, 64, 8, 128256),
    "mistral-7b": _spec("mistral-7b", 32, 4096, 14336, 32, 8, 32000),  # Mistral-7B-v0.1
    # HF parameter counts: 0.60B, 1.72B, 4.02B, 8.19B, 14.77B, 32.76B
    "qwen3-0.6b": _qwen3("qwen3-0.6b", 28, 1024, 3072, 16, tie=True),
    "qwen3-1.7b": _qwen3("qwen3-1.7b", 28, 2048, 6144, 16, tie=True),
    "qwen3-4b": _qwen3("qwen3-4b", 36, 2560, 9728, 32, tie=True),
    "qwen3-8b": _qwen3("qwen3-8b", 36, 4096, 12288, 32),
    "qwen3-14b": _qwen3("qwen3-14b", 40, 5120, 17408, 40),
    "qwen3-32b": _qwen3("qwen3-32b", 64, 5120, 25600, 64),
}
_ALIASES = {"llama-3-8b": "llama3-8b", "meta-llama-3-8b": "llama3-8b", "llama-3-70b": "llama3-70b",
            "meta-llama-3-70b": "llama3-70b", "mistral-7b-v0.1": "mistral-7b"}


def known_name(text: str) -> str | None:
    """The table key for a model name (case, an ``org/`` prefix and ``-instruct`` ignored), or None."""
    key = text.strip().lower().rsplit("/", 1)[-1].removesuffix("-instruct")
    key = _ALIASES.get(key, key)
    return key if key in KNOWN_MODELS else None


def resolve_model(text: str) -> ModelSpec:
    """``--model``: a known name, a meshtron YAML (``model:`` section), a HF config.json, or a
    directory with a config.json. Raises ValueError naming ``--model`` and what was expected."""
    key = known_name(text)
    if key is not None:
        return KNOWN_MODELS[key]
    path = os.path.join(text, "config.json") if os.path.isdir(text) else text
    if not os.path.isfile(path):
        raise ValueError(f"--model {text!r} is neither a known model ({', '.join(KNOWN_MODELS)}) nor an existing "
                         f"file or directory (a meshtron YAML, a HF config.json, or a folder holding one)")
    if path.endswith((".yaml", ".yml")):
        return _from_meshtron_yaml(path)
    return _from_hf_config(path)


def _from_meshtron_yaml(path: str) -> ModelSpec:
    from engine.config import ConfigError, load_config

    try:
        m = load_config(path).model
    except ConfigError as e:
        raise ValueError(f"--model {path}: {e}") from None
    return ModelSpec(os.path.basename(path), m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads,
                     m.num_query_groups, m.vocab_size, m.head_dim, m.add_qkv_bias, m.tie_word_embeddings,
                     m.make_vocab_size_divisible_by, m.qk_layernorm)


def _from_hf_config(path: str) -> ModelSpec:
    try:
        with open(path) as f:
            hf = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--model {path}: not a readable JSON config ({e})") from None
    need = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")
    missing = [k for k in need if not isinstance(hf.get(k), int)]
    if missing:
        raise ValueError(f"--model {path}: a HF config.json needs integer {', '.join(missing)}")
    heads = hf["num_attention_heads"]
    return ModelSpec(os.path.basename(os.path.dirname(os.path.abspath(path))) or path, hf["num_hidden_layers"],
                     hf["hidden_size"], hf["intermediate_size"], heads, hf.get("num_key_value_heads") or heads,
                     hf["vocab_size"], hf.get("head_dim") or hf["hidden_size"] // heads,
                     hf.get("model_type") == "qwen2" or bool(hf.get("attention_bias", False)),
                     bool(hf.get("tie_word_embeddings", False)), qk_layernorm=hf.get("model_type") == "qwen3",
                     rotary_base=(hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta")),
                     norm_epsilon=hf.get("rms_norm_eps"), max_position_embeddings=hf.get("max_position_embeddings"))


def layer_params(m: ModelSpec) -> int:
    """Parameters of one decoder layer: two norms (and q/k norms), fused qkv (+ bias), proj,
    fc1 = [gate; up], fc2."""
    qkv_rows = (m.num_attention_heads + 2 * m.num_query_groups) * m.head_dim
    return (layer_norm_params(m) + qkv_rows * m.hidden_size + (qkv_rows if m.add_qkv_bias else 0)
            + m.num_attention_heads * m.head_dim * m.hidden_size + 3 * m.ffn_hidden_size * m.hidden_size)


def layer_norm_params(m: ModelSpec) -> int:
    """The replicated parameters of one decoder layer: its two norms and Qwen3's q/k norms."""
    return 2 * m.hidden_size + (2 * m.head_dim if m.qk_layernorm else 0)


def param_counts(m: ModelSpec, tp: int = 1, layers: int | None = None, first: bool = True,
                 last: bool = True) -> dict[str, int]:
    """Parameters one tp rank holds for a stage of ``layers`` decoder layers (all by default):
    ``{"sharded": …, "replicated": …}`` — sharded tensors hold 1/tp of the full one (Megatron
    layout, padded vocabulary), replicated ones (the norms) are whole on every tp rank."""
    layers = m.num_layers if layers is None else layers
    norms = layer_norm_params(m) * layers + (m.hidden_size if last else 0)
    sharded_layers = (layer_params(m) - layer_norm_params(m)) * layers
    vocab_rows = m.padded_vocab(tp) * m.hidden_size
    embed = vocab_rows if first else 0
    output = vocab_rows if last and (not m.tie_word_embeddings or not first) else 0
    assert sharded_layers % tp == 0 and vocab_rows % tp == 0, (m, tp)
    return {"sharded": (sharded_layers + embed + output) // tp, "replicated": norms}


def hf_param_count(m: ModelSpec) -> int:
    """Parameters of the Hugging Face model (unpadded vocabulary), as 360-LLaMA-Factory trains it."""
    embed = m.vocab_size * m.hidden_size * (1 if m.tie_word_embeddings else 2)
    return m.num_layers * layer_params(m) + embed + m.hidden_size
