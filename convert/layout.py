"""Where each piece of a rank's tensors sits in a torch_dist checkpoint's global tensors (I-8).

Checkpoints are written and read chunk by chunk at megatron-core's global offsets, so a rank
handles only what it holds. Three coordinate systems meet here:

* the **global** tensor of a torch_dist key: decoder layers stacked on a leading layer axis
  (``decoder.layers.mlp.linear_fc1.weight`` is [L, 2F, H]), the vocabulary padded for the saving
  run's tp (see convert/megatron_dist.py);
* a rank's **tp-local** tensor of one canonical tensor: its tp shard. A tp-split tensor is one
  block per logical part: ``linear_fc1`` = [gate; up] globally and tp rank r holds
  [gate_r; up_r], two chunks of the global tensor (rows r·F/tp and F + r·F/tp);
* a **flat range** [lo, hi) of the tp-local tensor: what a ZeRO-1 bucket range or an FSDP2 dim-0
  shard holds. DCP chunks are rectangular, so a flat range is cut into rectangles — a partial
  first row, whole rows, a partial last row (recursively for more dims) — each of which is a
  contiguous run of the range, hence a view of the rank's flat storage.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.model.sharding import layer_of, tp_split

EMBED, OUTPUT, FINAL_NORM = "embedding.word_embeddings.weight", "output_layer.weight", "decoder.final_layernorm.weight"
VOCAB_KEYS = (EMBED, OUTPUT)
STACKED = "decoder.layers."
_TOP = (EMBED, FINAL_NORM, OUTPUT)
# The norms carry the Transformer Engine spec's names (fused into the next linear), for both specs.
_NORMS = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
          "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
_NORMS_BACK = {v: k for k, v in _NORMS.items()}


def dist_key(name: str) -> tuple[str, int | None]:
    """``(torch_dist key, layer index or None)`` of a canonical tensor name."""
    layer = layer_of(name)
    if layer is None:
        if name not in _TOP:
            raise ValueError(f"{name!r} is not a canonical tensor name")
        return name, None
    i, rest = layer
    return STACKED + _NORMS.get(rest, rest), i


def canonical_name(key: str, layer: int | None = None) -> str:
    """Inverse of :func:`dist_key`: the canonical name of layer ``layer`` of ``key``."""
    if layer is None:
        return key
    if not key.startswith(STACKED):
        raise ValueError(f"{key!r} is not a layer-stacked torch_dist key")
    rest = key[len(STACKED):]
    return f"decoder.layers.{layer}.{_NORMS_BACK.get(rest, rest)}"


def canonical_shape(name: str, model: dict, padded_vocab: int) -> tuple[int, ...]:
    """Shape of canonical tensor ``name`` of a model config (ModelConfig fields as a dict)."""
    h, f, nq = model["hidden_size"], model["ffn_hidden_size"], model["num_attention_heads"]
    ng = model.get("num_query_groups") or nq
    d = model.get("kv_channels") or h // nq
    layer = layer_of(name)
    rest = layer[1] if layer else name
    shapes = {EMBED: (padded_vocab, h), OUTPUT: (padded_vocab, h), FINAL_NORM: (h,),
              "input_layernorm.weight": (h,), "pre_mlp_layernorm.weight": (h,),
              "self_attention.linear_qkv.weight": ((nq + 2 * ng) * d, h),
              "self_attention.linear_qkv.bias": ((nq + 2 * ng) * d,),
              "self_attention.linear_proj.weight": (h, nq * d),
              "self_attention.q_layernorm.weight": (d,), "self_attention.k_layernorm.weight": (d,),
              "mlp.linear_fc1.weight": (2 * f, h), "mlp.linear_fc2.weight": (h, f)}
    if rest not in shapes:
        raise ValueError(f"{name!r} is not a canonical tensor name")
    return shapes[rest]


@dataclass(frozen=True)
class Chunk:
    """A rectangle of global tensor ``key`` (``offsets``, ``sizes``, the stacked layer axis
    included) taken from the contiguous run ``[lo, hi)`` of a tp-local tensor's flat storage:
    its data is ``flat[lo:hi].view(sizes)``."""

    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    lo: int
    hi: int


@dataclass(frozen=True)
class Placement:
    """A tp-local tensor of one canonical tensor and where it lies in its global key."""

    key: str
    layer: int | None
    global_shape: tuple[int, ...]
    local_shape: tuple[int, ...]
    tp_dim: int | None
    parts: int
    tp: int
    tp_rank: int

    @classmethod
    def of(cls, name: str, local_shape, tp: int, tp_rank: int, num_layers: int,
           vocab_rows: int | None = None) -> "Placement":
        """The placement of tp rank ``tp_rank``'s shard (shape ``local_shape``) of canonical
        tensor ``name``; ``vocab_rows`` overrides the global rows of a vocabulary tensor (the
        checkpoint's padding, when it was saved at another tp)."""
        key, layer = dist_key(name)
        dim, parts = tp_split(name) or (None, 1)
        full = list(local_shape)
        if dim is not None:
            full[dim] *= tp
        if vocab_rows is not None and key in VOCAB_KEYS:
            full[0] = vocab_rows
        shape = tuple(full) if layer is None else (num_layers, *full)
        return cls(key, layer, shape, tuple(local_shape), dim, parts, tp, tp_rank)

    @property
    def numel(self) -> int:
        return math.prod(self.local_shape)

    def chunks(self, lo: int = 0, hi: int | None = None) -> list[Chunk]:
        """The rectangles of flat range [lo, hi) of the tp-local tensor, in global coordinates."""
        hi = self.numel if hi is None else hi
        out = []
        for a, b, offs, sizes in self._split_parts(flat_rects(self.local_shape, lo, hi)):
            offs = list(offs)
            if self.tp_dim is not None:
                block = self.local_shape[self.tp_dim] // self.parts
                part, within = divmod(offs[self.tp_dim], block)
                offs[self.tp_dim] = part * block * self.tp + self.tp_rank * block + within
            if self.layer is not None:
                offs, sizes = [self.layer, *offs], (1, *sizes)
            out.append(Chunk(self.key, tuple(offs), tuple(sizes), a, b))
        return out

    def _split_parts(self, rects):
        """Rectangles cut where the tp-local tensor's logical parts meet (fc1's gate | up rows):
        the parts sit apart in the global tensor (at tp = 1 they are adjacent: no cut). Parts are
        only ever split along dim 0."""
        if self.parts == 1 or self.tp == 1:
            return rects
        assert self.tp_dim == 0, (self.key, self.tp_dim, self.parts)
        block = self.local_shape[0] // self.parts
        row = math.prod(self.local_shape[1:])
        out = []
        for a, b, offs, sizes in rects:
            start, stop = offs[0], offs[0] + sizes[0]
            while start < stop:
                end = min(stop, (start // block + 1) * block)
                lo = a + (start - offs[0]) * row
                out.append((lo, lo + (end - start) * math.prod(sizes[1:]), (start, *offs[1:]),
                            (end - start, *sizes[1:])))
                start = end
        return out


def flat_rects(shape, lo: int, hi: int) -> list[tuple[int, int, tuple, tuple]]:
    """``(lo, hi, offsets, sizes)`` rectangles covering the row-major flat range [lo, hi) of a
    tensor of ``shape``, in order: a partial first row, whole rows, a partial last row, each cut
    the same way one dimension down when partial. Each is a contiguous flat run."""
    shape = tuple(shape)
    if lo >= hi:
        return []
    if len(shape) <= 1:
        return [(lo, hi, (lo,), (hi - lo,))] if shape else [(lo, hi, (), ())]
    row = math.prod(shape[1:])
    first, last = -(-lo // row), hi // row  # first whole row, row after the last whole one
    if first > last:  # inside one row
        return _in_row(shape, lo // row, lo, hi)
    out = _in_row(shape, first - 1, lo, first * row) if lo < first * row else []
    if first < last:
        out.append((first * row, last * row, (first,) + (0,) * (len(shape) - 1), (last - first, *shape[1:])))
    if last * row < hi:
        out += _in_row(shape, last, last * row, hi)
    return out


def _in_row(shape, r: int, lo: int, hi: int) -> list:
    """:func:`flat_rects` of [lo, hi) inside row ``r`` (one dimension down, offset back)."""
    row = math.prod(shape[1:])
    inner = flat_rects(shape[1:], lo - r * row, hi - r * row)
    return [(a + r * row, b + r * row, (r, *o), (1, *s)) for a, b, o, s in inner]


def row_range(numel: int, rows: int, num: int, slot: int) -> tuple[int, int]:
    """Flat range of slot ``slot``'s share when ``num`` replicas split a tensor of ``numel``
    elements and ``rows`` rows into whole-row parts (the replicas of a replicated state split
    the writing of a checkpoint this way)."""
    row = numel // max(rows, 1)
    return slot * rows // num * row, (slot + 1) * rows // num * row


@dataclass
class Request:
    """Read the rectangle (``offsets``, ``sizes``) of global tensor ``key`` into ``dest`` (a view
    shaped ``sizes``, written in place)."""

    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    dest: torch.Tensor


def clip_rows(req: Request, rows: int, dim: int = 0) -> Request | None:
    """``req`` limited to the first ``rows`` rows of its key along ``dim`` (the real vocabulary:
    padding rows are not read, the caller zeroes them); None when nothing is left."""
    start, size = req.offsets[dim], req.sizes[dim]
    keep = min(start + size, rows) - start
    if keep <= 0:
        return None
    if keep == size:
        return req
    sizes = list(req.sizes)
    sizes[dim] = keep
    return Request(req.key, req.offsets, tuple(sizes), req.dest.narrow(dim, 0, keep))
