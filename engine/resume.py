"""Training checkpoints: every N steps, atomic and durable, the last K kept, resumed exactly — with
every rank writing and reading only what it holds, in parallel (DESIGN §5, I-8).

``<checkpoint.dir>/iter_NNNNNNN`` with ``checkpoint.format: torch_dist`` (the default)::

    metadata.json  common.pt  meshtron.json    Megatron torch_dist (convert/megatron_dist.py),
    .metadata  __<rank>_0.distcp               written by DCP, every rank its own file:
        <model key>                                  the weights (model dtype)
        optimizer.state.exp_avg.<model key>          AdamW moments, fp32, the key's global shape
        optimizer.state.exp_avg_sq.<model key>
        optimizer.state.fp32_param.<model key>       fp32 masters (bf16 training only)
    meshtron_train.pt    {"step", "optimizer_step", "scheduler_step", "data_position", "moments",
                          "run", "mesh", "sharding", "format"}: small, written by rank 0
    rng/rank_RRRRR.pt    each rank's own RNG (torch CPU, python, its own CUDA device's)

and with ``checkpoint.format: torch`` (Megatron-LM's legacy layout, convert/megatron_legacy.py)::

    mp_rank_TT[_PPP]/model_optim_rng.pt    by dp×cp replica 0 of each (tp, pp) rank: ``model``
                                           (``model0``… with vpp), ``args``, ``iteration``
    meshtron_optim/rank_RRRRR.pt            the optimizer-state chunks of each rank that holds
                                           distinct ones (convert/legacy_source.py)
    meshtron_train.pt  rng/                 as above

plus Megatron's ``latest_checkpointed_iteration.txt`` in the root.

Who writes what. Each rank writes the pieces of its tp-local parameters its optimizer holds
(``MeshOptimizer.checkpoint_pieces``): ZeRO-1 its bucket ranges, FSDP2 its dim-0 shards, both
weights and states; with the replicated state the dp×cp replicas split every tensor by rows. The
tp replicas of the norms are written by tp rank 0, the last stage's tied copy of the embedding by
no one (the first stage writes the embedding). No rank gathers anything.

Resume at any mesh, any sharding: every rank asks for the rectangles of the global tensors it
holds — weights: its tp shard of its layers (its dim-0 shard under FSDP2); states: its pieces —
and reads them alone, no communication (convert/layout.py maps a piece to rectangles, DCP or the
mapped legacy files assemble them from whatever chunks were written). Same mesh and sharding:
bit-exact, RNG included; another mesh: the RNG states are not restored (said once: the model has
no dropout, so only randomness outside the model would differ).

Safety. A save goes to ``iter_NNNNNNN.new``; every file is fsync'd, then rank 0 fsyncs the
directory, renames it into place, fsyncs the root and rewrites the tracker. ``.new``/``.old``
directories and ``*.tmp*`` files that a killed save leaves in the checkpoint root are removed by
rank 0 when the next run starts (:func:`prepare_checkpoint_dir`). Pruning (``checkpoint.keep``)
removes only ``iter_*`` directories whose ``meshtron_train.pt`` carries this run's id: a run is a
fresh start and every resume continuing it (a resume adopts the id of its checkpoint), so other
runs' checkpoints and anything a user put beside them are never touched.
"""
from __future__ import annotations

import errno
import os
import random
import re
import secrets
import shutil
import weakref

import torch

from convert.dcp_io import ChunkSavePlanner, StreamingWriter, chunk_item, dcp_save
from convert.files import CheckpointError, fsync_dir, fsync_tree, save_durable, trusted_load
from convert.megatron_dist import extra_state_items, optimizer_key, write_small_files
from engine import faults
from engine.checkpoint import (
    check_model_matches,
    model_chunks,
    model_dict,
    owned_pieces,
    piece_requests,
    placement,
    trainable_entries,
    weight_requests,
)
from engine.manifest import file_entries, list_files, merge_entries, verify_manifest, write_manifest

STATE_FILE = "meshtron_train.pt"
RNG_DIR = "rng"
_ITER = re.compile(r"^iter_(\d{7})$")
# what a killed save leaves in the checkpoint root (removed at the next start)
_LEFTOVER = re.compile(r"^(iter_\d{7}\.(new|old)|\.?iter_\d{7}.*\.tmp-[0-9a-f]+"
                       r"|latest_checkpointed_iteration\.txt\.tmp)$")
_RUNS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # optimizer -> id of the run it trains


def checkpoint_root(cfg) -> str:
    return cfg.checkpoint.dir or os.path.join(cfg.train.output_dir, "checkpoints")


def _barrier(mesh) -> None:
    if mesh.layout.world_size > 1:
        torch.distributed.barrier()


def _mesh_info(mesh) -> dict:
    return {a: getattr(mesh, a) for a in ("dp", "pp", "tp", "cp", "hp")} | {"world": mesh.layout.world_size}


def _weights_dtype(opt) -> torch.dtype:
    return getattr(opt.state, "param_dtype", None) or opt.params[0].dtype


# ---------------------------------------------------------------------------------------------
# Save


def save_training_checkpoint(model, opt, mesh, cfg, step: int, storage_writer=None) -> str | None:
    """:func:`_save`; a full disk (ENOSPC) on this rank becomes one clear :class:`CheckpointError`:
    the partial ``.new`` directory is never published (the next start removes it) and the
    previous checkpoint stays the latest."""
    try:
        return _save(model, opt, mesh, cfg, step, storage_writer)
    except Exception as e:  # DCP wraps a rank's OSError in its own exception
        if not _is_enospc(e):
            raise
        root = checkpoint_root(cfg)
        tracker = os.path.join(root, "latest_checkpointed_iteration.txt")
        latest = None
        if os.path.isfile(tracker):
            with open(tracker) as f:
                latest = f.read().strip()
        kept = f"iteration {int(latest)} stays the latest checkpoint" if latest else "no earlier checkpoint exists"
        raise CheckpointError(f"checkpoint of step {step} not written: no space left on device in {root}; "
                              f"its partial directory iter_{step:07d}.new is not used (removed at the next "
                              f"start) and {kept} — free space or point checkpoint.dir elsewhere, then "
                              f"restart with train.resume=auto") from e


def _is_enospc(e: BaseException | None, depth: int = 0) -> bool:
    """An ENOSPC anywhere in ``e``: its cause chain or DCP's per-rank failures."""
    if e is None or depth > 8:
        return False
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return True
    nested = [e.__cause__, e.__context__, getattr(e, "exc", None)]
    nested += [getattr(f, "exc", f) for f in (getattr(e, "failures", None) or {}).values()]
    return any(isinstance(n, BaseException) and _is_enospc(n, depth + 1) for n in nested)


def _save(model, opt, mesh, cfg, step: int, storage_writer=None) -> str | None:
    """Weights, optimizer state, schedule, data position and RNG after ``step`` optimizer steps,
    written by every rank in parallel (every rank must call it); returns the published directory
    on global rank 0 (None elsewhere).

    ``storage_writer``: ``callable(path) -> torch.distributed.checkpoint.StorageWriter`` replacing
    DCP's file writer (the simulator's sink, ``meshtron-plan --simulate``). With it, DCP plans on
    this rank alone (``no_dist=True``: a fake process group cannot carry DCP's object
    collectives), every other cross-rank step (barriers) is skipped, the small files (json,
    ``common.pt``, ``meshtron_train.pt``, this rank's RNG) are written for real into
    ``<checkpoint dir>/iter_NNNNNNN.new``, nothing is published (no rename, tracker or pruning)
    and that directory is returned. Everything else is the real path: the same pieces, planner
    and items; tensors reach the writer as views (fake tensors under FakeTensorMode: nothing here
    reads their data). Only ``checkpoint.format: torch_dist`` takes a writer.
    """
    sim = storage_writer is not None
    fmt = cfg.checkpoint.format
    if sim and fmt != "torch_dist":
        raise ValueError("a storage_writer replaces DCP's writer: it needs checkpoint.format=torch_dist")
    root = checkpoint_root(cfg)
    final = os.path.join(root, f"iter_{step:07d}")
    tmp = f"{final}.new"
    if mesh.rank == 0 and not sim:
        shutil.rmtree(tmp, ignore_errors=True)  # a save of this iteration killed midway
    if mesh.rank == 0 or sim:
        os.makedirs(os.path.join(tmp, RNG_DIR), exist_ok=True)
    if not sim:
        _barrier(mesh)  # the directory exists (shared file system) before anyone writes
    run = _RUNS.setdefault(opt, secrets.token_hex(8))
    chunk0 = model_chunks(model)[0]
    md, dtype = model_dict(chunk0.cfg), _weights_dtype(opt)
    if fmt == "torch_dist":
        items, data = _dist_items(model, opt, mesh, dtype)
        if mesh.rank == 0:  # the (empty) _extra_state objects megatron's loader asks for
            extra_items, extra_data = extra_state_items(md["num_layers"])
            items, data = extra_items + items, {**extra_data, **data}
        no_dist = sim or mesh.layout.world_size == 1
        dcp_save(ChunkSavePlanner(items, data), storage_writer(tmp) if sim else StreamingWriter(tmp), no_dist=no_dist)
    else:
        from engine.resume_legacy import save_legacy_files

        save_legacy_files(model, opt, mesh, cfg, tmp, step, dtype)
    save_durable(_rng_state(mesh), os.path.join(tmp, RNG_DIR, f"rank_{mesh.rank:05d}.pt"))
    faults.in_save(step, mesh.rank)
    if mesh.rank == 0:
        state = {"step": step, "optimizer_step": opt.step_count, "scheduler_step": opt.step_count,
                 "data_position": step, "moments": opt.step_count > 0, "run": run, "mesh": _mesh_info(mesh),
                 "sharding": opt.sharding, "format": fmt}
        save_durable(state, os.path.join(tmp, STATE_FILE))
        if fmt == "torch_dist":
            write_small_files(tmp, md, chunk0.padded_vocab, dtype, step)
    if sim:
        return tmp
    _barrier(mesh)  # every rank's files are written and fsync'd
    parts = _checksum_share(tmp, mesh)  # every rank checksums its share of the files, read in parallel
    if mesh.rank == 0:
        write_manifest(tmp, merge_entries(parts))  # before the rename: a published checkpoint has one
        _publish(tmp, final, root, step)
        if cfg.checkpoint.keep > 0:
            _prune(root, cfg.checkpoint.keep, run)
    _barrier(mesh)  # published: any rank may read it now
    return final if mesh.rank == 0 else None


def _checksum_share(tmp: str, mesh) -> list[dict] | None:
    """Entries (size, crc32) of this rank's share of the files of ``tmp`` (``rank::world`` of the
    sorted list: balanced, whoever wrote them), gathered to rank 0 (None elsewhere)."""
    world = mesh.layout.world_size
    part = file_entries(tmp, list_files(tmp)[mesh.rank::world])
    if world == 1:
        return [part]
    parts = [None] * world if mesh.rank == 0 else None
    torch.distributed.gather_object(part, parts, dst=0)
    return parts


def _verify(where: str, mesh) -> None:
    """The checkpoint against its manifest (engine/manifest.py; none: skipped), every rank checking
    all sizes and its share of the checksums; a failure on any rank is the same one CheckpointError
    naming the file on every rank (no rank goes on to read a damaged checkpoint)."""
    world = mesh.layout.world_size
    try:
        verify_manifest(where, mesh.rank, world)
        err = None
    except CheckpointError as e:
        err = e
    if world == 1:
        if err is not None:
            raise err
        return
    msgs = [None] * world
    torch.distributed.all_gather_object(msgs, None if err is None else str(err))
    first = next((m for m in msgs if m), None)
    if first is not None:
        raise CheckpointError(first) from err


def _dist_items(model, opt, mesh, dtype: torch.dtype) -> tuple[list, dict]:
    """DCP write items (global rectangles of the weights and fp32 states this rank writes) and
    their data, resolved lazily as views (cast to the model dtype for FSDP2's fp32 weights)."""
    items, data = [], {}
    for where, lo, hi, roles in owned_pieces(model, opt, mesh):
        for role, flat in roles.items():
            if role == "fp32_param" and not opt.mixed:
                continue  # an offloaded fp32 master equals the weights
            for c in where.chunks(lo, hi):
                key, to = (c.key, dtype) if role == "param" else (optimizer_key(role, c.key), torch.float32)
                items.append(chunk_item(key, c.offsets, c.sizes, to, where.global_shape))
                data[key, c.offsets] = (lambda f=flat, a=c.lo - lo, b=c.hi - lo, s=c.sizes, d=to: f[a:b].view(s).to(d))
    return items, data


def _rng_state(mesh) -> dict:
    """This rank's own generators: never another GPU's (get_rng_state_all would touch them all)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "coords": dict(mesh.coords),
             "mesh": _mesh_info(mesh)}
    if mesh.device.type == "cuda" and torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state(mesh.device)
    return state


def _publish(tmp: str, final: str, root: str, step: int) -> None:
    from convert.megatron_io import write_tracker

    fsync_tree(tmp)
    if os.path.exists(final):  # a rerun into the same directory replaces that iteration
        old = f"{final}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    fsync_dir(root)
    write_tracker(root, step)


def _prune(root: str, keep: int, run: str) -> None:
    """Remove all but the last ``keep`` of this run's ``iter_*`` checkpoints (see the module
    docstring); anything else in ``root`` stays."""
    ours = []
    for d in sorted(os.listdir(root)):
        path = os.path.join(root, d, STATE_FILE)
        if _ITER.match(d) and os.path.isfile(path):
            try:
                if trusted_load(path).get("run") == run:
                    ours.append(d)
            except Exception:  # noqa: BLE001 - unreadable: not provably ours, keep it
                continue
    for d in ours[:-keep]:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def prepare_checkpoint_dir(cfg, mesh) -> None:
    """Before training: rank 0 removes what a killed save left in the checkpoint root (``.new``
    and ``.old`` directories, ``*.tmp*`` files of meshtron's own names; nothing else)."""
    root = checkpoint_root(cfg)
    if mesh.rank == 0 and os.path.isdir(root):
        for d in os.listdir(root):
            if _LEFTOVER.match(d):
                path = os.path.join(root, d)
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
    _barrier(mesh)


# ---------------------------------------------------------------------------------------------
# Resume


def find_resume(cfg) -> str | None:
    """The checkpoint directory to resume from, per ``train.resume``."""
    from convert.megatron_io import resolve
    from convert.megatron_legacy import _iteration_dir

    what = cfg.train.resume
    if what == "none":
        return None
    path = checkpoint_root(cfg) if what == "auto" else what
    if what == "auto" and not os.path.isfile(os.path.join(path, "latest_checkpointed_iteration.txt")):
        return None
    fmt, where = resolve(path)
    if fmt == "torch":
        where = _iteration_dir(where)
    if not os.path.isfile(os.path.join(where, STATE_FILE)):
        raise FileNotFoundError(f"train.resume={what}: {where} has no {STATE_FILE} (weights only); use it as "
                                f"model.load to start a new run from its weights")
    return where


def load_training_checkpoint(model, opt, mesh, where: str) -> int:
    """Restore everything saved by :func:`save_training_checkpoint` (at this mesh and sharding or
    any other); every rank reads only its own slices. Returns the step to start at."""
    from convert.megatron_io import open_megatron

    _verify(where, mesh)  # a truncated file or a flipped byte: one error naming it, never a wrong tensor
    path = os.path.join(where, STATE_FILE)
    try:
        state = trusted_load(path)
    except Exception as e:  # noqa: BLE001 - a truncated or overwritten file fails in many ways
        raise CheckpointError(f"{path} is damaged ({type(e).__name__}: {e}); resume from an earlier "
                              f"checkpoint (train.resume=PATH)") from e
    if not isinstance(state, dict) or not {"optimizer_step", "data_position"} <= state.keys():
        raise CheckpointError(f"{path} is damaged (not the training state meshtron writes: no optimizer_step "
                              f"or data_position); resume from an earlier checkpoint (train.resume=PATH)")
    source = open_megatron(where)
    check_model_matches(source.model, model_chunks(model)[0].cfg, where)
    entries = trainable_entries(model)
    first = placement(*entries[0]).key
    moments = source.has(optimizer_key("exp_avg", first))
    opt.restore_step(state["optimizer_step"], moments)
    with torch.no_grad():
        requests = weight_requests(model, source)
        for i, lo, hi, roles in opt.checkpoint_pieces():
            chunk, local, p = entries[i]
            where_ = placement(chunk, local, p)
            for role, flat in roles.items():
                if role == "param" or (role == "fp32_param" and flat is roles["param"]):
                    continue  # the weights were asked for above (FSDP2's fp32 shards are the masters)
                key = optimizer_key(role, where_.key)
                if role == "fp32_param" and not source.has(key):
                    key = where_.key  # saved by an fp32 run: the weights are the masters
                requests += piece_requests(where_, flat, lo, hi, key, chunk.cfg.vocab_size, source)
        source.read(requests)
    _restore_rng(where, mesh)
    _RUNS[opt] = state.get("run") or secrets.token_hex(8)
    return state["data_position"]


def _restore_rng(where: str, mesh) -> None:
    """This rank's RNG, when the checkpoint's mesh is this run's (else said once, by rank 0)."""
    path = os.path.join(where, RNG_DIR, f"rank_{mesh.rank:05d}.pt")
    try:
        saved = trusted_load(path) if os.path.isfile(path) else None
    except Exception as e:  # a truncated or overwritten file fails in many ways
        raise CheckpointError(f"{path} is damaged ({type(e).__name__}: {e}); resume from an earlier "
                              f"checkpoint (train.resume=PATH)") from e
    if saved is None or saved["mesh"] != _mesh_info(mesh) or saved["coords"] != dict(mesh.coords):
        if mesh.rank == 0:
            was = saved["mesh"] if saved else "unknown"
            print(f"RNG state not restored: {where} was saved at mesh {was}, this run is {_mesh_info(mesh)} "
                  f"(the model has no dropout; only a same-mesh resume repeats the random streams)", flush=True)
        return
    torch.set_rng_state(saved["torch"])
    random.setstate(saved["python"])
    if mesh.device.type == "cuda" and torch.cuda.is_available():
        if "cuda" in saved:
            torch.cuda.set_rng_state(saved["cuda"], mesh.device)
        elif mesh.rank == 0:
            print(f"CUDA RNG state not restored: {where} was saved without CUDA", flush=True)
