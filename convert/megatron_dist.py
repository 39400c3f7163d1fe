"""Megatron's ``torch_dist`` checkpoint format (DESIGN §5, I-6), written without megatron.

One checkpoint directory: the files megatron-core 0.16 ``dist_checkpointing.save`` writes for a
GPTModel, with the common entries Megatron-LM adds and meshtron's own json, as
``dist_checkpointing.load`` and Megatron-LM (``--ckpt-format torch_dist``) read it::

    metadata.json   {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                     "common_backend": "torch", "common_backend_version": 1}
    common.pt       the non-sharded state, torch.save'd: ``args`` (Megatron-LM's Namespace),
                    ``checkpoint_version`` 3.0, ``iteration`` and any extra ``common`` entries
    .metadata       PyTorch distributed-checkpoint (DCP) metadata: global shape, dtype, chunks
    __<r>_0.distcp  DCP data written by rank r (every rank writes its own file, in parallel)
    meshtron.json   {"model": meshtron's model config, "iteration": N}; Megatron ignores it

DCP keys hold global, unsharded tensors, so the checkpoint loads at any (tp, pp). Decoder layers
are stacked along a prepended layer axis (L layers, H hidden, F ffn, d head dim)::

    embedding.word_embeddings.weight                            [V_padded, H]
    decoder.layers.self_attention.linear_qkv.layer_norm_weight  [L, H]   (input_layernorm)
    decoder.layers.self_attention.linear_qkv.weight             [L, (heads + 2·groups)·d, H]
    decoder.layers.self_attention.linear_qkv.bias               [L, (heads + 2·groups)·d]
    decoder.layers.self_attention.linear_proj.weight            [L, H, heads·d]
    decoder.layers.mlp.linear_fc1.layer_norm_weight             [L, H]   (pre_mlp_layernorm)
    decoder.layers.mlp.linear_fc1.weight                        [L, 2F, H]  ([gate; up])
    decoder.layers.mlp.linear_fc2.weight                        [L, H, F]
    decoder.final_layernorm.weight                              [H]
    output_layer.weight                                         [V_padded, H]  (not when tied)
    decoder.layers.<linear>._extra_state/shard_<i>_<L>          bytes of torch.save([None])

A training checkpoint (engine/resume.py) adds, for every model key K, fp32 tensors of K's global
shape with megatron-core's ``fully_sharded_model_space`` optimizer names:
``optimizer.state.exp_avg.K``, ``optimizer.state.exp_avg_sq.K`` (AdamW moments) and, when the
parameters are bf16, ``optimizer.state.fp32_param.K`` (the fp32 master weights).

The norms carry the Transformer Engine spec's names for both specs. Megatron stores swiglu's fc1
as two chunks per tp rank, the gate at rows r·F/tp and the up half at F + r·F/tp, so the global
tensor is [gate; up], as in the canonical state. Chunks are whatever the writers held: a converter
writes one chunk per layer, a training run each rank's tp shard of its layers (cut further where
ZeRO-1 or FSDP2 split it over dp×cp); readers ask for rectangles and DCP assembles them. The
``_extra_state`` objects are empty, but megatron's loader asks for them and DCP fails on a missing
key. ``common.pt`` has no ``content_metadata``, so Megatron-LM reads this stacked layout and not
its ``singleton_local_shards`` one. The ``args`` carry ``no_save_optim``/``no_save_rng``, so
Megatron-LM loads the weights without looking for its own optimizer or rng state.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable

import torch
from torch import Tensor
from torch.distributed.checkpoint.metadata import TensorProperties

from convert.dcp_io import ChunkSavePlanner, DistCheckpoint, StreamingWriter, bytes_item, chunk_item, dcp_save
from convert.files import CheckpointError, fsync_dir, save_durable, trusted_load, write_text_durable
from convert.layout import OUTPUT, STACKED, canonical_name, canonical_shape, dist_key  # noqa: F401 - re-exported

MEGATRON_CONFIG = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                   "common_backend": "torch", "common_backend_version": 1}
COMMON_FILE, META_FILE, MESHTRON_FILE = "common.pt", "metadata.json", "meshtron.json"
CHECKPOINT_VERSION = 3.0
LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
OPTIMIZER_PREFIX = "optimizer.state."
_MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")
_RESERVED = ("args", "checkpoint_version", "iteration", "model", "content_metadata")


def optimizer_key(role: str, key: str) -> str:
    """megatron-core's fully_sharded_model_space name of optimizer state ``role`` (``exp_avg``,
    ``exp_avg_sq``, ``fp32_param``) of model key ``key``."""
    return f"{OPTIMIZER_PREFIX}{role}.{key}"


def extra_state_keys(num_layers: int, linears=LINEARS) -> list[str]:
    """The DCP keys of the (empty) ``_extra_state`` objects megatron expects of each linear."""
    return [f"{STACKED}{lin}._extra_state/shard_{i}_{num_layers}" for lin in linears for i in range(num_layers)]


def extra_state_items(num_layers: int, linears=LINEARS) -> tuple[list, dict]:
    """Write items and data of the ``_extra_state`` objects (what megatron saves: the list of the
    key's ShardedObject data, ``[None]``)."""
    keys = extra_state_keys(num_layers, linears)
    return [bytes_item(k) for k in keys], {(k, None): [None] for k in keys}


# ---------------------------------------------------------------------------------------------
# Save


def save_dist(get: Callable[[str], Tensor], names: list[str], model: dict, out_dir: str, *,
              iteration: int = 0, common: dict | None = None, progress: Callable[[int], None] | None = None,
              padded_vocab: int | None = None, dtype: torch.dtype | None = None) -> None:
    """Write the canonical tensors ``names`` (fetched once each through ``get``, in the order of
    ``names``) as a Megatron ``torch_dist`` checkpoint in ``out_dir``, from a single process,
    atomically.

    Streams: the DCP plan (every chunk's shape and dtype) is made from the model config first —
    vocabulary rows ``padded_vocab`` (default: padded for tp=1), dtype ``dtype`` (default: that
    of the first tensor) — then each tensor is fetched when the writer reaches its chunk, in plan
    order (:class:`~convert.dcp_io.StreamingWriter`), written and dropped: memory holds one tensor,
    plus whatever ``get``'s source produces ahead. ``common`` entries go to the top level of
    ``common.pt``; ``progress(1)`` is called after each canonical tensor.
    """
    from convert.hf_map import padded_vocab_size

    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ValueError(f"{out_dir} already exists and is not empty; choose a new directory or remove it")
    common = dict(common or {})
    clash = [k for k in common if k in _RESERVED]
    if clash:
        raise ValueError(f"common entries {clash} would overwrite the checkpoint's own keys; rename them")
    num_layers = model["num_layers"]
    padded = padded_vocab or padded_vocab_size(model["vocab_size"], model["make_vocab_size_divisible_by"], 1)
    tied = model["tie_word_embeddings"]
    planned = [n for n in names if not (n == OUTPUT and tied)]  # tied: the embedding is the output layer
    layers: dict[str, set[int]] = {}
    for name in planned:
        key, layer = dist_key(name)
        if layer is not None:
            if not 0 <= layer < num_layers:
                raise ValueError(f"{name}: layer {layer} is beyond num_layers={num_layers}")
            layers.setdefault(key, set()).add(layer)
    for key, have in layers.items():
        missing = sorted(set(range(num_layers)) - have)
        if missing:
            raise ValueError(f"{canonical_name(key, missing[0])} (layers {missing}) is missing; every layer "
                             f"of num_layers={num_layers} needs each decoder tensor")
    fetched: dict[str, Tensor] = {}
    if planned:  # common.pt's params_dtype: the first tensor's, which is written first anyway
        fetched[planned[0]] = get(planned[0])
    first_dtype = dtype or (fetched[planned[0]].dtype if planned else torch.float32)
    items, data, props = [], {}, {}
    for name in planned:
        key, layer = dist_key(name)
        shape = canonical_shape(name, model, padded)
        offsets, sizes = ((0,) * len(shape), shape) if layer is None else ((layer,) + (0,) * len(shape), (1, *shape))
        # dtype: given, else each key's first tensor's (set when fetched, before DCP writes the metadata)
        prop = props.setdefault(key, TensorProperties(dtype=dtype or first_dtype))
        items.append(chunk_item(key, offsets, sizes, prop, shape if layer is None else (num_layers, *shape)))
        data[key, offsets] = _fetcher(get, name, shape, prop, dtype is None and layer in (None, 0), layer is not None,
                                      fetched, progress)
    linears = [lin for lin in LINEARS if f"{STACKED}{lin}.weight" in layers]
    extra_items, extra_data = extra_state_items(num_layers, linears)
    if progress is not None and len(planned) < len(names):
        progress(len(names) - len(planned))
    tmp = f"{os.path.normpath(out_dir)}.tmp-{secrets.token_hex(4)}"
    try:
        os.makedirs(tmp)
        dcp_save(ChunkSavePlanner(extra_items + items, {**extra_data, **data}), StreamingWriter(tmp), no_dist=True)
        write_small_files(tmp, model, padded, first_dtype, iteration, common)
        os.replace(tmp, out_dir)  # POSIX: replaces an empty out_dir too
        fsync_dir(os.path.dirname(os.path.abspath(out_dir)))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fetcher(get, name: str, shape, prop, sets_dtype: bool, stacked: bool, fetched: dict, progress):
    def fetch() -> Tensor:
        t = fetched.pop(name) if name in fetched else get(name)
        if sets_dtype:
            prop.dtype = t.dtype
        if tuple(t.shape) != tuple(shape) or t.dtype != prop.dtype:
            raise ValueError(f"{name} is {tuple(t.shape)} {t.dtype}; the model config and the key's first tensor "
                             f"make it {tuple(shape)} {prop.dtype} (a stacked key has one dtype; --dtype casts all)")
        if progress is not None:
            progress(1)
        return t.unsqueeze(0) if stacked else t
    return fetch


def common_state(model: dict, padded: int, dtype: torch.dtype, iteration: int, common: dict | None = None) -> dict:
    """``common.pt``'s content: Megatron-LM's args for the unsharded model (for
    ``--use-checkpoint-args``), checkpoint version, iteration, and ``common``'s entries."""
    from convert.megatron_legacy import megatron_args

    args = megatron_args(model, 1, 1, 1, [model["num_layers"]], padded, dtype, iteration)
    args.ckpt_format, args.use_dist_ckpt = "torch_dist", True
    args.no_save_optim = args.no_save_rng = True  # weights only: Megatron-LM then loads neither
    return {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration, **(common or {})}


def write_small_files(where: str, model: dict, padded: int, dtype: torch.dtype, iteration: int,
                      common: dict | None = None) -> None:
    """``common.pt``, ``meshtron.json`` and, last, ``metadata.json`` (each fsync'd) into ``where``."""
    save_durable(common_state(model, padded, dtype, iteration, common), os.path.join(where, COMMON_FILE))
    write_json(os.path.join(where, MESHTRON_FILE), {"model": model, "iteration": iteration})
    write_json(os.path.join(where, META_FILE), MEGATRON_CONFIG)


def write_json(path: str, obj: dict) -> None:
    write_text_durable(path, json.dumps(obj, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Load


def read_info(path: str) -> tuple[dict, dict]:
    """(model config, meta) of a torch_dist checkpoint, without touching its tensors. meta =
    {"iteration", "common": common.pt's entries other than args, checkpoint_version, iteration}."""
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise FileNotFoundError(f"{path} is not a torch_dist checkpoint: {os.path.join(path, '.metadata')} "
                                f"is missing")
    info_path = os.path.join(path, MESHTRON_FILE)
    if not os.path.isfile(info_path):
        raise FileNotFoundError(f"{info_path} is missing: meshtron needs the model config it writes "
                                f"beside a torch_dist checkpoint (this one was not written by meshtron)")
    with open(info_path) as f:
        info = json.load(f)
    common_path = os.path.join(path, COMMON_FILE)
    try:
        common = trusted_load(common_path) if os.path.isfile(common_path) else {}
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged pickle fails in many ways
        raise CheckpointError(f"{common_path} is damaged ({type(e).__name__}: {e})") from e
    iteration = common.get("iteration", info.get("iteration", 0))
    return info["model"], {"iteration": iteration, "common": {k: v for k, v in common.items() if k not in _RESERVED}}


class DistSource:
    """A torch_dist checkpoint opened for reading: rectangles of its global keys (``read``), or
    whole canonical tensors one at a time (``get``); ``model`` is its model config."""

    def __init__(self, path: str):
        self.model, self.meta = read_info(path)
        self.ckpt = DistCheckpoint(path)

    def names(self) -> list[str]:
        out = []
        for key in self.ckpt.tensor_keys():
            if not key.startswith(_MODEL_PREFIXES):
                continue  # what Megatron-LM or a training run stores beside the model
            if key.startswith(STACKED):
                out += [canonical_name(key, i) for i in range(self.ckpt.shape(key)[0])]
            else:
                out.append(key)
        return out

    def has(self, key: str) -> bool:
        return self.ckpt.has(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.ckpt.shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self.ckpt.dtype(key)

    def read(self, requests) -> None:
        """Fill each :class:`~convert.layout.Request`'s ``dest`` (rectangles of global keys)."""
        self.ckpt.read(requests)

    def get(self, name: str) -> Tensor:
        key, layer = dist_key(name)
        if not self.ckpt.has(key):
            raise KeyError(name)
        return self.ckpt.read_whole(key, () if layer is None else (layer,))


def load_dist(path: str) -> tuple[dict[str, Tensor], dict, dict]:
    """(canonical state dict, model config, meta) of a torch_dist checkpoint directory: the whole
    model in memory, for tests and small models (streaming readers use :class:`DistSource`).
    Tensors keep their stored dtype; meta as in :func:`read_info`."""
    src = DistSource(path)
    return {name: src.get(name) for name in src.names()}, src.model, src.meta
