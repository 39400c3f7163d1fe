"""Training checkpoints: every N steps, atomic, keep the last K, resume exactly (DESIGN §5).

A checkpoint is Megatron's torch_dist weights (``iter_NNNNNNN``) plus ``meshtron_train.pt`` beside
them: the canonical AdamW moments (and fp32 master weights under bf16), the optimizer step, the
data position and the RNG state. Everything is canonical (unsharded), so a run resumes at any
mesh; resuming at the same mesh is bit-exact.
"""
from __future__ import annotations

import os
import random
import re
import shutil

import torch

from engine.checkpoint import gather_canonical, load_weights, save_torch_dist
from engine.model.gpt import GPTModel
from engine.parallel.tensor import shard_tensor

STATE_FILE = "meshtron_train.pt"
_ITER = re.compile(r"^iter_(\d{7})$")


def checkpoint_root(cfg) -> str:
    return cfg.checkpoint.dir or os.path.join(cfg.train.output_dir, "checkpoints")


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_training_checkpoint(model, opt, mesh, cfg, step: int) -> str | None:
    """Weights + optimizer + schedule + data position + RNG after ``step`` optimizer steps.
    Sharded optimizer states (ZeRO-1, FSDP2) are gathered to the same canonical tensors as whole
    ones, so the checkpoint does not depend on ``optim.sharding``."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    local = opt.local_state()
    moments = {}
    for key in ("exp_avg", "exp_avg_sq"):
        moments[key] = gather_canonical(model, mesh, {n: t for n, t in zip(names, local[key]) if t is not None})
    masters = gather_canonical(model, mesh, dict(zip(names, local["masters"]))) if local["masters"] else None
    extra = None
    if mesh.rank == 0:
        extra = {STATE_FILE: {"step": step, "optimizer_step": opt.step_count, "moments": moments,
                              "masters": masters, "rng": _rng_state(), "data_position": step}}
    root = checkpoint_root(cfg)
    with opt.full_weights():
        out = save_torch_dist(model, mesh, root, step, extra)
    if mesh.rank == 0 and cfg.checkpoint.keep > 0:
        _prune(root, cfg.checkpoint.keep)
    return out


def _prune(root: str, keep: int) -> None:
    iters = sorted(d for d in os.listdir(root) if _ITER.match(d))
    for d in iters[:-keep]:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def find_resume(cfg) -> str | None:
    """The checkpoint directory to resume from, per ``train.resume``."""
    from convert.megatron_io import resolve

    what = cfg.train.resume
    if what == "none":
        return None
    path = checkpoint_root(cfg) if what == "auto" else what
    if what == "auto" and not os.path.isfile(os.path.join(path, "latest_checkpointed_iteration.txt")):
        return None
    fmt, where = resolve(path)
    if not os.path.isfile(os.path.join(where, STATE_FILE)):
        raise FileNotFoundError(f"train.resume={what}: {where} has no {STATE_FILE} (weights only); use it as "
                                f"model.load to start a new run from its weights")
    return where


def load_training_checkpoint(model, opt, mesh, where: str) -> int:
    """Restore everything saved by :func:`save_training_checkpoint`; returns the step to start at."""
    path = os.path.join(where, STATE_FILE)
    try:
        state = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - a truncated or overwritten file fails in many ways
        from convert.megatron_io import CheckpointError

        raise CheckpointError(f"{path} is damaged ({type(e).__name__}: {e}); resume from an earlier "
                              f"checkpoint (train.resume=PATH)") from e
    with opt.full_weights(writeback=True):
        for chunk in model:
            load_weights(chunk, where)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    tp, tp_rank = mesh.tp, mesh.index("tp")
    local = {"exp_avg": [], "exp_avg_sq": [], "masters": []}
    for name, p in zip(names, opt.params):
        chunk, local_name = _chunk_of(model, name)
        canon = chunk.canonical_name(local_name)
        shard = lambda t: shard_tensor(_repad(t, chunk, canon), p.tp_dim, p.tp_parts, tp, tp_rank)  # noqa: E731
        local["masters"].append(shard(state["masters"][canon]) if opt.mixed and state["masters"] is not None
                                else None)
        for key in ("exp_avg", "exp_avg_sq"):
            local[key].append(shard(state["moments"][key][canon]) if canon in state["moments"][key] else None)
    # sharded states take their slice of every parameter's whole tensor: all or nothing
    stepped = all(t is not None for t in local["exp_avg"])
    opt.load_local_state(local["exp_avg"] if stepped else None, local["exp_avg_sq"] if stepped else None,
                         local["masters"] if all(t is not None for t in local["masters"]) else None,
                         state["optimizer_step"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["data_position"]


def _chunk_of(model, name: str) -> tuple[GPTModel, str]:
    idx, local = name.split(".", 1)
    return model[int(idx)], local


def _repad(t: torch.Tensor, chunk: GPTModel, canon: str) -> torch.Tensor:
    """Vocabulary rows re-padded for this run's tp (the checkpoint may come from another)."""
    if canon not in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return t
    vocab, padded = chunk.cfg.vocab_size, chunk.padded_vocab
    return torch.cat([t[:vocab], t.new_zeros(padded - vocab, t.shape[1])])
