"""Sharded checkpoint I/O (DESIGN I-8): every rank writes and reads only what it holds.

Pure checks: flat ranges cut into rectangles land at megatron-core's global offsets (fc1's two
chunks per tp rank, partial rows of ZeRO-1 ranges); the streamed safetensors files are
byte-identical to ``save_file``; the converter resolves tensors in plan order even where DCP's
writer would sort them; ``weights_only`` loading with the allow-list; the simulator's
``storage_writer`` hook under FakeTensorMode; leftovers of a killed save removed at start and
pruning limited to this run's checkpoints; ``checkpoint.format`` validation.

The world of 4 gloo ranks that saves, resumes and exports sharded checkpoints is in
tests/test_checkpoint_shards.py.
"""
from __future__ import annotations

import os
import random

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


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
