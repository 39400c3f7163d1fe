"""A legacy (``torch`` format) Megatron checkpoint read in slices, at any mesh (I-8).

Every ``mp_rank_TT[_PPP]/model_optim_rng.pt`` is opened with ``mmap=True`` (only its pickle is
read) and each of its tensors is described as chunks of the torch_dist global tensors
(convert/layout.py): tp rank t's shard of a tp-split tensor at its global offsets, local layer
numbers shifted by the stage's first layer. A read then copies the rectangles a rank asks for out
of the mapped files, touching only those pages, exactly as a torch_dist checkpoint serves them —
so loading weights, and resuming, work the same for both formats.

A training checkpoint in this format (engine/resume.py, ``checkpoint.format: torch``) adds the
optimizer state beside the Megatron files, in ``meshtron_optim/rank_RRRRR.pt`` (one per rank that
held a distinct piece): ``{"chunks": [(key, offsets, sizes, tensor), ...], "shapes": {key:
global shape}}`` with the torch_dist optimizer keys (``optimizer.state.exp_avg.<key>``, …), so a
resume reads its slices of those the same way.
"""
from __future__ import annotations

import os

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorProperties, TensorStorageMetadata
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from convert.files import CheckpointError, trusted_load
from convert.layout import OUTPUT, STACKED, Placement, Request, canonical_name, dist_key
from convert.megatron_legacy import (
    _RESERVED,
    FILE_NAME,
    _clean,
    _first_file,
    _iteration_dir,
    model_config_from_args,
    rank_dir,
)
from engine.model.sharding import layer_of, tp_split

OPTIM_DIR = "meshtron_optim"


def optim_file(it_dir: str, rank: int) -> str:
    return os.path.join(it_dir, OPTIM_DIR, f"rank_{rank:05d}.pt")


class LegacySource:
    """A legacy checkpoint (root or ``iter_*`` directory) opened for slice reads; the interface of
    convert/megatron_dist.py ``DistSource`` (``model``, ``meta``, ``has``, ``shape``, ``dtype``,
    ``read``, ``names``, ``get``)."""

    def __init__(self, path: str):
        self.path = it_dir = _iteration_dir(path)
        first = trusted_load(_first_file(it_dir), mmap=True)
        args = first["args"]
        self.model = model_config_from_args(args)
        tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
        vpp = getattr(args, "virtual_pipeline_model_parallel_size", None) or 1
        keys = ["model"] if vpp == 1 else [f"model{c}" for c in range(vpp)]
        files = {}
        for r in range(pp):
            for t in range(tp):
                where = os.path.join(it_dir, rank_dir(t, r, pp), FILE_NAME)
                if not os.path.isfile(where):
                    raise FileNotFoundError(f"missing shard file {where}")
                files[t, r] = trusted_load(where, mmap=True)
        # layers per (virtual) stage, in model order v = c·pp + r, from tp rank 0's files
        lps = [len({layer_of(k)[0] for k in files[0, v % pp][keys[v // pp]] if layer_of(k)}) for v in range(pp * vpp)]
        self.meta = {"tp": tp, "pp": pp, "vpp": vpp, "layers_per_stage": lps,
                     "iteration": first.get("iteration", getattr(args, "iteration", 0)),
                     "extra": {k: v for k, v in first.items() if not _RESERVED.fullmatch(k)}}
        num_layers, tied = self.model["num_layers"], self.model["tie_word_embeddings"]
        self.stored: dict[str, list[tuple[tuple, tuple, torch.Tensor]]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for (t, r), f in files.items():
            for c, key in enumerate(keys):
                first_layer = sum(lps[:c * pp + r])
                for name, tensor in _clean(f[key]).items():
                    if tensor is None or (name == OUTPUT and tied) or (t > 0 and tp_split(name) is None):
                        continue  # tied copy of the embedding; tp replicas of the norms
                    layer = layer_of(name)
                    canon = f"decoder.layers.{layer[0] + first_layer}.{layer[1]}" if layer else name
                    where = Placement.of(canon, tuple(tensor.shape), tp, t, num_layers)
                    flat = tensor.reshape(-1)  # a view of the mapped file: nothing is read yet
                    self._add(where.key, where.global_shape,
                              [(c.offsets, c.sizes, flat[c.lo:c.hi].view(c.sizes)) for c in where.chunks()])
        optim_dir = os.path.join(it_dir, OPTIM_DIR)
        for name in sorted(os.listdir(optim_dir)) if os.path.isdir(optim_dir) else []:
            f = trusted_load(os.path.join(optim_dir, name), mmap=True)
            for key, offsets, sizes, tensor in f["chunks"]:
                self._add(key, tuple(f["shapes"][key]), [(tuple(offsets), tuple(sizes), tensor)])

    def _add(self, key: str, shape, chunks) -> None:
        if self.shapes.setdefault(key, tuple(shape)) != tuple(shape):
            raise CheckpointError(f"{self.path}: {key} has global shape {self.shapes[key]} in one file and "
                                  f"{tuple(shape)} in another")
        self.stored.setdefault(key, []).extend(chunks)

    def has(self, key: str) -> bool:
        return key in self.stored

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self.shapes:
            raise CheckpointError(f"{self.path} has no tensor {key!r}")
        return self.shapes[key]

    def dtype(self, key: str) -> torch.dtype:
        return self.stored[key][0][2].dtype

    def read(self, requests: list[Request]) -> None:
        """Fill each request's ``dest`` from the mapped files (any chunking on either side)."""
        by_key: dict[str, list[Request]] = {}
        for r in requests:
            by_key.setdefault(r.key, []).append(r)
        for key, reqs in by_key.items():
            stored = self.stored.get(key)
            if stored is None:
                raise CheckpointError(f"{self.path} has no tensor {key!r}")
            md = TensorStorageMetadata(TensorProperties(dtype=stored[0][2].dtype), torch.Size(self.shapes[key]),
                                       [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s, _ in stored])
            local = [ChunkStorageMetadata(torch.Size(r.offsets), torch.Size(r.sizes)) for r in reqs]
            for item in create_read_items_for_chunk_list(key, md, local):
                src = stored[item.storage_index.index][2]
                dest = reqs[item.dest_index.index].dest
                for dim, (a, b, n) in enumerate(zip(item.storage_offsets, item.dest_offsets, item.lengths)):
                    src, dest = src.narrow(dim, a, n), dest.narrow(dim, b, n)
                dest.copy_(src)

    def names(self) -> list[str]:
        out = []
        for key, shape in self.shapes.items():
            if key.startswith(STACKED):
                out += [canonical_name(key, i) for i in range(shape[0])]
            elif not key.startswith("optimizer."):
                out.append(key)
        return out

    def get(self, name: str) -> torch.Tensor:
        """The whole canonical tensor ``name`` (one tensor in memory)."""
        key, layer = dist_key(name)
        if key not in self.shapes:
            raise KeyError(name)
        shape = self.shapes[key] if layer is None else self.shapes[key][1:]
        out = torch.empty(shape, dtype=self.dtype(key))
        offsets = (0,) * len(shape) if layer is None else (layer,) + (0,) * len(shape)
        self.read([Request(key, offsets, shape if layer is None else (1, *shape),
                           out if layer is None else out.unsqueeze(0))])
        return out
