"""Sharded checkpoint I/O in a world (DESIGN I-8): every rank writes and reads only what it holds.

One world of 4 gloo ranks: a bf16 run (fp32 masters, AdamW moments) at tp2 × pp2 with ZeRO-1 is
given known weights and states ("truth", drawn per canonical tensor, independent of the mesh) and
saved; the checkpoint's global tensors equal the truth; every rank wrote its own file; the save
and the resume at the same mesh stay within the rank's own shard + the largest single tensor +
10 % (MemTracker), while the old gather-everything path exceeds that bound on rank 0; the
checkpoint resumes at dp4 ZeRO-1 with buckets cut mid-row, at tp2 × dp2 FSDP2 and at tp2 × dp2
unsharded, every piece equal to the truth, and those meshes' saves read back as the truth too;
the HF export written by both pipeline stages in parallel is byte-identical to a one-process
export and stays within a few copies of one tensor.
The legacy format written by training (tp2 × pp2) loads in megatron-core's GPTModel with
``strict=True`` and resumes exactly; a torch_dist checkpoint written by 4 ZeRO-1 ranks with
partial-row chunks loads through megatron-core's ``dist_checkpointing.load`` at tp 1 and 2.
"""
from __future__ import annotations

import hashlib
import json
import os
from functools import partial

import pytest
import torch

from tests.harness import run_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
BIG = ["model.num_layers=8", "model.hidden_size=256", "model.ffn_hidden_size=704", "model.num_attention_heads=8",
       "model.num_query_groups=4", "model.vocab_size=500", "model.tie_word_embeddings=true", "train.bf16=true"]



def truth(kind: str, name: str, shape, vocab: int) -> torch.Tensor:
    """A canonical tensor of known values, independent of the mesh: vocabulary rows past
    ``vocab`` are zeros (as every resume leaves them)."""
    seed = int.from_bytes(hashlib.sha256(f"{kind}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)
    g = torch.Generator().manual_seed(seed)
    vocab_tensor = name in ("embedding.word_embeddings.weight", "output_layer.weight")
    t = torch.zeros(shape)
    rows = vocab if vocab_tensor else shape[0]
    t[:rows] = torch.randn((rows, *shape[1:]), generator=g)
    return t


def _kind(role: str) -> str:
    return "w" if role in ("param", "fp32_param") else role


def _shard_of(full, p, mesh):
    from engine.parallel.tensor import shard_tensor

    return shard_tensor(full, p.tp_dim, p.tp_parts, mesh.tp, mesh.index("tp")) if p.tp_dim is not None else full


def fill(model, opt, mesh, step: int) -> None:
    """Weights and optimizer state set to the truth, through the model's own sharding
    (load_canonical, shard_tensor) and flat piece ranges — not through convert/layout.py."""
    from engine.checkpoint import model_chunks, trainable_entries

    for chunk in model_chunks(model):
        chunk.load_canonical({chunk.canonical_name(n): truth("w", chunk.canonical_name(n), chunk.full_shape(n),
                                                             chunk.cfg.vocab_size)
                              for n, _ in chunk.named_parameters()})
    opt.restore_step(step, True)
    entries = trainable_entries(model)
    with torch.no_grad():
        for i, lo, hi, roles in opt.checkpoint_pieces():
            chunk, local, p = entries[i]
            canon = chunk.canonical_name(local)
            for role, flat in roles.items():
                if role != "param":
                    full = truth(_kind(role), canon, chunk.full_shape(local), chunk.cfg.vocab_size)
                    flat.copy_(_shard_of(full, p, mesh).reshape(-1)[lo:hi])


def mismatches(model, opt, mesh) -> list[str]:
    """Pieces (weights and states) of this rank that differ from the truth."""
    from engine.checkpoint import held, model_chunks, trainable_entries

    bad = []
    for chunk in model_chunks(model):
        for n, p in chunk.named_parameters():
            canon = chunk.canonical_name(n)
            flat, lo, hi = held(p)
            want = _shard_of(truth("w", canon, chunk.full_shape(n), chunk.cfg.vocab_size), p, mesh)
            if not torch.equal(flat, want.reshape(-1)[lo:hi].to(flat.dtype)):
                bad.append(f"weight {canon}")
    entries = trainable_entries(model)
    for i, lo, hi, roles in opt.checkpoint_pieces():
        chunk, local, p = entries[i]
        canon = chunk.canonical_name(local)
        for role, flat in roles.items():
            full = truth(_kind(role), canon, chunk.full_shape(local), chunk.cfg.vocab_size)
            if not torch.equal(flat, _shard_of(full, p, mesh).reshape(-1)[lo:hi].to(flat.dtype)):
                bad.append(f"{role} {canon} [{lo}, {hi})")
    return bad


def _setup(overrides, world, dp=None):
    from engine.config import load_config, validate
    from engine.mesh import ParallelMesh
    from engine.optim import MeshOptimizer
    from engine.train import build_model

    cfg = validate(load_config(TINY, overrides), world)
    p = cfg.parallel
    mesh = ParallelMesh.build(tp=p.tp, pp=p.pp, dp=p.dp, cp=p.cp)
    model = build_model(cfg, mesh)
    return cfg, mesh, model, MeshOptimizer(model, cfg.optim, mesh, 10)


def _own_bytes(model, opt) -> int:
    seen = {}
    for t in list(model.parameters()) + opt.state.state_tensors():
        t = t.to_local() if hasattr(t, "to_local") else t
        s = t.untyped_storage()
        seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
    return sum(seen.values())


def _tracked(fn, model, opt) -> tuple[int, object]:
    """(peak minus starting tensor bytes while ``fn`` runs, its result), by MemTracker."""
    from torch.distributed._tools.mem_tracker import MemTracker

    mt = MemTracker()
    mt.track_external(model, opt.adam, *opt.state.state_tensors())  # the masters are not the optimizer's own
    def total(kind):  # meta tensors (shapes planned from the config) hold no memory
        return sum(v["Total"] for dev, v in mt.get_tracker_snapshot(kind).items() if torch.device(dev).type != "meta")

    start = total("current")
    with mt:
        out = fn()
    return total("peak") - start, out


def _old_gather(model, opt, mesh):
    """What save and export did before I-8: every canonical tensor (weights, moments, masters)
    assembled over tp and sent to pp rank 0 with gather_object."""
    import torch.distributed as dist

    from engine.model.gpt import canonical_tensors
    from engine.checkpoint import trainable_entries

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    kept = []
    for role in ("param", "fp32_param", "exp_avg", "exp_avg_sq"):
        local = {}
        for i, lo, hi, roles in opt.checkpoint_pieces():
            local[names[i]] = roles[role].view(trainable_entries(model)[i][2].shape)
        full = canonical_tensors(model, local)
        parts = [None] * mesh.pp if mesh.index("pp") == 0 else None
        dist.gather_object(full, parts, dst=mesh.ranks("pp")[0], group=mesh.group("pp"))
        kept.append(parts)
    return kept


def _read_back(path: str) -> list[str]:
    """Keys of the checkpoint at ``path`` (read whole, one process) that differ from the truth."""
    from convert.layout import canonical_name
    from convert.megatron_dist import OPTIMIZER_PREFIX, DistSource

    src = DistSource(path)
    vocab = src.model["vocab_size"]
    bad = []
    for key in src.ckpt.tensor_keys():
        role, model_key = ("w", key)
        if key.startswith(OPTIMIZER_PREFIX):
            role, model_key = key[len(OPTIMIZER_PREFIX):].split(".", 1)
        full = src.ckpt.read_whole(key)
        layers = range(full.shape[0]) if model_key.startswith("decoder.layers.") else [None]
        for i in layers:
            name = canonical_name(model_key, i)
            got = full if i is None else full[i]
            want = truth(_kind(role), name, tuple(got.shape), vocab).to(got.dtype)
            if not torch.equal(got, want):
                bad.append(f"{key}[{i}]")
    return bad


def world_fn(rank, world, root):
    import torch.distributed as dist

    from engine.checkpoint import export_hf
    from engine.resume import load_training_checkpoint, save_training_checkpoint

    out = {}
    # -- A: bf16 + fp32 masters, ZeRO-1 at tp2 x pp2: save, memory, read back, resume -------------
    base = BIG + ["optim.sharding=zero1"]
    cfg, mesh, model, opt = _setup(base + ["parallel.tp=2", "parallel.pp=2", f"checkpoint.dir={root}/a"], world)
    fill(model, opt, mesh, 5)
    own = _own_bytes(model, opt)
    largest = max(torch.Size(c.full_shape(n)).numel() * 4 for c in model for n, _ in c.named_parameters())
    out["save"], where = _tracked(partial(save_training_checkpoint, model, opt, mesh, cfg, 5), model, opt)
    out["old"], _ = _tracked(partial(_old_gather, model, opt, mesh), model, opt)
    out["own"], out["largest"] = own, largest
    ck = os.path.join(root, "a", "iter_0000005")
    if rank == 0:
        out["files"] = sorted(f for f in os.listdir(ck) if f.endswith(".distcp"))
        out["read_back_a"] = _read_back(ck)
    # HF export written by both pipeline stages in parallel = one process's export, byte for byte
    out["export"], _ = _tracked(partial(export_hf, model, mesh, os.path.join(root, "hf-tp2-pp2"), dtype=torch.bfloat16,
                                        max_shard_bytes=4 * 2**20), model, opt)
    if rank == 0:
        import dataclasses

        from engine.mesh import ParallelMesh
        from engine.train import build_model

        one = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, tp=1, pp=1, dp=1))
        single = build_model(one, ParallelMesh.single())
        for chunk in single:
            chunk.load_canonical({chunk.canonical_name(n): truth("w", chunk.canonical_name(n), chunk.full_shape(n),
                                                                 chunk.cfg.vocab_size)
                                  for n, _ in chunk.named_parameters()})
        export_hf(single, ParallelMesh.single(), os.path.join(root, "hf-single"), dtype=torch.bfloat16,
                  max_shard_bytes=4 * 2**20)
        files = sorted(os.listdir(os.path.join(root, "hf-single")))
        out["export_files"] = files
        same = [_bytes(root, "hf-single", f) == _bytes(root, "hf-tp2-pp2", f) for f in files]
        out["export_same"] = files == sorted(os.listdir(os.path.join(root, "hf-tp2-pp2"))) and all(same)
        del single
    dist.barrier()
    cfg, mesh, model, opt = _setup(base + ["parallel.tp=2", "parallel.pp=2"], world)
    before = _own_bytes(model, opt)  # weights and masters; the moments are allocated by the resume
    transient, step = _tracked(partial(load_training_checkpoint, model, opt, mesh, ck), model, opt)
    out["load_peak"], out["own_after_load"] = before + transient, _own_bytes(model, opt)
    out["same_mesh"] = mismatches(model, opt, mesh) + ([] if step == 5 and opt.step_count == 5 else ["step"])
    # -- resumes at other meshes and shardings, and their saves read back --------------------------
    for name, over in (("dp4-zero1-midrow", ["optim.sharding=zero1", "optim.grad_bucket_size=30000"]),
                       ("tp2-dp2-fsdp2", ["parallel.tp=2", "optim.sharding=fsdp2"]),
                       ("tp2-dp2-none", ["parallel.tp=2", "optim.sharding=none"])):
        cfg, mesh, model, opt = _setup(BIG + over + [f"checkpoint.dir={root}/{name}"], world)
        load_training_checkpoint(model, opt, mesh, ck)
        out[f"resume {name}"] = mismatches(model, opt, mesh)
        save_training_checkpoint(model, opt, mesh, cfg, 6)
        if rank == 0:
            out[f"read_back {name}"] = _read_back(os.path.join(root, name, "iter_0000006"))
    dist.barrier()
    out.update(_megatron_part(rank, world, root))
    return out


def _bytes(*path) -> bytes:
    with open(os.path.join(*path), "rb") as f:
        return f.read()


def _megatron_part(rank, world, root) -> dict:
    """The legacy format from training loads in megatron-core (strict) and resumes exactly; a
    torch_dist checkpoint of 4 ZeRO-1 ranks (partial-row chunks) loads through megatron-core."""
    from engine.resume import load_training_checkpoint, save_training_checkpoint
    from tests.test_megatron_legacy import DTYPES, VARIANTS, _mcore_world, canonical

    out = {}
    variant = "bf16-qkvbias-tied"
    m = VARIANTS[variant]
    def value(v):
        return f"{v:.6e}" if isinstance(v, float) else v if isinstance(v, str) else json.dumps(v)

    over = [f"model.{k}={value(v)}" for k, v in m.items() if k not in ("kv_channels", "rope_scaling")]
    over += ["train.bf16=true", "optim.sharding=zero1"]
    canon = canonical(m, DTYPES[variant])

    def set_weights(model):
        for chunk in model:
            chunk.load_canonical({chunk.canonical_name(n): canon[chunk.canonical_name(n)]
                                  for n, _ in chunk.named_parameters()})

    legacy = os.path.join(root, "legacy")
    cfg, mesh, model, opt = _setup(over + ["parallel.tp=2", "parallel.pp=2", "checkpoint.format=torch",
                                           f"checkpoint.dir={legacy}"], world)
    set_weights(model)
    opt.restore_step(4, True)
    from engine.checkpoint import trainable_entries

    entries = trainable_entries(model)
    with torch.no_grad():  # known states (padding rows of the vocabulary zero, as a resume leaves them)
        for i, lo, hi, roles in opt.checkpoint_pieces():
            chunk, local, p = entries[i]
            for role, flat in roles.items():
                if role != "param":
                    full = truth(role, chunk.canonical_name(local), chunk.full_shape(local), chunk.cfg.vocab_size)
                    flat.copy_(_shard_of(full, p, mesh).reshape(-1)[lo:hi])
    saved = [{k: v.clone() for k, v in roles.items()} for _, _, _, roles in opt.checkpoint_pieces()]
    save_training_checkpoint(model, opt, mesh, cfg, 4)
    _, mesh, model2, opt2 = _setup(over + ["parallel.tp=2", "parallel.pp=2"], world)
    load_training_checkpoint(model2, opt2, mesh, os.path.join(legacy, "iter_0000004"))
    exact = all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))
    exact &= all(torch.equal(s[k], roles[k]) for s, (_, _, _, roles) in zip(saved, opt2.checkpoint_pieces()) for k in s)
    out["legacy_exact"] = exact
    out["legacy_files"] = sorted(os.listdir(os.path.join(legacy, "iter_0000004")))
    # torch_dist at dp4 with mid-row ZeRO-1 ranges, for megatron-core
    dist_root = os.path.join(root, "mcore")
    cfg, mesh, model, opt = _setup(over + ["optim.grad_bucket_size=5000", "parallel.dp=4",
                                           f"checkpoint.dir={dist_root}"], world)
    set_weights(model)
    save_training_checkpoint(model, opt, mesh, cfg, 5)
    out["mcore_dist"] = _mcore_dist_load(os.path.join(dist_root, "iter_0000005"), canon)
    out["mcore_legacy"] = _mcore_world(rank, world, [(legacy, variant, 2, 2, 1)])[0]
    return out


def _mcore_dist_load(path: str, canon: dict) -> list:
    from megatron.core import dist_checkpointing, parallel_state

    from engine.model.sharding import tp_split
    from engine.parallel.tensor import shard_tensor
    from tests.test_megatron_dist import _megatron_gpt

    with open(os.path.join(path, "meshtron.json")) as f:
        model = json.load(f)["model"]
    done = []
    for tp in (1, 2):
        parallel_state.initialize_model_parallel(tp, 1)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        gpt = _megatron_gpt(model, torch.bfloat16, tp)
        loaded = dist_checkpointing.load({"model": gpt.sharded_state_dict()}, path)
        gpt.load_state_dict(loaded["model"], strict=True)
        for name, t in gpt.state_dict().items():
            if not name.endswith("_extra_state"):
                dim, parts = tp_split(name) or (None, 1)
                assert torch.equal(t, shard_tensor(canon[name], dim, parts, tp, tp_rank)), (tp, name)
        done.append(tp)
        parallel_state.destroy_model_parallel()
    return done


def test_sharded_checkpoints_in_a_world_of_4(tmp_path):
    pytest.importorskip("megatron.core")
    results = run_world(4, world_fn, str(tmp_path), timeout=900)
    for rank, r in enumerate(results):
        own, largest = r["own"], r["largest"]
        bound = own + largest + 0.1 * own
        print(f"rank {rank}: own shard {own / 2**20:.2f} MiB, largest tensor {largest / 2**20:.2f} MiB, bound "
              f"{bound / 2**20:.2f} MiB | save peak {(own + r['save']) / 2**20:.2f} MiB, resume peak "
              f"{r['load_peak'] / 2**20:.2f} MiB, old gather path {(own + r['old']) / 2**20:.2f} MiB, HF export "
              f"{(own + r['export']) / 2**20:.2f} MiB")
        assert own + r["save"] <= bound, (rank, r["save"])
        assert r["own_after_load"] == own, (rank, r["own_after_load"], own)
        assert r["load_peak"] <= bound, (rank, r["load_peak"])
        assert r["same_mesh"] == [], (rank, r["same_mesh"][:5])
        # export: one canonical tensor at a time, its tp shards + the assembled tensor + its HF pieces
        assert r["export"] <= 4 * largest // 2, (rank, r["export"])  # bf16: a tensor is largest / 2
        for name in ("dp4-zero1-midrow", "tp2-dp2-fsdp2", "tp2-dp2-none"):
            assert r[f"resume {name}"] == [], (rank, name, r[f"resume {name}"][:5])
        assert r["legacy_exact"], rank
        assert r["mcore_dist"] == [1, 2], rank
    r0 = results[0]
    assert r0["own"] + r0["old"] > r0["own"] + r0["largest"] + 0.1 * r0["own"], "the bound would not catch a gather"
    assert r0["files"] == [f"__{i}_0.distcp" for i in range(4)]  # every rank wrote its own shards
    for key in ("read_back_a", "read_back dp4-zero1-midrow", "read_back tp2-dp2-fsdp2", "read_back tp2-dp2-none"):
        assert r0[key] == [], (key, r0[key][:5])
    shards = [f for f in r0["export_files"] if f.endswith(".safetensors")]
    assert r0["export_same"] and len(shards) > 2, r0["export_files"]  # shards spanning both stages
    assert "mp_rank_01_001" in r0["legacy_files"] and "meshtron_optim" in r0["legacy_files"]
    from engine.model.sharding import canonical_names
    from tests.test_megatron_legacy import VARIANTS

    seen = set().union(*(r["mcore_legacy"] for r in results))
    assert seen == set(canonical_names(VARIANTS["bf16-qkvbias-tied"]))
