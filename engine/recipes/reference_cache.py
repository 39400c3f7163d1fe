"""Precomputed DPO reference log-probs (``dpo.precompute_reference``; TRL's precompute_ref_log_probs).

Before training, one forward-only pass of the frozen reference over every pair the run visits
(``train.steps × global_batch_size``, in the run's data order) gives each pair's log-prob sums
(chosen, rejected). They are kept as a table ``[P, 2]`` indexed by the GLOBAL pair index: the pair
of index i is a function of the config alone (``dpo_micro_batches``), so the table does not depend
on the mesh, and at every step each rank looks up its micro-batches' pairs (``micro_batch_pairs``).
Training then holds no reference model and runs no reference forward.

Who holds what: ``compute_reference`` leaves the sums on the last pipeline stage, where every tp and
cp rank holds the same (already reduced) values. Exactly one rank per pair — last stage, tp and cp
index 0 — writes them into a zero table with a coverage column; one all-reduce over the world then
gives every rank the whole table (adding zeros is exact, so every rank holds the computing rank's
bits), and checks that every pair was filled exactly once. Global rank 0 writes the file
(temporary file + ``os.replace``) and the others wait at a barrier; a later run's rank 0 reads and
verifies it and broadcasts it, so only rank 0 needs to see the cache directory.

The cache file ``<dpo.reference_cache>/<digest>.pt`` is keyed by what changes the values: the data
files (path, size, mtime), the data settings (format, seq_len, overflow, …; the seed, which orders
the pairs), the tokenizer (its files), the reference weights (``model.load``: every file of the
checkpoint directory; else the init seed), the model config and bf16. Not in the key: the mesh,
micro-batch size and kernels, which change the sums only by fp32 round-off (I-5). A file is used
only when its key, shape, dtype and checksum verify and it covers at least the run's pairs; any
other file is rebuilt (never trusted). Reusing a cache written by the same mesh and micro-batch
size gives bitwise the sums the step would compute itself.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict

import torch
import torch.distributed as dist

from engine.parallel.comm import all_reduce_, all_reduce_max_, broadcast_
from engine.recipes.dpo import DPOMicroBatch, compute_reference, dpo_micro_batches, micro_batch_pairs

FORMAT = 1
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)  # what the sums may come as


class ReferenceLogps:
    """The reference's log-prob sums ``[P, 2]`` (chosen, rejected) of the run's pairs, on the
    mesh's device, in fp64 (exact for every ``_DTYPES``); ``dtype``: what ``compute_reference``
    gives, and what ``attach`` hands the loss."""

    def __init__(self, table_P2: torch.Tensor, dtype: torch.dtype, cfg, mesh):
        self.table_P2, self.dtype, self.cfg, self.mesh = table_P2, dtype, cfg, mesh

    def attach(self, micro_batches: list[DPOMicroBatch], step: int) -> None:
        """Fill ``mb.reference`` of this rank's micro-batches of ``step`` (as ``compute_reference``
        would: ``[c_0, r_0, c_1, r_1, …]``) from the table, on the device: no host sync."""
        for mb, pairs in zip(micro_batches, micro_batch_pairs(step, self.cfg, self.mesh), strict=True):
            mb.reference = self.table_P2[pairs.start:pairs.stop].reshape(-1).to(self.dtype)


def cache_path(cfg) -> str:
    """The cache file of this config: ``<dir>/<key digest>.pt``."""
    where = cfg.dpo.reference_cache or os.path.join(cfg.train.output_dir, "reference_logps")
    return os.path.join(where, hashlib.sha256(cache_key(cfg).encode()).hexdigest()[:20] + ".pt")


def cache_key(cfg) -> str:
    """What the reference sums depend on, as canonical JSON (see the module docstring)."""
    from engine.config.hf_model import tokenizer_dir
    from engine.data.cache import data_identity, tree_identity
    from engine.data.records import expand_paths

    data = asdict(cfg.data)
    tokenizer = tokenizer_dir(cfg)
    key = {"format": FORMAT, "data": data, "data_files": [data_identity(f) for f in expand_paths(cfg.data.path)],
           "tokenizer": tree_identity(tokenizer) if tokenizer else None, "model": asdict(cfg.model),
           "reference": tree_identity(cfg.model.load) if cfg.model.load else {"init_seed": cfg.train.seed},
           "seed": cfg.train.seed, "bf16": cfg.train.bf16}
    return json.dumps(key, sort_keys=True, default=str)


def precomputed_reference(cfg, mesh, dataset, build_reference) -> ReferenceLogps:
    """The reference sums of the run's pairs: read from the cache when it verifies, else computed
    by a forward-only pass of ``build_reference()`` (the frozen model, built only then and freed
    before this returns) and written to the cache. Every rank calls it (it communicates)."""
    num_pairs = cfg.train.steps * cfg.train.global_batch_size
    path, key = cache_path(cfg), cache_key(cfg)
    found = None
    if mesh.rank == 0:
        found, why = _read(path, key, num_pairs)
        print(f"reference log-probs: {'read' if found else 'computing'} {path}"
              + ("" if found else f" ({why})"), flush=True)
    header = torch.zeros(2, dtype=torch.int64, device=mesh.device)  # [found, dtype code]
    if found is not None:
        header[0], header[1] = 1, _DTYPES.index(found[1])
    _broadcast(header, mesh)
    if int(header[0]):
        table = found[0].to(mesh.device) if found else torch.empty(num_pairs, 2, dtype=torch.float64,
                                                                    device=mesh.device)
        _broadcast(table, mesh)
        return ReferenceLogps(table, _DTYPES[int(header[1])], cfg, mesh)
    table, dtype = _compute(cfg, mesh, dataset, build_reference, num_pairs)
    if mesh.rank == 0:
        _write(path, key, table.cpu().to(dtype))
    if mesh.layout.world_size > 1:  # a failed write stops every rank here, not at the first step
        dist.barrier()
    return ReferenceLogps(table, dtype, cfg, mesh)


def _compute(cfg, mesh, dataset, build_reference, num_pairs: int) -> tuple[torch.Tensor, torch.dtype]:
    """One forward-only pass over steps 0..steps-1; returns the table (fp64, on every rank) and
    the sums' dtype."""
    from tqdm import tqdm

    from engine.parallel.pipeline.runtime import PipelineRuntime

    runtime = PipelineRuntime(list(build_reference()), mesh)  # as dpo_forward_backward builds it
    # the writer of each pair: tp and cp ranks of the last stage hold identical reduced sums
    writer = mesh.index("tp") == 0 and mesh.index("cp") == 0
    table = torch.zeros(num_pairs, 3, dtype=torch.float64, device=mesh.device)  # chosen, rejected, filled
    code = torch.zeros((), dtype=torch.int64, device=mesh.device)
    steps = num_pairs // cfg.train.global_batch_size
    for step in tqdm(range(steps), desc="reference log-probs", unit="step", file=sys.stderr,
                     disable=mesh.rank != 0):
        micro_batches = dpo_micro_batches(dataset, step, cfg, mesh)
        compute_reference(runtime, micro_batches)
        for mb, pairs in zip(micro_batches, micro_batch_pairs(step, cfg, mesh), strict=True):
            if writer and mb.reference is not None:
                table[pairs.start:pairs.stop, :2] = mb.reference.reshape(-1, 2)
                table[pairs.start:pairs.stop, 2] = 1.0
                code.fill_(_DTYPES.index(mb.reference.dtype) + 1)
    del runtime  # the reference model goes here: training never holds it
    all_reduce_(table, dist.group.WORLD)
    all_reduce_max_(code, dist.group.WORLD)
    filled = table[:, 2]
    assert bool((filled == 1).all()), f"reference pass filled pairs {filled.min()}..{filled.max()} times, not once"
    return table[:, :2].contiguous(), _DTYPES[int(code) - 1]


def _broadcast(t: torch.Tensor, mesh) -> None:
    if mesh.layout.world_size > 1:
        broadcast_(t, dist.group.WORLD)


def _checksum(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _read(path: str, key: str, num_pairs: int) -> tuple[tuple[torch.Tensor, torch.dtype] | None, str]:
    """``((table [num_pairs, 2] fp64, dtype), "")`` of a cache file that verifies, else ``(None, why)``."""
    if not os.path.exists(path):
        return None, "no cache of these data, tokenizer and reference weights yet"
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        logps = saved["logps"]
        ok = (isinstance(saved, dict) and saved.get("format") == FORMAT and isinstance(logps, torch.Tensor)
              and logps.dtype in _DTYPES and logps.dim() == 2 and logps.shape[1] == 2
              and logps.shape[0] == saved["num_pairs"] and _checksum(logps) == saved["sha256"])
    except Exception as e:  # noqa: BLE001 - a damaged file of any kind is rebuilt, not trusted
        return None, f"damaged cache: {type(e).__name__}: {e}"
    if not ok:
        return None, "damaged cache: format, shape or checksum does not verify"
    if saved["key"] != key:
        return None, "stale cache: the data, tokenizer or reference weights changed"
    if logps.shape[0] < num_pairs:
        return None, f"the cache covers {logps.shape[0]} pairs, the run needs {num_pairs}"
    if not bool(torch.isfinite(logps).all()):
        return None, "damaged cache: non-finite values"
    return (logps[:num_pairs].double(), logps.dtype), ""


def _write(path: str, key: str, logps: torch.Tensor) -> None:
    """Atomically: a reader sees the old file or the whole new one, never a partial write."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save({"format": FORMAT, "key": key, "num_pairs": logps.shape[0], "logps": logps,
                    "sha256": _checksum(logps)}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
