"""A Hugging Face model directory read in slices, at any mesh, as if it were a torch_dist
checkpoint (I-8): ``model.load`` of an HF directory needs no conversion step.

:class:`HFSource` has the interface engine/checkpoint.py ``load_weights`` reads through (``model``,
``has``, ``shape``, ``dtype``, ``read`` of :class:`~convert.layout.Request` rectangles of the
torch_dist global tensors; see convert/megatron_dist.py ``DistSource``), so every rank asks for
exactly what it holds — its tp shard of its pipeline stage's layers, its vocabulary rows, its
dim-0 shard under FSDP2 — and each rectangle is served by ``safe_open(...).get_slice(name)[...]``,
which copies only those bytes out of the mapped file.

Which HF rows make up each canonical row is not restated here: convert/hf_map.py
``iter_hf_to_canonical`` is run once on index tensors (HF tensor ``j``'s row ``r`` is the number
``j·2⁴⁰ + r``), so its q/k/v interleave per KV group and its [gate; up] concatenation come out as
runs of consecutive HF rows. This holds because every fusion hf_map does is along dim 0; the
other dims of a canonical tensor are its HF tensors' own. Vocabulary rows are not padded here
(``piece_requests`` zeroes the padding and reads only the real rows); a tied model has no
``lm_head.weight`` and its last stage's copy reads the embedding's key.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open

from convert.layout import STACKED, Request, canonical_name, dist_key

_INDEX = "model.safetensors.index.json"
_ROW_BITS = 40  # index tensors: HF tensor id above these bits, its row below


@dataclass(frozen=True)
class Run:
    """Canonical rows [lo, lo + n) are rows [hf_lo, hf_lo + n) of HF tensor ``hf``."""

    lo: int
    n: int
    hf: str
    hf_lo: int


class HFSource:
    """A local HF model directory (config.json + safetensors) served as torch_dist global keys."""

    def __init__(self, path: str):
        from transformers import AutoConfig

        from convert.hf_map import model_config_from_hf

        self.path = path
        self.model = model_config_from_hf(AutoConfig.from_pretrained(path, local_files_only=True))
        self.weight_map = _weight_map(path)
        self._files: dict[str, object] = {}
        self.runs: dict[str, list[Run]] = {}  # canonical name -> its runs of HF rows
        self.shapes: dict[str, tuple[int, ...]] = {}  # torch_dist key -> global shape
        self.dtypes: dict[str, torch.dtype] = {}
        self._map_rows()

    def _map_rows(self) -> None:
        from convert.hf_map import iter_hf_to_canonical

        ids: list[str] = []
        rest: dict[str, tuple[int, ...]] = {}

        def index(name: str) -> torch.Tensor:
            if name not in self.weight_map:
                raise KeyError(name)
            sl = self._file(name).get_slice(name)
            shape = tuple(sl.get_shape())  # the header only: no tensor data is read
            rest[name] = shape[1:]
            ids.append(name)
            return torch.arange(shape[0], dtype=torch.int64) + ((len(ids) - 1) << _ROW_BITS)

        mask = (1 << _ROW_BITS) - 1
        for name, t in iter_hf_to_canonical(index, self.model, self.model["vocab_size"]):
            # a run continues while the number grows by one: same HF tensor, next row
            starts = torch.ones(len(t), dtype=torch.bool)
            starts[1:] = t[1:] - t[:-1] != 1
            lo = starts.nonzero().flatten().tolist()
            runs = [Run(a, b - a, ids[int(t[a]) >> _ROW_BITS], int(t[a]) & mask)
                    for a, b in zip(lo, lo[1:] + [len(t)])]
            tails = {rest[run.hf] for run in runs}
            assert len(tails) == 1, (name, tails)  # fused tensors share their other dims
            self.runs[name] = runs
            key, layer = dist_key(name)
            shape = (len(t), *tails.pop())
            self.shapes[key] = shape if layer is None else (self.model["num_layers"], *shape)
            self.dtypes[key] = _DTYPES[self._file(runs[0].hf).get_slice(runs[0].hf).get_dtype()]

    def _file(self, name: str):
        shard = self.weight_map[name]
        if shard not in self._files:
            self._files[shard] = safe_open(os.path.join(self.path, shard), framework="pt")
        return self._files[shard]

    def has(self, key: str) -> bool:
        return key in self.shapes

    def shape(self, key: str) -> tuple[int, ...]:
        return self.shapes[key]

    def dtype(self, key: str) -> torch.dtype:
        return self.dtypes[key]

    def names(self) -> list[str]:
        return list(self.runs)

    def read(self, requests: list[Request]) -> None:
        """Fill each request's ``dest`` (cast to its dtype) with slices of the HF tensors."""
        for req in requests:
            if req.key not in self.shapes:
                raise KeyError(f"{self.path}: no tensor for {req.key!r}")
            if req.key.startswith(STACKED):  # layer-stacked key: one layer at a time
                for i in range(req.sizes[0]):
                    self._read(canonical_name(req.key, req.offsets[0] + i), req.offsets[1:], req.sizes[1:],
                               req.dest[i])
            else:
                self._read(req.key, req.offsets, req.sizes, req.dest)

    def _read(self, name: str, offsets, sizes, dest: torch.Tensor) -> None:
        lo, hi = offsets[0], offsets[0] + sizes[0]
        inner = tuple(slice(o, o + s) for o, s in zip(offsets[1:], sizes[1:]))
        done = 0
        for run in self.runs[name]:
            a, b = max(lo, run.lo), min(hi, run.lo + run.n)
            if a >= b:
                continue
            rows = slice(run.hf_lo + a - run.lo, run.hf_lo + b - run.lo)
            dest.narrow(0, a - lo, b - a).copy_(self._file(run.hf).get_slice(run.hf)[(rows, *inner)])
            done += b - a
        if done != hi - lo:
            raise ValueError(f"{self.path}: rows [{lo}, {hi}) of {name} are not all in the model's tensors")

    def get(self, name: str) -> torch.Tensor:
        """The whole canonical tensor ``name`` (unpadded vocabulary)."""
        key, layer = dist_key(name)
        shape = self.shapes[key] if layer is None else self.shapes[key][1:]
        out = torch.empty(shape, dtype=self.dtypes[key])
        self._read(name, (0,) * len(shape), shape, out)
        return out


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _weight_map(path: str) -> dict[str, str]:
    """HF tensor name -> its safetensors file, from the index or the single file's header."""
    index = os.path.join(path, _INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    else:
        with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
            weight_map = {k: "model.safetensors" for k in f.keys()}
    missing = sorted({s for s in weight_map.values() if not os.path.isfile(os.path.join(path, s))})
    if missing:
        raise FileNotFoundError(f"{path}: {missing} named in {_INDEX} missing")
    return weight_map
