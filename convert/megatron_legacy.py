"""Megatron-LM's legacy ``torch`` checkpoint format: one pickle per (tp, pp) rank.

Layout, as Megatron-LM's ``checkpointing.py`` reads it with ``--ckpt-format torch``::

    root/latest_checkpointed_iteration.txt                  the iteration number
    root/iter_0000100/mp_rank_TT/model_optim_rng.pt         pp == 1
    root/iter_0000100/mp_rank_TT_PPP/model_optim_rng.pt     pp > 1

Each file holds ``model`` (``model0``, ``model1``, … with virtual pipeline stages): that rank's
megatron-core GPTModel (local spec) state dict with *local* layer numbers; ``args``, the argparse
Namespace Megatron-LM checks on load (``check_checkpoint_args``) and rebuilds the model from
(``--use-checkpoint-args``); ``checkpoint_version`` 3.0; ``iteration``; and any extra top-level
entries (optimizer, scheduler, rng). Legacy files only load at the (tp, pp, vpp) they were written
with, so conversions go through the canonical, unsharded state dict (engine/model/sharding.py).
"""
from __future__ import annotations

import mmap
import os
import re
import secrets
import shutil
from argparse import Namespace
from collections.abc import Callable

import torch
from torch import Tensor

from convert.files import fsync_dir, fsync_file, fsync_tree, trusted_load, write_text_durable
from convert.hf_map import padded_vocab_size
from convert.layout import canonical_shape
from engine.model.sharding import layer_of, stage_layers, tp_split
from engine.parallel.tensor import shard_tensor, unshard_tensor

FILE_NAME = "model_optim_rng.pt"
TRACKER = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 3.0
_EMBED, _OUTPUT = "embedding.word_embeddings.weight", "output_layer.weight"
_FINAL_NORM = "decoder.final_layernorm.weight"
# megatron-core's Column/RowParallelLinear define get/set_extra_state, so a strict load_state_dict
# wants a `<linear>._extra_state` key for each of them (None in the local spec).
_LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
# The Transformer Engine spec fuses each norm into the linear that follows it.
_TE_NORMS = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
             "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}
_RESERVED = re.compile(r"model\d*|args|checkpoint_version|iteration")
# megatron-core's RotaryEmbedding._apply_scaling hard-codes these llama3 values; only the factor is an arg.
_MCORE_LLAMA3 = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}


def rank_dir(tp_rank: int, pp_rank: int, pp: int) -> str:
    """Megatron's per-rank directory name: ``mp_rank_TT`` (pp == 1) or ``mp_rank_TT_PPP``."""
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


# ---------------------------------------------------------------------------------------------
# Save


def save_legacy(get: Callable[[str], Tensor], names: list[str], model: dict, out_dir: str, *, tp: int,
                pp: int, vpp: int = 1, layers_per_stage: list[int] | None = None, iteration: int = 0,
                extra: dict | None = None, progress: Callable[[int], None] | None = None) -> None:
    """Write the canonical tensors ``names`` (fetched once each through ``get``) as a Megatron-LM
    legacy checkpoint at (tp, pp, vpp) into ``out_dir``, atomically.

    Streams: the tp files of a pipeline stage are first written as skeletons (every tensor's shape
    and dtype known from the model config and the first tensor's dtype; ``torch.save`` under
    ``torch.serialization.skip_data``, which reserves the bytes), then mapped (``mmap``, shared)
    and each canonical tensor, once fetched, is cut into its tp shards straight into the files.
    Memory holds one full tensor. ``extra`` entries are stored at the top level of every rank's
    file; ``progress(1)`` is called after each canonical tensor.
    """
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ValueError(f"{out_dir} already exists and is not empty; choose a new directory or remove it")
    if vpp > 1 and pp == 1:
        raise ValueError(f"vpp={vpp} needs pp > 1: Megatron interleaves virtual stages over pipeline ranks")
    extra = dict(extra or {})
    clash = [k for k in extra if _RESERVED.fullmatch(k)]
    if clash:
        raise ValueError(f"extra entries {clash} would overwrite the checkpoint's own keys; rename them")
    stages = stage_layers(model["num_layers"], pp, vpp, layers_per_stage)
    lps = [len(stages[v % pp][v // pp]) for v in range(pp * vpp)]  # model order: stage v = c·pp + r
    padded = padded_vocab_size(model["vocab_size"], model["make_vocab_size_divisible_by"], tp)
    _uneven_split(lps, pp, vpp)  # refuse a split Megatron cannot express before writing anything
    placed = _place(names, model, stages, pp, vpp)
    tmp = f"{os.path.normpath(out_dir)}.tmp-{secrets.token_hex(4)}"
    try:
        ahead = {}
        first = next((name for c in range(vpp) for name, _ in placed[0, c]), None)
        if first is not None:  # params_dtype: that of the first tensor (the embedding), written first anyway
            ahead[first] = get(first)
        dtype = ahead[first].dtype if first is not None else torch.float32
        args = megatron_args(model, tp, pp, vpp, lps, padded, dtype, iteration)
        for r in range(pp):
            paths = [os.path.join(tmp, f"iter_{iteration:07d}", rank_dir(t, r, pp), FILE_NAME) for t in range(tp)]
            _write_skeletons(paths, placed, stages[r], r, pp, tp, model, padded, dtype, args, iteration, extra)
            with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
                files = [trusted_load(path, mmap=True) for path in paths]
            for f in files:
                _copy_tensors(f, extra)  # whatever real tensors ``extra`` holds
            for c in range(vpp):
                key = "model" if vpp == 1 else f"model{c}"
                for name, local in placed[r, c]:
                    full = ahead.pop(name) if name in ahead else get(name)
                    want = canonical_shape(name, model, padded)
                    if local in (_EMBED, _OUTPUT) and full.shape[0] != padded:
                        raise ValueError(f"{name} has {full.shape[0]} rows; Megatron at tp={tp} pads "
                                         f"vocab_size={model['vocab_size']} to {padded}: pad the canonical state "
                                         f"for tp={tp}")
                    if tuple(full.shape) != want or full.dtype != dtype:
                        raise ValueError(f"{name} is {tuple(full.shape)} {full.dtype}; the model config and the "
                                         f"first tensor make it {want} {dtype}")
                    dim, parts = tp_split(local) or (None, 1)
                    for t in range(tp):
                        files[t][key][local].copy_(full if dim is None else shard_tensor(full, dim, parts, tp, t))
                    del full
                    if progress is not None:
                        progress(1)
            del files
            for path in paths:
                fsync_file(path)
        write_text_durable(os.path.join(tmp, TRACKER), str(iteration))
        fsync_tree(tmp)
        os.replace(tmp, out_dir)  # POSIX: replaces an empty out_dir too
        fsync_dir(os.path.dirname(os.path.abspath(out_dir)))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_skeletons(paths, placed, chunks: list[range], r: int, pp: int, tp: int, model: dict, padded: int,
                     dtype: torch.dtype, args, iteration: int, extra: dict) -> None:
    """pp rank ``r``'s tp files with every tensor's bytes reserved, not written (fake tensors
    saved under ``skip_data``: no memory is allocated for them)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    vpp = len(chunks)
    for t, path in enumerate(paths):
        state = {}
        with FakeTensorMode():
            for c in range(vpp):
                sd = {}
                for name, local in placed[r, c]:
                    shape = list(canonical_shape(name, model, padded))
                    dim, _ = tp_split(local) or (None, 1)
                    if dim is not None:
                        shape[dim] //= tp
                    sd[local] = torch.empty(shape, dtype=dtype)
                last = r == pp - 1 and c == vpp - 1
                keys = [f"decoder.layers.{i}.{lin}._extra_state" for i in range(len(chunks[c])) for lin in _LINEARS]
                keys += ["output_layer._extra_state"] if last else []  # the module exists even when tied
                sd.update(dict.fromkeys(keys))
                state["model" if vpp == 1 else f"model{c}"] = sd
        state.update(args=args, checkpoint_version=CHECKPOINT_VERSION, iteration=iteration, **extra)
        os.makedirs(os.path.dirname(path))
        with torch.serialization.skip_data(materialize_fake_tensors=True):
            torch.save(state, path)


def _copy_tensors(mapped, original) -> None:
    """Copy the tensors of ``original`` into the same places of ``mapped`` (``extra`` entries,
    whose bytes the skeleton did not write)."""
    if isinstance(original, dict):
        for k, v in original.items():
            _copy_tensors(mapped[k], v)
    elif isinstance(original, (list, tuple)):
        for a, b in zip(mapped, original):
            _copy_tensors(a, b)
    elif isinstance(original, Tensor):
        mapped.copy_(original)


def _place(names, model, stages, pp, vpp) -> dict[tuple[int, int], list[tuple[str, str]]]:
    """(pp rank, chunk) -> [(canonical name, local name)], in the order of ``names``."""
    where = {i: (r, c, rng.start) for r in range(pp) for c, rng in enumerate(stages[r]) for i in rng}
    placed = {(r, c): [] for r in range(pp) for c in range(vpp)}
    last = (pp - 1, vpp - 1)
    tied = model["tie_word_embeddings"]
    for name in names:
        layer = layer_of(name)
        if layer is not None:
            if layer[0] not in where:
                raise ValueError(f"{name}: layer {layer[0]} is beyond num_layers={model['num_layers']}")
            r, c, start = where[layer[0]]
            placed[r, c].append((name, f"decoder.layers.{layer[0] - start}.{layer[1]}"))
        elif name == _EMBED:
            placed[0, 0].append((name, name))
        elif name == _FINAL_NORM or (name == _OUTPUT and not tied):
            placed[last].append((name, name))
        elif name != _OUTPUT:  # a tied model's output_layer is the embedding; it is not read
            raise ValueError(f"{name!r} is not a canonical tensor name")
    if tied and pp > 1:  # the last stage keeps its own copy of the tied embedding, as Megatron does
        placed[last].append((_EMBED, _OUTPUT))
    return placed


def _uneven_split(lps: list[int], pp: int, vpp: int) -> tuple[int | None, int | None]:
    """Megatron's (decoder_first_pipeline_num_layers, decoder_last_pipeline_num_layers)."""
    if len(set(lps)) == 1:
        return None, None
    per_rank = [sum(lps[c * pp + r] for c in range(vpp)) for r in range(pp)]
    chunks_equal = all(len({lps[c * pp + r] for c in range(vpp)}) == 1 for r in range(pp))
    if not chunks_equal or len(set(per_rank[1:-1])) > 1:
        raise ValueError(f"layers per stage {lps} cannot be expressed in Megatron-LM, which gives all "
                         f"virtual chunks of a pp rank and all middle pp ranks the same number of layers")
    return per_rank[0], per_rank[-1]


def megatron_args(model: dict, tp: int, pp: int, vpp: int, lps: list[int], padded: int,
                   dtype: torch.dtype, iteration: int) -> Namespace:
    heads = model["num_attention_heads"]
    groups = model.get("num_query_groups") or heads
    rope = model.get("rope_scaling")
    base = float(model["rotary_base"])
    first, last = _uneven_split(lps, pp, vpp)
    return Namespace(
        num_layers=model["num_layers"], hidden_size=model["hidden_size"],
        ffn_hidden_size=model["ffn_hidden_size"], num_attention_heads=heads, num_query_groups=groups,
        group_query_attention=groups != heads,
        kv_channels=model.get("kv_channels") or model["hidden_size"] // heads,
        vocab_size=model["vocab_size"], padded_vocab_size=padded,
        make_vocab_size_divisible_by=model["make_vocab_size_divisible_by"],
        max_position_embeddings=model["max_position_embeddings"],
        position_embedding_type="rope",
        # Only Megatron's legacy model reads it; check_checkpoint_args compares it with the run's
        # value, whose parser default is True.
        add_position_embedding=True,
        rotary_base=int(base) if base.is_integer() else base,  # Megatron's --rotary-base is an int
        rotary_percent=1.0, rotary_interleaved=False,
        use_rope_scaling=rope is not None, rope_scaling_factor=float(rope["factor"]) if rope else 8.0,
        normalization="RMSNorm", norm_epsilon=model["norm_epsilon"], apply_layernorm_1p=False,
        swiglu=True, squared_relu=False, add_bias_linear=False, add_qkv_bias=model["add_qkv_bias"],
        qk_layernorm=bool(model.get("qk_layernorm")),  # Megatron-LM's --qk-layernorm
        untie_embeddings_and_output_weights=not model["tie_word_embeddings"],
        attention_dropout=0.0, hidden_dropout=0.0,  # meshtron trains without dropout
        init_method_std=model.get("init_method_std", 0.02),
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        num_virtual_stages_per_pipeline_rank=vpp if vpp > 1 else None,
        num_layers_per_virtual_pipeline_stage=None,
        decoder_first_pipeline_num_layers=first, decoder_last_pipeline_num_layers=last,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        ckpt_format="torch", iteration=iteration,
        # What Megatron's args cannot say: the HF family, and llama3 scaling beyond its factor.
        meshtron_arch=model.get("arch", "llama"), meshtron_rope_scaling=rope,
    )


# ---------------------------------------------------------------------------------------------
# Load


def read_legacy_args(path: str) -> Namespace:
    """The ``args`` Namespace of a legacy checkpoint (root or ``iter_*`` directory)."""
    path = _first_file(_iteration_dir(path))
    return trusted_load(path, mmap=True)["args"]


def load_legacy(path: str) -> tuple[dict[str, Tensor], dict, dict]:
    """(canonical state dict, model config, meta) of a legacy checkpoint (root or ``iter_*`` dir).

    meta = {tp, pp, vpp, layers_per_stage (model order), iteration, extra (rank 0's extra entries)}.
    The whole model ends up in memory (streaming readers use convert/legacy_source.py); files are
    read with ``weights_only=True`` and the allow-list of convert/files.py.
    """
    it_dir = _iteration_dir(path)
    first = _load_file(_first_file(it_dir))
    args = first["args"]
    config = model_config_from_args(args)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    vpp = getattr(args, "virtual_pipeline_model_parallel_size", None) or 1
    extra = {k: v for k, v in first.items() if not _RESERVED.fullmatch(k)}
    iteration = first.get("iteration", getattr(args, "iteration", 0))
    chunks = {}
    for r in range(pp):
        files = [first if (t, r) == (0, 0) else _load_file(os.path.join(it_dir, rank_dir(t, r, pp), FILE_NAME))
                 for t in range(tp)]
        first = None
        for c in range(vpp):
            key = "model" if vpp == 1 else f"model{c}"
            chunks[r, c] = _unshard([_clean(f[key]) for f in files], f"{rank_dir(0, r, pp)} {key}")
        del files
    canon: dict[str, Tensor] = {}
    lps, offset = [], 0
    for v in range(pp * vpp):
        chunk = chunks.pop((v % pp, v // pp))
        layers = {layer_of(k)[0] for k in chunk if layer_of(k)}
        lps.append(len(layers))
        for name, t in chunk.items():
            layer = layer_of(name)
            name = f"decoder.layers.{layer[0] + offset}.{layer[1]}" if layer else name
            if name in canon:
                raise ValueError(f"{name} is held by more than one pipeline stage")
            canon[name] = t
        offset += len(layers)
    if config["tie_word_embeddings"] and _OUTPUT in canon:
        if _EMBED not in canon or not torch.equal(canon[_OUTPUT], canon[_EMBED]):
            raise ValueError("tied output_layer.weight on the last stage differs from the embedding")
        del canon[_OUTPUT]
    meta = {"tp": tp, "pp": pp, "vpp": vpp, "layers_per_stage": lps, "iteration": iteration, "extra": extra}
    return canon, config, meta


def model_config_from_args(args: Namespace) -> dict:
    """meshtron's model config (ModelConfig fields) from a Megatron-LM args Namespace."""
    need = {"swiglu": True, "normalization": "RMSNorm", "add_bias_linear": False,
            "position_embedding_type": "rope"}
    got = {k: getattr(args, k, None) for k in need}
    if got != need:
        raise ValueError(f"checkpoint args {got} describe a model meshtron does not build; it needs {need}")
    heads, hidden = args.num_attention_heads, args.hidden_size
    groups = args.num_query_groups if getattr(args, "group_query_attention", False) else None
    kv = getattr(args, "kv_channels", None)
    rope = getattr(args, "meshtron_rope_scaling", None)
    if rope is None and getattr(args, "use_rope_scaling", False):
        rope = {**_MCORE_LLAMA3, "factor": float(args.rope_scaling_factor)}
    qkv_bias = bool(getattr(args, "add_qkv_bias", False))
    qk_norm = bool(getattr(args, "qk_layernorm", False))
    return {
        "arch": getattr(args, "meshtron_arch", None) or ("qwen3" if qk_norm else "qwen2" if qkv_bias else "llama"),
        "num_layers": args.num_layers, "hidden_size": hidden, "ffn_hidden_size": args.ffn_hidden_size,
        "num_attention_heads": heads, "num_query_groups": groups or heads,
        "kv_channels": None if kv in (None, hidden // heads) else kv,
        "vocab_size": getattr(args, "vocab_size", None) or args.padded_vocab_size,
        "make_vocab_size_divisible_by": args.make_vocab_size_divisible_by,
        "norm_epsilon": float(getattr(args, "norm_epsilon", 1e-5)),
        "rotary_base": float(getattr(args, "rotary_base", 10000)), "rope_scaling": rope,
        "add_qkv_bias": qkv_bias,
        "tie_word_embeddings": not getattr(args, "untie_embeddings_and_output_weights", False),
        "max_position_embeddings": args.max_position_embeddings,
        "init_method_std": float(getattr(args, "init_method_std", 0.02)),
        **({"qk_layernorm": True} if qk_norm else {}),  # (no key when off, as model_config_from_hf)
    }


def _iteration_dir(path: str) -> str:
    tracker = os.path.join(path, TRACKER)
    if os.path.isfile(tracker):
        with open(tracker) as f:
            text = f.read().strip()
        return os.path.join(path, "release" if text == "release" else f"iter_{int(text):07d}")
    if re.fullmatch(r"iter_\d+|release", os.path.basename(os.path.normpath(path))) and os.path.isdir(path):
        return path
    raise FileNotFoundError(f"{path} is neither a Megatron checkpoint root (it has no {TRACKER}) nor an "
                            f"iter_NNNNNNN directory")


def _first_file(it_dir: str) -> str:
    for sub in ("mp_rank_00", "mp_rank_00_000"):
        if os.path.isfile(os.path.join(it_dir, sub, FILE_NAME)):
            return os.path.join(it_dir, sub, FILE_NAME)
    raise FileNotFoundError(f"missing shard file {os.path.join(it_dir, 'mp_rank_00', FILE_NAME)} "
                            f"(or mp_rank_00_000/{FILE_NAME} with pipeline parallelism)")


def _load_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing shard file {path}")
    return trusted_load(path, mmap=True)  # mapped: tensors are read when copied


def _clean(state: dict) -> dict:
    """Weights only (no ``_extra_state``), TE-spec fused norm names mapped to the local spec's."""
    out = {}
    for name, t in state.items():
        if name.endswith("_extra_state"):
            continue
        layer = layer_of(name)
        if layer and layer[1] in _TE_NORMS:
            name = f"decoder.layers.{layer[0]}.{_TE_NORMS[layer[1]]}"
        out[name] = t
    return out


def _unshard(states: list[dict], where: str) -> dict[str, Tensor]:
    """Full tensors from the tp ranks' state dicts of one chunk."""
    for t, state in enumerate(states[1:], 1):
        if state.keys() != states[0].keys():
            diff = sorted(state.keys() ^ states[0].keys())[:4]
            raise ValueError(f"{where}: tp ranks 0 and {t} hold different tensors ({diff})")
    out = {}
    for name in states[0]:
        shards = [s[name] for s in states]
        if any(s.shape != shards[0].shape for s in shards):
            raise ValueError(f"{name} ({where}): tp shards have different shapes "
                             f"{[tuple(s.shape) for s in shards]}")
        dim, parts = tp_split(name) or (None, 1)
        out[name] = unshard_tensor(shards, dim, parts)
    return out
