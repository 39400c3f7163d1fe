"""Megatron's ``torch_dist`` checkpoint format (DESIGN §5, I-6), written without megatron.

One checkpoint directory: the files megatron-core 0.16 ``dist_checkpointing.save`` writes for a
GPTModel, with the common entries Megatron-LM adds and meshtron's own json, as
``dist_checkpointing.load`` and Megatron-LM (``--ckpt-format torch_dist``) read it::

    metadata.json   {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                     "common_backend": "torch", "common_backend_version": 1}
    common.pt       the non-sharded state, torch.save'd: ``args`` (Megatron-LM's Namespace),
                    ``checkpoint_version`` 3.0, ``iteration`` and any extra ``common`` entries
    .metadata       PyTorch distributed-checkpoint (DCP) metadata: global shape, dtype, chunks
    __0_0.distcp    DCP data (a rank-parallel writer adds ``__<rank>_<n>.distcp`` files)
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

The norms carry the Transformer Engine spec's names for both specs. Megatron stores swiglu's fc1
as two chunks per tp rank, the gate at rows r·F/tp and the up half at F + r·F/tp, so the global
tensor is [gate; up], as in the canonical state. Each layer is its own DCP chunk (offset
(i, 0, …)), as Megatron writes it. The ``_extra_state`` objects are empty, but megatron's loader
asks for them and DCP fails on a missing key. ``common.pt`` has no ``content_metadata``, so
Megatron-LM reads this stacked layout and not its ``singleton_local_shards`` one. The ``args``
carry ``no_save_optim``/``no_save_rng``, so Megatron-LM loads the weights without looking for
optimizer or rng state.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import warnings
from collections.abc import Callable

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

from convert.megatron_io import CheckpointError
from engine.model.sharding import layer_of

MEGATRON_CONFIG = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                   "common_backend": "torch", "common_backend_version": 1}
COMMON_FILE, META_FILE, MESHTRON_FILE = "common.pt", "metadata.json", "meshtron.json"
CHECKPOINT_VERSION = 3.0
LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
_EMBED, _OUTPUT = "embedding.word_embeddings.weight", "output_layer.weight"
_TOP = (_EMBED, "decoder.final_layernorm.weight", _OUTPUT)
_STACKED = "decoder.layers."
_MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")
_NORMS = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
          "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
_NORMS_BACK = {v: k for k, v in _NORMS.items()}
_RESERVED = ("args", "checkpoint_version", "iteration", "model", "content_metadata")
# dcp's single-process mode warns on every call that it assumes a single process: we mean that.
_NO_DIST_WARNING = "torch.distributed is disabled, unavailable or uninitialized"


def dist_key(name: str) -> tuple[str, int | None]:
    """``(torch_dist key, layer index or None)`` of a canonical tensor name."""
    layer = layer_of(name)
    if layer is None:
        if name not in _TOP:
            raise ValueError(f"{name!r} is not a canonical tensor name")
        return name, None
    i, rest = layer
    return _STACKED + _NORMS.get(rest, rest), i


def canonical_name(key: str, layer: int | None = None) -> str:
    """Inverse of :func:`dist_key`: the canonical name of layer ``layer`` of ``key``."""
    if layer is None:
        return key
    if not key.startswith(_STACKED):
        raise ValueError(f"{key!r} is not a layer-stacked torch_dist key")
    rest = key[len(_STACKED):]
    return f"decoder.layers.{layer}.{_NORMS_BACK.get(rest, rest)}"


def extra_state_keys(num_layers: int, linears=LINEARS) -> list[str]:
    """The DCP keys of the (empty) ``_extra_state`` objects megatron expects of each linear."""
    return [f"{_STACKED}{lin}._extra_state/shard_{i}_{num_layers}" for lin in linears for i in range(num_layers)]


# ---------------------------------------------------------------------------------------------
# Save


class ChunkPlanner(DefaultSavePlanner):
    """A DCP save planner for a prepared list of chunks (``chunk_item``s and BYTE_IO items) with
    their data keyed by ``(key, chunk offsets)``, rather than a state dict. Each chunk is handed to
    the writer once and then dropped, so memory shrinks as the files grow. A rank-parallel writer
    gives each rank's planner only that rank's chunks; DCP merges the plans into one metadata."""

    def __init__(self, items: list[WriteItem], data: dict):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._items, self._data = items, data

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(list(self._items))
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        obj = self._data.pop((write_item.index.fqn, write_item.index.offset))
        return self.transform_object(write_item, obj)  # torch.save's non-tensor objects into bytes


def chunk_item(key: str, t: Tensor, offsets: tuple, global_shape: tuple) -> WriteItem:
    """The DCP write item of ``t`` as the chunk at ``offsets`` of global tensor ``key``."""
    offsets = torch.Size(offsets)
    return WriteItem(index=MetadataIndex(key, offsets), type=WriteItemType.SHARD, tensor_data=TensorWriteData(
        chunk=ChunkStorageMetadata(offsets=offsets, sizes=t.shape),
        properties=TensorProperties.create_from_tensor(t), size=torch.Size(global_shape)))


def save_dist(get: Callable[[str], Tensor], names: list[str], model: dict, out_dir: str, *,
              iteration: int = 0, common: dict | None = None,
              progress: Callable[[int], None] | None = None) -> None:
    """Write the canonical tensors ``names`` (fetched once each through ``get``) as a Megatron
    ``torch_dist`` checkpoint in ``out_dir``, from a single process, atomically.

    Memory holds the model once: DCP has to know every chunk's shape and dtype before it writes
    the first byte, so all tensors are fetched first, then written layer by layer as per-layer
    chunks (no stacked copy is made) and each is released once written. ``common`` entries go to
    the top level of ``common.pt``; ``progress(1)`` is called after each canonical tensor.
    """
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ValueError(f"{out_dir} already exists and is not empty; choose a new directory or remove it")
    common = dict(common or {})
    clash = [k for k in common if k in _RESERVED]
    if clash:
        raise ValueError(f"common entries {clash} would overwrite the checkpoint's own keys; rename them")
    num_layers = model["num_layers"]
    fetched: dict[str, dict[int | None, Tensor]] = {}
    for name in names:
        if not (name == _OUTPUT and model["tie_word_embeddings"]):  # tied: the embedding is the output layer
            key, layer = dist_key(name)
            if layer is not None and not 0 <= layer < num_layers:
                raise ValueError(f"{name}: layer {layer} is beyond num_layers={num_layers}")
            fetched.setdefault(key, {})[layer] = get(name)
        if progress is not None:
            progress(1)
    items, data = _plan(fetched, num_layers)
    state = {"args": _args(model, fetched.get(_EMBED, {}).get(None), iteration),
             "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration, **common}
    del fetched  # the planner now holds the only references, and drops each once written
    tmp = f"{os.path.normpath(out_dir)}.tmp-{secrets.token_hex(4)}"
    try:
        os.makedirs(tmp)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NO_DIST_WARNING)
            dcp.save({}, storage_writer=dcp.FileSystemWriter(tmp), planner=ChunkPlanner(items, data), no_dist=True)
        torch.save(state, os.path.join(tmp, COMMON_FILE))
        _write_json(os.path.join(tmp, MESHTRON_FILE), {"model": model, "iteration": iteration})
        _write_json(os.path.join(tmp, META_FILE), MEGATRON_CONFIG)  # last: marks a complete checkpoint
        os.replace(tmp, out_dir)  # POSIX: replaces an empty out_dir too
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _plan(fetched: dict[str, dict[int | None, Tensor]], num_layers: int) -> tuple[list[WriteItem], dict]:
    """DCP write items (one chunk per layer) and their data, keyed by (key, chunk offsets)."""
    items, data = [], {}
    for key, per_layer in fetched.items():
        if None in per_layer:
            t = per_layer[None]
            offsets = (0,) * t.dim()
            items.append(chunk_item(key, t, offsets, t.shape))
            data[key, torch.Size(offsets)] = t
            continue
        missing = sorted(set(range(num_layers)) - per_layer.keys())
        if missing:
            raise ValueError(f"{canonical_name(key, missing[0])} (layers {missing}) is missing; every layer "
                             f"of num_layers={num_layers} needs each decoder tensor")
        first = per_layer[0]
        for i in range(num_layers):
            t = per_layer[i]
            if t.shape != first.shape or t.dtype != first.dtype:
                raise ValueError(f"{canonical_name(key, i)} is {tuple(t.shape)} {t.dtype} but layer 0 has "
                                 f"{tuple(first.shape)} {first.dtype}; a stacked key needs them equal")
            offsets = (i,) + (0,) * t.dim()
            items.append(chunk_item(key, t.unsqueeze(0), offsets, (num_layers, *t.shape)))
            data[key, torch.Size(offsets)] = t.unsqueeze(0)
    linears = [lin for lin in LINEARS if f"{_STACKED}{lin}.weight" in fetched]
    for key in extra_state_keys(num_layers, linears):
        items.append(WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO))
        data[key, None] = [None]  # what megatron saves: the list of this key's ShardedObject data
    return items, data


def _args(model: dict, embed: Tensor | None, iteration: int):
    """Megatron-LM's args Namespace for the unsharded model, for ``--use-checkpoint-args``."""
    from convert.hf_map import padded_vocab_size
    from convert.megatron_legacy import megatron_args

    padded = embed.shape[0] if embed is not None else padded_vocab_size(
        model["vocab_size"], model["make_vocab_size_divisible_by"], 1)
    dtype = embed.dtype if embed is not None else torch.float32
    args = megatron_args(model, 1, 1, 1, [model["num_layers"]], padded, dtype, iteration)
    args.ckpt_format, args.use_dist_ckpt = "torch_dist", True
    args.no_save_optim = args.no_save_rng = True  # weights only: Megatron-LM then loads neither
    return args


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


# ---------------------------------------------------------------------------------------------
# Load


def check_files(path: str, metadata) -> dict[str, list[str]]:
    """Every shard file the metadata points at exists and holds the bytes it should; returns the
    files of each key (for messages). A missing or truncated file is named in the error."""
    files: dict[str, list[str]] = {}
    need: dict[str, int] = {}
    for index, info in metadata.storage_data.items():
        where = os.path.join(path, info.relative_path)
        need[where] = max(need.get(where, 0), info.offset + info.length)
        files.setdefault(index.fqn, [])
        if where not in files[index.fqn]:
            files[index.fqn].append(where)
    for where, size in sorted(need.items()):
        if not os.path.isfile(where):
            raise CheckpointError(f"{where} is missing: the checkpoint {path} is incomplete (its .metadata lists it)")
        have = os.path.getsize(where)
        if have < size:
            raise CheckpointError(f"{where} is truncated: {have} bytes, the checkpoint's .metadata needs {size}")
    return files


def load_dist(path: str) -> tuple[dict[str, Tensor], dict, dict]:
    """(canonical state dict, model config, meta) of a torch_dist checkpoint directory.

    meta = {"iteration", "common": common.pt's entries other than args, checkpoint_version,
    iteration}. Tensors keep their stored dtype. Memory holds the model plus one stacked key.
    ``common.pt`` is a pickle (Megatron stores a Namespace): load only trusted checkpoints.
    """
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
    common = torch.load(common_path, map_location="cpu", weights_only=False) if os.path.isfile(common_path) else {}
    try:
        metadata = dcp.FileSystemReader(path).read_metadata()
    except Exception as e:  # noqa: BLE001 - unpickling a damaged file fails in many ways
        raise CheckpointError(f"{os.path.join(path, '.metadata')} is damaged ({type(e).__name__}: {e})") from e
    files = check_files(path, metadata)
    canon: dict[str, Tensor] = {}
    for key, md in metadata.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata) or not key.startswith(_MODEL_PREFIXES):
            continue  # _extra_state objects, and what Megatron-LM stores beside the model
        full = torch.empty(md.size, dtype=md.properties.dtype)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NO_DIST_WARNING)
            try:
                dcp.load({key: full}, storage_reader=dcp.FileSystemReader(path), no_dist=True)
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"{path}: cannot read {key!r} from {', '.join(files.get(key, ['its shards']))} "
                                      f"({type(e).__name__}): the file is damaged") from e
        if key.startswith(_STACKED):
            for i in range(full.shape[0]):  # own storage: a view would pin (and pickle) the whole stack
                canon[canonical_name(key, i)] = full[i].clone()
        else:
            canon[key] = full
        del full
    iteration = common.get("iteration", info.get("iteration", 0))
    meta = {"iteration": iteration, "common": {k: v for k, v in common.items() if k not in _RESERVED}}
    return canon, info["model"], meta
