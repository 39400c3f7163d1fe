"""I-9 (the host runs ahead of the device) and I-7 (collectives on the mesh's device) for a whole
training step, with the device emulated.

One process plays one rank of a real mesh: torch's fake process group (collectives accepted, no
data moved) and the ``meta`` device as the mesh's device — a device distinct from the host whose
tensors have shapes but no data, so the host's own work (data, plans, counts) runs for real on
CPU tensors while every read of device data is visible. (A CPU-only torch cannot run autograd on
FakeTensorMode's fake ``cuda`` tensors: it has no CUDA device guard, and the process aborts.)
:class:`SyncCounter`, a dispatch mode, records every host-device synchronisation with the engine
line that caused it:

* reading a device scalar (``aten._local_scalar_dense``: ``.item()``, ``int(t)``, ``float(t)``)
  or copying device -> host (``.tolist()``, ``.cpu()``); both return placeholders, so the step
  runs on and every offender is listed;
* a blocking host -> device copy (``.to(device)`` without ``non_blocking``, and
  ``torch.tensor``/``torch.as_tensor`` of host data with ``device=``);
* indexing a device tensor with a host index tensor (copied over, blocking);
* an op whose output shape depends on device data (nonzero, masked_select, unique, boolean
  indexing, ``repeat_interleave`` without ``output_size``) — these fail at once;

and, for I-7, every collective or p2p whose tensors are not on the mesh's device. The attention
kernel is a shape-only stub behind the flash dispatch (``dispatch._KERNELS``) that insists on
host-int maximum lengths; everything around it (dispatch's argument handling, ring, Ulysses,
Seq1F1B's cache, the loss, DPO, FlexSP, the pipeline runtime, the optimizer step) is the engine's.

What a step may sync: the optimizer's one read of (grad norm, loss) for its NaN/Inf check, and
the logging of what is still on the device (DPO's reward metrics; FlexSP's plan broadcast is read
once by the receiving ranks) — one transfer each, independent of layers, micro-batches, Seq1F1B
units and cp. Checked: at most 4 (I-9's budget), and exactly the expected figure for every mesh,
so a count that grows with any of them fails.
"""
from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tests.test_tp_exact import make_cfg

BUDGET = 4
DEVICE = torch.device("meta")
MODEL = ["model.arch=llama", "model.num_attention_heads=8", "model.num_query_groups=4",
         "data.seq_len=128", "data.min_doc_len=5", "data.max_doc_len=60"]
aten = torch.ops.aten
_DATA_DEPENDENT = {aten.nonzero.default, aten.masked_select.default, aten.unique_consecutive.default,
                   aten._unique2.default, aten.unique_dim.default, aten._unique.default,
                   aten.masked_scatter.default, aten.bincount.default}


def _where() -> str:
    """The innermost engine frame of the current Python stack (what to fix)."""
    for frame in reversed(traceback.extract_stack()):
        if "/engine/" in frame.filename:
            return f"engine/{frame.filename.split('/engine/')[-1]}:{frame.lineno} ({frame.name})"
    return "outside engine/"


def _file(where: str) -> str:
    return where.split(":")[0]


class SyncCounter(TorchDispatchMode):
    """Counts host-device synchronisations and off-device collectives (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.syncs: Counter = Counter()     # "what at file:line (function)" -> count
        self.by_file: Counter = Counter()   # engine file -> count
        self.off_device: list[str] = []

    def note(self, what: str) -> None:
        where = _where()
        self.syncs[f"{what} at {where}"] += 1
        self.by_file[_file(where)] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func.namespace == "c10d":
            bad = [t.device for t in leaves if t.device != DEVICE]
            if bad:
                self.off_device.append(f"{func} on {bad[0]} at {_where()}")
            return func(*args, **kwargs)
        on_device = any(t.device == DEVICE for t in leaves)
        if func is aten._local_scalar_dense.default and on_device:
            self.note("scalar read")
            return True if args[0].dtype == torch.bool else (1.0 if args[0].dtype.is_floating_point else 1)
        if on_device and (func in _DATA_DEPENDENT or (func is aten.repeat_interleave.Tensor
                                                      and kwargs.get("output_size") is None)):
            raise AssertionError(f"{func}: output shape depends on device data, at {_where()}")
        if on_device and func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
            indices = [t for t in tree_leaves(args[1]) if isinstance(t, torch.Tensor)]
            if any(t.dtype == torch.bool for t in indices):
                raise AssertionError(f"boolean indexing of a device tensor at {_where()}")
            if any(t.device.type == "cpu" and t.dim() > 0 for t in indices):  # copied over, blocking
                self.note("host index tensor for a device tensor")
        if func is aten._to_copy.default and "device" in kwargs:
            src, dst = args[0].device, torch.device(kwargs["device"])
            if src == DEVICE and dst.type == "cpu":
                self.note("device-to-host copy")
                return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
            if src.type == "cpu" and dst == DEVICE and not kwargs.get("non_blocking", False):
                self.note("blocking host-to-device copy")
        if func is aten.copy_.default:
            dst, src = args[0].device, args[1].device
            if src == DEVICE and dst.type == "cpu":
                self.note("device-to-host copy")
                return args[0]
            if src.type == "cpu" and dst == DEVICE and not (args[2] if len(args) > 2 else kwargs.get("non_blocking")):
                self.note("blocking host-to-device copy")
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.syncs.values())


def _patch(monkeypatch, counter_box: list):
    """The flash path of engine/kernels/dispatch.py with shape-only kernels that demand the
    maximum lengths as host ints (the real flash kernels take ints too); ``torch.tensor`` /
    ``torch.as_tensor`` with a device counted as the blocking copies they are; weights not drawn."""
    from engine.kernels import dispatch

    def check(max_q, max_k):
        assert isinstance(max_q, int) and isinstance(max_k, int), (
            f"max lengths must be host ints, got {type(max_q).__name__}/{type(max_k).__name__} at {_where()}")

    def forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        check(max_q, max_k)
        return torch.empty_like(q), torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)

    def backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
        check(max_q, max_k)
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    monkeypatch.setattr(dispatch, "select_backend", lambda q: "torch_flash")
    monkeypatch.setitem(dispatch._KERNELS, "torch_flash", (forward, backward))

    def counted(make):
        def fn(*args, **kwargs):
            if counter_box and kwargs.get("device") is not None and torch.device(kwargs["device"]) == DEVICE:
                counter_box[0].note(f"torch.{make.__name__}(host data, device=)")
            return make(*args, **kwargs)
        return fn

    monkeypatch.setattr(torch, "tensor", counted(torch.tensor))
    monkeypatch.setattr(torch, "as_tensor", counted(torch.as_tensor))
    # weights do not matter on a device without data: skip drawing and copying the canonical ones
    monkeypatch.setattr("engine.model.gpt.GPTModel.load_canonical", lambda self, state, strict=True: None)
    monkeypatch.setattr("engine.train.init_canonical", lambda chunk, seed: {})


def one_step(over: list[str], world: int, rank: int, box: list, plan_fn=None) -> SyncCounter:
    """Rank ``rank`` of a ``world``-rank mesh runs one training step as ``train()`` does (data
    built and moved, forward/backward, optimizer step, logging); returns its counter."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from engine import train as T
    from engine.mesh import ParallelMesh

    dist.init_process_group("cpu:fake,meta:fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        cfg = make_cfg(MODEL + over, world)
        p = cfg.parallel
        mesh = ParallelMesh.build(tp=p.tp, cp=p.cp, hp=p.hp, dp=p.dp, pp=p.pp, placement=p.placement,
                                  ring_window=p.ring_window)
        mesh.device = DEVICE  # the groups are built; from here on the mesh computes on "the device"
        flex = None
        if p.sp_mode == "flexsp":
            from engine.flexsp.runtime import FlexSPRuntime

            flex = FlexSPRuntime(cfg, mesh, plan_fn)
        data = T.build_dataset(cfg)
        model = T.build_model(cfg, mesh, flex.attention if flex else None)
        reference = T.build_model(cfg, mesh).requires_grad_(False) if cfg.recipe == "dpo" else None
        opt = T.MeshOptimizer(model, cfg.optim, mesh, 1)
        with SyncCounter() as counter:
            box[:] = [counter]
            extra = {}
            if reference is not None:
                from engine.recipes.dpo import dpo_micro_batches

                loss, _, extra = T.dpo_forward_backward(model, reference, dpo_micro_batches(data, 0, cfg, mesh),
                                                        mesh, cfg)
            elif flex is not None:
                loss, _ = flex.forward_backward(model, data, 0, flex.plan(data, 0, 1))
            else:
                loss, _ = T.forward_backward(model, T.rank_micro_batches(data, 0, cfg, mesh), mesh, p,
                                             num_valid=T.step_valid_tokens(data, 0, cfg))
            stats = opt.step(loss)
            T.read_logged({"loss": stats.pop("loss", loss), **extra})
            box[:] = []
        if flex is not None:
            flex.close()
        return counter
    finally:
        dist.destroy_process_group()


SFT = {  # (name, world, overrides): one rank of each runs the step; variants that grow one dimension
    "base": (1, ["train.global_batch_size=2"]),
    "layers": (1, ["train.global_batch_size=2", "model.num_layers=4"]),
    "micro-batches": (1, ["train.global_batch_size=4"]),
    "dp2": (2, ["train.global_batch_size=4", "parallel.dp=2"]),
    "tp2": (2, ["train.global_batch_size=2", "parallel.tp=2"]),
    "ring-cp2": (2, ["train.global_batch_size=2", "parallel.cp=2"]),
    "ring-cp4": (4, ["train.global_batch_size=2", "parallel.cp=4"]),
    "ring-cp4-layers": (4, ["train.global_batch_size=4", "parallel.cp=4", "model.num_layers=4"]),
    "double-ring": (4, ["train.global_batch_size=2", "parallel.cp=4", "parallel.ring_window=2"]),
    "ulysses-cp2": (2, ["train.global_batch_size=2", "parallel.cp=2", "parallel.sp_mode=ulysses"]),
    "ulysses-cp4": (4, ["train.global_batch_size=2", "parallel.cp=4", "parallel.sp_mode=ulysses"]),
    "hybrid-cp4": (4, ["train.global_batch_size=2", "parallel.cp=4", "parallel.sp_mode=hybrid", "parallel.hp=2"]),
    "ulysses-kv-replicated": (4, ["train.global_batch_size=2", "parallel.cp=4", "parallel.sp_mode=ulysses",
                                  "model.num_query_groups=2"]),
    "pp2": (2, ["train.global_batch_size=4", "parallel.pp=2"]),
    "pp2-interleaved": (2, ["train.global_batch_size=4", "parallel.pp=2", "parallel.vpp=2",
                            "parallel.pp_schedule=interleaved", "model.num_layers=4"]),
    "seq1f1b-2": (1, ["train.global_batch_size=2", "parallel.pp_schedule=seq1f1b", "parallel.seq_chunks=2"]),
    "seq1f1b-3": (1, ["train.global_batch_size=2", "parallel.pp_schedule=seq1f1b", "parallel.seq_chunks=3"]),
    "seq1f1b-ring-2": (2, ["train.global_batch_size=2", "parallel.cp=2", "parallel.pp_schedule=seq1f1b",
                           "parallel.seq_chunks=2"]),
    "seq1f1b-ring-3": (2, ["train.global_batch_size=2", "parallel.cp=2", "parallel.pp_schedule=seq1f1b",
                           "parallel.seq_chunks=3"]),
    "seq1f1b-hybrid": (4, ["train.global_batch_size=2", "parallel.cp=4", "parallel.sp_mode=hybrid",
                           "parallel.hp=2", "parallel.pp_schedule=seq1f1b", "parallel.seq_chunks=2"]),
    "seq1f1b-pp2-ring": (4, ["train.global_batch_size=2", "parallel.pp=2", "parallel.cp=2",
                             "parallel.pp_schedule=seq1f1b", "parallel.seq_chunks=2"]),
    "attention-cached-ring": (2, ["train.global_batch_size=2", "parallel.cp=2",
                                  "train.recompute=attention-cached"]),
    "selective-seq1f1b-ring": (2, ["train.global_batch_size=2", "parallel.cp=2", "train.recompute=selective",
                                   "parallel.pp_schedule=seq1f1b", "parallel.seq_chunks=2"]),
    "zero1": (2, ["train.global_batch_size=4", "parallel.dp=2", "optim.sharding=zero1"]),
    "bf16-cp2": (2, ["train.global_batch_size=2", "parallel.cp=2", "train.bf16=true"]),
}


def _expect(world: int, over: list[str], expected, monkeypatch, plan_fn=None) -> dict:
    """Run the step on the first and the last rank; ``expected(rank)``: syncs per engine file."""
    box = []
    _patch(monkeypatch, box)
    figures = {}
    for rank in sorted({0, world - 1}):  # the last rank holds the last pipeline stage
        counter = one_step(over, world, rank, box, plan_fn)
        figures[rank] = dict(counter.by_file)
        assert not counter.off_device, counter.off_device
        assert counter.total <= BUDGET, counter.syncs
        assert counter.by_file == Counter(expected(rank)), counter.syncs
    return figures


OPTIMIZER = {"engine/optim.py": 1}  # its one read of (grad norm, loss) for the NaN/Inf check


@pytest.mark.parametrize("name", list(SFT))
def test_sft_step_syncs(name, monkeypatch):
    """SFT: the optimizer's read is the step's only sync, whatever grows (the logged loss is the
    one it read)."""
    world, over = SFT[name]
    print(name, _expect(world, over, lambda rank: OPTIMIZER, monkeypatch))


DATA_DIR = Path(__file__).resolve().parents[1] / "configs" / "data" / "tiny"
DPO = ["recipe=dpo", "data.source=files", f"data.path={DATA_DIR / 'dpo.jsonl'}",
       f"data.tokenizer={DATA_DIR / 'tokenizer'}", "data.format=preference", "data.seq_len=256",
       "train.micro_batch_size=2"]
DPO_MESHES = {
    "base": (1, ["train.global_batch_size=2"]),
    "micro-batches": (1, ["train.global_batch_size=6"]),
    "layers": (1, ["train.global_batch_size=2", "model.num_layers=4"]),
    "ring-cp2": (2, ["train.global_batch_size=2", "parallel.cp=2"]),
    "hybrid-cp4": (4, ["train.global_batch_size=4", "parallel.cp=4", "parallel.sp_mode=hybrid", "parallel.hp=2"]),
    "pp2-dp2": (4, ["train.global_batch_size=4", "parallel.pp=2", "parallel.dp=2"]),
}


@pytest.mark.parametrize("name", list(DPO_MESHES))
def test_dpo_step_syncs(name, monkeypatch):
    """DPO: the optimizer's read and one read of the reward metrics (train.read_logged)."""
    world, over = DPO_MESHES[name]
    print(name, _expect(world, DPO + over, lambda rank: {**OPTIMIZER, "engine/train.py": 1}, monkeypatch))


FLEX = ["data.pack=false", "data.min_doc_len=4", "data.max_doc_len=120", "data.seq_len=120",
        "train.global_batch_size=8", "parallel.sp_mode=flexsp"]


@pytest.mark.parametrize("over", [["parallel.dp=4"], ["parallel.dp=2", "parallel.cp=2"]])
def test_flexsp_step_syncs(over, monkeypatch):
    """FlexSP: the optimizer's read, and on every rank but 0 one read of the broadcast plan.
    (No data moves between fake ranks, so the receivers decode the plan they would get.)"""
    from tests.test_flexsp_exact import hand_plan

    plan_fn = hand_plan(4)
    monkeypatch.setattr("engine.flexsp.runtime._decode_plan", lambda words: plan_fn(0))
    expected = lambda rank: OPTIMIZER if rank == 0 else {**OPTIMIZER, "engine/flexsp/runtime.py": 1}  # noqa: E731
    print(over, _expect(4, FLEX + over, expected, monkeypatch, plan_fn))


def test_counter_sees_each_kind_of_sync(monkeypatch):
    """The counter is not blind: each offender this issue removed, put back, is seen."""
    from engine.data.packing import pack
    from engine.kernels.attention import local_attention

    box = []
    _patch(monkeypatch, box)
    batch = pack([(torch.arange(5), torch.arange(5)), (torch.arange(3), torch.arange(3))])
    q = torch.empty(8, 4, 16, device=DEVICE)
    k = torch.empty(8, 2, 16, device=DEVICE)
    cu = batch.cu_seqlens.to(DEVICE, non_blocking=True)
    with SyncCounter() as counter:
        box[:] = [counter]
        local_attention(q, k, k, cu, max_len=batch.max_seqlen)   # max length from the host: nothing
        assert counter.total == 0, counter.syncs
        local_attention(q, k, k, cu)                              # read off the device: max_q and max_k
        n = int((torch.empty(8, device=DEVICE) != -100).sum())    # the old PackedBatch.num_valid
        torch.tensor(float(n), device=DEVICE)                     # a scalar shipped with torch.tensor
        batch.tokens.to(DEVICE)                                   # a pageable, blocking copy
        torch.empty(3, device=DEVICE).tolist()                    # DPO's old reduce_metrics
        g = torch.empty(4, 6, device=DEVICE)                      # the old loss backward's host arange
        g[torch.arange(4), torch.zeros(4, dtype=torch.long, device=DEVICE)] -= 1.0
        box[:] = []
    assert counter.by_file["engine/kernels/dispatch.py"] == 2, counter.syncs
    assert sum(v for k, v in counter.syncs.items() if k.startswith("scalar read")) == 3, counter.syncs
    assert counter.total == 8, counter.syncs  # the host index: read and written back
    with SyncCounter() as counter, pytest.raises(AssertionError, match="nonzero"):
        torch.empty(3, device=DEVICE).nonzero()
    # I-7: a collective on host tensors (the old Seq1F1B plan's all-gather of token indices)
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from engine.parallel.comm import all_reduce_, gather_shards

    dist.init_process_group("cpu:fake,meta:fake", store=FakeStore(), rank=0, world_size=2)
    try:
        group = dist.new_group([0, 1])
        with SyncCounter() as counter:
            all_reduce_(torch.zeros(2, device=DEVICE), group)
            assert not counter.off_device
            gather_shards(torch.arange(4), group)
        assert len(counter.off_device) == 1 and "on cpu" in counter.off_device[0], counter.off_device
    finally:
        dist.destroy_process_group()
