"""Model weights in and out of training at any mesh, never more than a rank's own shards plus one
tensor (I-8): load either Megatron format, export Hugging Face.

Loading (``model.load``, and the weights of a resume): every rank asks the checkpoint for the
rectangles of the global tensors it holds — its tp shard of its pipeline layers, only its dim-0
shard under FSDP2 — and reads them straight into its parameters: torch_dist through DCP chunk
reads (convert/dcp_io.py), the legacy format from its per-(tp, pp) files mapped with mmap
(convert/legacy_source.py), a Hugging Face model directory through safetensors slices
(convert/hf_source.py). Vocabulary rows past ``vocab_size`` are zeros, whatever tp padded
them for in the checkpoint; the last stage's tied copy (``output_layer.weight``) reads the
embedding's key.

Export: global rank 0 lays out the safetensors files from the model config alone
(convert/hf_io.py ``ShardLayout``); then every pipeline stage writes its own tensors into them in
parallel. One canonical tensor at a time is gathered over tp (and over dp×cp under FSDP2) and
cut into HF tensors on the stage's writer (tp rank 0 of dp×cp replica 0), which writes each at its
offset: the files are byte-identical to a single-process ``save_file`` of each shard.
"""
from __future__ import annotations

import dataclasses
import os
import shutil

import torch

from convert.layout import VOCAB_KEYS, Placement, Request, clip_rows, row_range

# model config fields that define the architecture (the rest is bookkeeping or init)
ARCH_FIELDS = ("arch", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
               "num_query_groups", "kv_channels", "vocab_size", "norm_epsilon", "rotary_base",
               "rope_scaling", "add_qkv_bias", "tie_word_embeddings", "qk_layernorm")


def check_model_matches(saved: dict, cfg_model, path: str) -> None:
    """The run's model section must describe the checkpoint's architecture."""
    ours = dataclasses.asdict(cfg_model)
    # a field newer than the checkpoint (qk_layernorm) is absent from it: its default applies
    saved = {"qk_layernorm": False, **saved}
    diff = {k: (ours[k], saved.get(k)) for k in ARCH_FIELDS if _norm(ours[k]) != _norm(saved.get(k))}
    if diff:
        fix = ", ".join(f"model.{k}={v[1]!r}" for k, v in diff.items())
        raise ValueError(f"model.load={path}: the checkpoint's model differs from the config in "
                         f"{sorted(diff)}; set {fix}")


def _norm(v):
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else v


def model_dict(cfg_model) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg_model).items() if k != "load"}


def model_chunks(model) -> list:
    """The GPTModel chunks of ``model`` (a GPTModel, or a ModuleList of pipeline chunks)."""
    return list(model) if isinstance(model, torch.nn.ModuleList) else [model]


# ---------------------------------------------------------------------------------------------
# What a rank holds, where it goes


def held(p: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """``(flat view, lo, hi)``: what this rank holds of parameter ``p``'s tp-local tensor — all of
    it, or under FSDP2 its dim-0 shard (``torch.chunk`` rows, as FSDP2 cuts them)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(p, DTensor):
        t = p.detach()
        return t.view(-1), 0, t.numel()
    local = p.to_local()
    rows, num, slot = p.shape[0], p.device_mesh.size(), p.device_mesh.get_coordinate()[0]
    start = min(slot * -(-rows // num), rows) * (p.numel() // rows)
    return local.view(-1), start, start + local.numel()


def placement(chunk, local_name: str, p: torch.Tensor) -> Placement:
    """Where this rank's tp shard of ``chunk``'s parameter ``local_name`` lies in its global key."""
    return Placement.of(chunk.canonical_name(local_name), tuple(p.shape), chunk.mesh.tp, chunk.mesh.index("tp"),
                        chunk.cfg.num_layers)


def piece_requests(where: Placement, flat: torch.Tensor, lo: int, hi: int, key: str, vocab: int | None,
                   source) -> list[Request]:
    """Requests filling ``flat`` (the elements [lo, hi) of a tp-local tensor) from global tensor
    ``key`` of ``source``. A vocabulary tensor is zeroed, then only its first ``vocab`` rows (of
    those the checkpoint has) are read."""
    out = []
    if where.key in VOCAB_KEYS:
        flat.zero_()
        rows = min(vocab, source.shape(key)[0])
    for c in where.chunks(lo, hi):
        req = Request(key, c.offsets, c.sizes, flat[c.lo - lo:c.hi - lo].view(c.sizes))
        if where.key in VOCAB_KEYS:
            req = clip_rows(req, rows)
        if req is not None:
            out.append(req)
    return out


def weight_requests(model, source) -> list[Request]:
    """Requests that load every parameter of ``model`` (what this rank holds of each) from
    ``source``. An fp32 parameter reads the checkpoint's fp32 masters when it has them."""
    from convert.megatron_dist import optimizer_key

    out = []
    for chunk in model_chunks(model):
        for name, p in chunk.named_parameters():
            where = placement(chunk, name, p)
            key = where.key
            if p.dtype == torch.float32 and source.has(optimizer_key("fp32_param", key)):
                key = optimizer_key("fp32_param", key)
            flat, lo, hi = held(p)
            with torch.no_grad():
                out += piece_requests(where, flat, lo, hi, key, chunk.cfg.vocab_size, source)
    return out


def load_weights(model, path: str, source=None) -> None:
    """Copy what this rank holds of every parameter of ``model`` (a GPTModel or a ModuleList of
    chunks) from the checkpoint at ``path`` (either format, any mesh it was saved at), or from the
    Hugging Face model directory at ``path`` (its safetensors sliced per rank, convert/hf_source.py)."""
    from convert.megatron_io import open_megatron
    from engine.config.hf_model import is_hf_model_dir

    if source is None and is_hf_model_dir(path):
        from convert.hf_source import HFSource

        source = HFSource(path)
    source = source or open_megatron(path)
    check_model_matches(source.model, model_chunks(model)[0].cfg, path)
    with torch.no_grad():
        source.read(weight_requests(model, source))


# ---------------------------------------------------------------------------------------------
# What a rank writes


def replica_index(mesh) -> int:
    """This rank's index in its dp×cp group (dp-major, as ``mesh.index("dp_cp")``), from its
    coordinates alone (no tensor op: the simulator's mesh may run under FakeTensorMode)."""
    return mesh.coords["dp"] * mesh.cp + mesh.coords["cp"]


def trainable_entries(model) -> list[tuple]:
    """(chunk, local name, parameter) of every trainable parameter, aligned with the optimizer's
    ``params`` (``model.parameters()`` order)."""
    out = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            idx, local = name.split(".", 1) if isinstance(model, torch.nn.ModuleList) else (None, name)
            out.append((model[int(idx)] if idx is not None else model, local, p))
    return out


def owned_pieces(model, opt, mesh, split: bool = True):
    """``(placement, lo, hi, roles)`` of the pieces this rank writes: what its optimizer holds,
    less the tp replicas of tp-replicated tensors (tp rank 0 writes them) and the last stage's
    tied copy of the embedding (the first stage writes it); with ``split``, a replicated state's
    pieces are split by rows over the dp×cp replicas (each writes its share)."""
    entries = trainable_entries(model)
    num, slot = mesh.dp * mesh.cp, replica_index(mesh)
    for i, lo, hi, roles in opt.checkpoint_pieces():
        chunk, local, p = entries[i]
        where = placement(chunk, local, p)
        if (local == "output_layer.weight" and chunk.shares_embedding) or (where.tp_dim is None and mesh.index("tp")):
            continue
        if split and not opt.state.sharded and num > 1:
            a, b = row_range(hi - lo, where.local_shape[0], num, slot)
            roles, lo, hi = {k: v[a:b] for k, v in roles.items()}, lo + a, lo + b
        if lo < hi:
            yield where, lo, hi, roles


# ---------------------------------------------------------------------------------------------
# Hugging Face export


def export_hf(model, mesh, out_dir: str, tokenizer_from: str | None = None, dtype: torch.dtype | None = None,
              max_shard_bytes: int = 5 * 2**30) -> None:
    """Write the model as a Hugging Face directory (every rank must call it; see the module
    docstring). ``dtype``: the exported dtype (default: the parameters')."""
    from convert.hf_io import ShardLayout, commit_output_dir
    from convert.hf_map import hf_config_from_model_config, hf_tensor_specs, iter_canonical_to_hf_part
    from torch.distributed.tensor import DTensor

    chunks = model_chunks(model)
    md = model_dict(chunks[0].cfg)
    dtype = dtype or next(model.parameters()).dtype
    layout = ShardLayout.plan(hf_tensor_specs(md, dtype), max_shard_bytes)
    out_dir = os.path.abspath(out_dir)
    tmp = os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.tmp-export")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ValueError(f"checkpoint.export_hf={out_dir} exists and is not empty; choose a new directory or empty it")
    world = mesh.layout.world_size
    if mesh.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by an export that was killed
        os.makedirs(tmp)
        layout.create(tmp)
    _barrier(world)
    fsdp = any(isinstance(p, DTensor) for p in model.parameters())
    replica0 = replica_index(mesh) == 0
    writer = replica0 and mesh.index("tp") == 0
    if fsdp or replica0:  # the gathers run over tp (and dp×cp under FSDP2)
        files = layout.open(tmp) if writer else None
        for chunk in chunks:
            layers = range(chunk.layer_offset, chunk.layer_offset + len(chunk.decoder.layers))
            for name, t in iter_canonical_to_hf_part(_gatherer(chunk, dtype), md, layers, chunk.pre_process,
                                                     chunk.post_process):
                if writer:
                    files.write(name, t)
        if writer:
            files.close()
    _barrier(world)
    if mesh.rank == 0:
        config = hf_config_from_model_config(md, "bfloat16" if dtype == torch.bfloat16 else "float32")
        layout.finish(tmp, config, tokenizer_from)
        commit_output_dir(tmp, out_dir)
    _barrier(world)


def _gatherer(chunk, dtype: torch.dtype):
    """``get(canonical name)``: the whole canonical tensor of one of ``chunk``'s parameters, in
    ``dtype``; collective over tp (and dp×cp for an FSDP2 DTensor), for one tensor at a time."""
    from torch.distributed.tensor import DTensor

    from engine.parallel.comm import gather_shards
    from engine.parallel.fsdp import full_tensor

    params = {chunk.canonical_name(n): p for n, p in chunk.named_parameters()}
    tp = chunk.mesh.tp

    def get(name: str) -> torch.Tensor:
        p = params[name]
        # an offloaded FSDP2 shard is on the host: full_tensor gathers it on the device (I-7)
        t = (full_tensor(p, chunk.mesh.device) if isinstance(p, DTensor) else p.detach()).to(dtype)
        if p.tp_dim is None or tp == 1:
            return t
        shards = gather_shards(t, chunk.mesh.group("tp"))
        dim, parts = p.tp_dim, p.tp_parts
        shape = list(t.shape)
        shape[dim] *= tp
        full = t.new_empty(shape)  # each shard's blocks copied into place: no intermediate copies
        block = t.shape[dim] // parts
        for r, shard in enumerate(shards):
            for j, piece in enumerate(shard.split(block, dim)):
                full.narrow(dim, (j * tp + r) * block, block).copy_(piece)
        return full

    return get


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()
