"""Sharded checkpoint I/O (DESIGN I-8): every rank writes and reads only what it holds.

Pure checks: flat ranges cut into rectangles land at megatron-core's global offsets (fc1's two
chunks per tp rank, partial rows of ZeRO-1 ranges); the streamed safetensors files are
byte-identical to ``save_file``; the converter resolves tensors in plan order even where DCP's
writer would sort them; ``weights_only`` loading with the allow-list; the simulator's
``storage_writer`` hook under FakeTensorMode; leftovers of a killed save removed at start and
pruning limited to this run's checkpoints; ``checkpoint.format`` validation.

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
import random
from functools import partial

import pytest
import torch

from tests.harness import run_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
BIG = ["model.num_layers=8", "model.hidden_size=256", "model.ffn_hidden_size=704", "model.num_attention_heads=8",
       "model.num_query_groups=4", "model.vocab_size=500", "model.tie_word_embeddings=true", "train.bf16=true"]


# ---------------------------------------------------------------------------------------------
# Pure checks


def test_flat_ranges_land_at_global_offsets():
    from convert.layout import Placement
    from engine.model.sharding import tp_split
    from engine.parallel.tensor import shard_tensor

    rng = random.Random(0)
    cases = [("decoder.layers.1.mlp.linear_fc1.weight", (12, 5)), ("decoder.layers.1.mlp.linear_fc2.weight", (5, 6)),
             ("decoder.layers.1.self_attention.linear_qkv.bias", (12,)), ("embedding.word_embeddings.weight", (8, 3)),
             ("decoder.layers.1.input_layernorm.weight", (7,)), ("decoder.final_layernorm.weight", (7,))]
    for name, shape in cases:
        full = torch.arange(1, torch.Size(shape).numel() + 1, dtype=torch.float32).view(shape)
        dim, parts = tp_split(name) or (None, 1)
        for tp in (1, 2):
            for r in range(tp):
                local = shard_tensor(full, dim, parts, tp, r)
                where = Placement.of(name, local.shape, tp, r, num_layers=3)
                flat = local.reshape(-1)
                whole = where.chunks()
                assert len(whole) == (parts if dim is not None and tp > 1 else 1), (name, whole)  # fc1: [gate_r; up_r]
                for _ in range(40):
                    lo = rng.randrange(flat.numel())
                    hi = rng.randrange(lo + 1, flat.numel() + 1)
                    got = torch.zeros(where.global_shape)
                    for c in where.chunks(lo, hi):
                        assert c.hi - c.lo == torch.Size(c.sizes).numel()  # a contiguous run of the range
                        box = tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes))
                        assert not got[box].any(), "chunks overlap"
                        got[box] = flat[c.lo:c.hi].view(c.sizes)
                    got = got[1] if where.layer is not None else got
                    # exactly the held elements, each at its canonical position (values are 1, 2, …)
                    assert int((got != 0).sum()) == hi - lo, (name, tp, r, lo, hi)
                    assert torch.equal(got[got != 0].sort().values, flat[lo:hi].sort().values), (name, tp, r)
                    assert torch.equal(got[got != 0], full[got != 0]), (name, tp, r, lo, hi)


def test_streamed_safetensors_are_byte_identical(tmp_path):
    from safetensors.torch import save_file

    from convert.hf_io import ShardLayout

    g = torch.Generator().manual_seed(0)
    tensors = [("b.w", torch.randn(3, 5, generator=g)), ("a.x", torch.randn(7, generator=g).bfloat16()),
               ("z", torch.randn(2, 2, generator=g)), ("c", torch.randn(4, generator=g).half()),
               ("y", torch.randn(11, generator=g)), ("m.q", torch.randn(6, generator=g).bfloat16())]
    for max_bytes in (60, 10_000):
        out = tmp_path / str(max_bytes)
        out.mkdir()
        layout = ShardLayout.plan([(n, tuple(t.shape), t.dtype) for n, t in tensors], max_bytes)
        layout.create(str(out))
        with layout.open(str(out)) as files:
            for name, t in reversed(tensors):  # any order: positional writes
                files.write(name, t)
            files.close()
        shards, size = [{}], 0  # what write_hf always did: greedy in stream order, save_file per shard
        for name, t in tensors:
            if shards[-1] and size + t.nbytes > max_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = t
            size += t.nbytes
        assert len(layout.files) == len(shards) == (3 if max_bytes == 60 else 1)
        for fname, shard in zip(layout.files, shards):
            save_file(shard, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
            assert (out / fname).read_bytes() == (tmp_path / "ref.safetensors").read_bytes(), fname


def test_converter_streams_in_plan_order_even_where_dcp_would_sort(tmp_path, monkeypatch):
    """save_dist resolves tensors in plan order, one at a time, although DCP's default writer sorts
    them by size when CUDA is available (monkeypatched here)."""
    import gc
    import weakref

    from convert.megatron_dist import load_dist, save_dist
    from tests.test_megatron_dist import make_model, random_canonical

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = make_model(True, False)
    canon = random_canonical(model, torch.float32)
    asked, alive_max, refs = [], 0, []

    def get(name):
        nonlocal alive_max
        gc.collect()
        alive_max = max(alive_max, sum(r() is not None for r in refs))
        asked.append(name)
        t = canon[name].clone()
        refs.append(weakref.ref(t))
        return t

    save_dist(get, list(canon), model, str(tmp_path / "ck"))
    assert asked == list(canon)
    assert alive_max <= 1, f"{alive_max} fetched tensors were alive when the next was fetched"
    back, _, _ = load_dist(str(tmp_path / "ck"))
    assert all(torch.equal(back[k], v) for k, v in canon.items())


def test_trusted_load_allow_list(tmp_path):
    import io
    import pickle
    from argparse import Namespace

    import numpy as np

    from convert.files import CheckpointError, trusted_load

    ok = {"args": Namespace(params_dtype=torch.bfloat16, iteration=3), "rng": np.random.get_state(),
          "py": random.getstate(), "extra": io.BytesIO(b"x"), "empty": io.BytesIO(), "t": torch.ones(2)}
    torch.save(ok, tmp_path / "ok.pt")
    back = trusted_load(str(tmp_path / "ok.pt"))
    assert back["args"].params_dtype == torch.bfloat16 and torch.equal(back["t"], torch.ones(2))
    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises((pickle.UnpicklingError, CheckpointError)):
        trusted_load(str(tmp_path / "evil.pt"))


class Evil:
    def __reduce__(self):
        return (os.getcwd, ())


def _tiny(tmp, *over, world=1):
    from engine.config import load_config, validate

    return validate(load_config(TINY, ["model.num_layers=2", f"train.output_dir={tmp}", *over]), world)


def test_storage_writer_hook_under_fake_tensors(tmp_path):
    """The simulator's sink gets the same items as the real save, as fake tensors; small files are
    written for real into iter_N.new; nothing is published."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.distributed.checkpoint import FileSystemReader

    from engine.mesh import ParallelMesh
    from engine.optim import MeshOptimizer
    from engine.resume import save_training_checkpoint
    from engine.train import build_model

    mesh = ParallelMesh.single()
    sinks = []

    def sink(path):
        sinks.append(Sink(path))
        return sinks[-1]

    cfg = _tiny(tmp_path / "fake", "train.bf16=true", "optim.sharding=zero1")
    with FakeTensorMode():
        model = build_model(cfg, mesh)
        opt = MeshOptimizer(model, cfg.optim, mesh, 10)
        opt.restore_step(3, True)
        where = save_training_checkpoint(model, opt, mesh, cfg, 3, storage_writer=sink)
    ck = tmp_path / "fake" / "checkpoints"
    assert where == str(ck / "iter_0000003.new") and not (ck / "latest_checkpointed_iteration.txt").exists()
    assert {p.name for p in (ck / "iter_0000003.new").iterdir()} == {
        "common.pt", "meshtron.json", "meshtron_train.pt", "metadata.json", "rng"}
    seen = sinks[0].seen
    assert seen and all(isinstance(d, FakeTensor) for k, d in seen.items() if not k[0].endswith(tuple("0123456789")))
    # the real save of the same run plans the same items
    cfg = _tiny(tmp_path / "real", "train.bf16=true", "optim.sharding=zero1")
    model = build_model(cfg, mesh)
    opt = MeshOptimizer(model, cfg.optim, mesh, 10)
    opt.restore_step(3, True)
    real = save_training_checkpoint(model, opt, mesh, cfg, 3)
    md = FileSystemReader(real).read_metadata()
    planned = {(k, tuple(c.offsets)) for k, m in md.state_dict_metadata.items() for c in getattr(m, "chunks", [])}
    assert {k for k in seen if k[1] is not None} == planned
    for (key, offsets), d in seen.items():
        if offsets is not None:
            m = md.state_dict_metadata[key]
            chunk = next(c for c in m.chunks if tuple(c.offsets) == offsets)
            assert tuple(d.shape) == tuple(chunk.sizes) and d.dtype == m.properties.dtype, key


class Sink:
    """A StorageWriter that resolves every item and discards the bytes (as the simulator's does)."""

    def __new__(cls, path):
        from torch.distributed.checkpoint.storage import StorageWriter

        class _Sink(StorageWriter):
            def __init__(self):
                self.seen = {}

            def reset(self, checkpoint_id=None):
                pass

            def set_up_storage_writer(self, is_coordinator, *args, **kwargs):
                pass

            def prepare_local_plan(self, plan):
                return plan

            def prepare_global_plan(self, plans):
                return plans

            def write_data(self, plan, planner):
                from torch.distributed.checkpoint.storage import WriteResult
                from torch.futures import Future

                out = []
                for item in plan.items:
                    offsets = None if item.index.offset is None else tuple(item.index.offset)
                    self.seen[item.index.fqn, offsets] = planner.resolve_data(item)
                    out.append(WriteResult(index=item.index, size_in_bytes=0, storage_data=None))
                fut = Future()
                fut.set_result(out)
                return fut

            def finish(self, metadata, results):
                pass

            @classmethod
            def validate_checkpoint_id(cls, checkpoint_id):
                return True

        return _Sink()


def test_leftovers_removed_and_only_this_runs_checkpoints_pruned(tmp_path):
    from convert.files import trusted_load
    from engine.mesh import ParallelMesh
    from engine.optim import MeshOptimizer
    from engine.resume import prepare_checkpoint_dir, save_training_checkpoint
    from engine.train import build_model

    cfg = _tiny(tmp_path, "checkpoint.keep=1")
    root = tmp_path / "checkpoints"
    other = root / "iter_0000001"  # another run's checkpoint
    other.mkdir(parents=True)
    torch.save({"run": "someone-else"}, other / "meshtron_train.pt")
    (root / "iter_notes").mkdir()  # a user's directory
    (root / "README").write_text("mine")
    for stale in ("iter_0000009.new", "iter_0000003.old", ".iter_0000002.tmp-1a2b3c4d"):
        (root / stale).mkdir()
        (root / stale / "x").write_text("half-written")
    (root / "latest_checkpointed_iteration.txt.tmp").write_text("9")
    mesh = ParallelMesh.single()
    prepare_checkpoint_dir(cfg, mesh)
    assert sorted(p.name for p in root.iterdir()) == ["README", "iter_0000001", "iter_notes"]
    model = build_model(cfg, mesh)
    opt = MeshOptimizer(model, cfg.optim, mesh, 10)
    for step in (2, 4, 6):
        save_training_checkpoint(model, opt, mesh, cfg, step)
    assert sorted(p.name for p in root.iterdir()) == [
        "README", "iter_0000001", "iter_0000006", "iter_notes", "latest_checkpointed_iteration.txt"]
    assert trusted_load(str(other / "meshtron_train.pt"))["run"] == "someone-else"


# ---------------------------------------------------------------------------------------------
# The world


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


def test_checkpoint_format_is_validated():
    from engine.config import ConfigError, load_config, validate

    def check(*over, world=2):
        return validate(load_config(TINY, list(over)), world)

    assert check("checkpoint.format=torch", "optim.sharding=zero1").checkpoint.format == "torch"
    assert check().checkpoint.format == "torch_dist"
    with pytest.raises(ConfigError, match="checkpoint.format='tar' is not supported"):
        check("checkpoint.format=tar")
    with pytest.raises(ConfigError, match="use checkpoint.format=torch_dist"):
        check("checkpoint.format=torch", "optim.sharding=fsdp2")
    with pytest.raises(ConfigError, match="cannot be expressed in Megatron-LM"):
        check("checkpoint.format=torch", "parallel.pp=2", "parallel.vpp=2", "parallel.pp_schedule=interleaved",
              "model.num_layers=6", "parallel.layers_per_stage=[1,2,2,1]", world=2)
    with pytest.raises(ConfigError, match="checkpoint.keep=-1 must be >= 0"):
        check("checkpoint.keep=-1")
